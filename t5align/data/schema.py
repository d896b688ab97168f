"""The one preference-example schema that every stage reads and writes.

A preference example is a prompt, two responses and ``label`` = P(response_a is
preferred). Hard labels are 1.0 / 0.0; relabelling rewrites ``label`` and
``source``. Provenance (``task``, ``source``, ``example_id``, ``step``) says where
a pair came from: ``step`` is the training step of an online stream and -1
elsewhere.
"""

import dataclasses
import math
from typing import Any, Mapping

FIELDS = ("prompt", "response_a", "response_b", "label", "task", "source", "example_id", "step")


class BadRecordError(ValueError):
  """A record that does not fit its schema; the message names file, record and field."""

  def __init__(self, path: str, record: Any, field: str, problem: str):
    self.path, self.record, self.field, self.problem = str(path), record, field, problem
    super().__init__(f"{path}: record {record}: field {field!r}: {problem}")


@dataclasses.dataclass(frozen=True)
class PreferenceExample:
  prompt: str
  response_a: str
  response_b: str
  label: float  # P(response_a preferred); 1.0 / 0.0 for hard labels.
  task: str
  source: str  # who produced the label: "human", "golden_pm", "proxy_pm", "oracle", ...
  example_id: str
  step: int = -1  # step of an online stream; -1 for static datasets.

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def swapped(self) -> "PreferenceExample":
    """The same pair with the responses in the other order."""
    return dataclasses.replace(
        self, response_a=self.response_b, response_b=self.response_a, label=1.0 - self.label)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], *, path: str = "<memory>", record: Any = "?") -> "PreferenceExample":
    """Validates ``d`` and builds an example; errors name path, record and field."""
    for name in ("prompt", "response_a", "response_b", "task", "source", "example_id"):
      if name not in d:
        raise BadRecordError(path, record, name, "missing")
      if not isinstance(d[name], str):
        raise BadRecordError(path, record, name, f"expected a string, got {type(d[name]).__name__}")
    if "label" not in d:
      raise BadRecordError(path, record, "label", "missing")
    try:
      label = float(d["label"])
    except (TypeError, ValueError):
      raise BadRecordError(path, record, "label", f"expected a probability, got {d['label']!r}") from None
    if not (0.0 <= label <= 1.0) or math.isnan(label):
      raise BadRecordError(path, record, "label", f"expected a probability in [0, 1], got {label}")
    step = d.get("step", -1)
    if isinstance(step, bool) or not isinstance(step, int):
      raise BadRecordError(path, record, "step", f"expected an integer, got {step!r}")
    return cls(prompt=d["prompt"], response_a=d["response_a"], response_b=d["response_b"],
               label=label, task=d["task"], source=d["source"], example_id=d["example_id"], step=step)

"""Training metrics: JSONL log (the source of truth), TensorBoard, progress.

`MetricsWriter` appends one JSON object per step to `<run_dir>/metrics.jsonl`,
e.g. `{"step": 120, "loss": 0.6931, "acc": 0.5}`, flushed at every write so a
killed run loses at most the line being written. Non-finite values are written
as `null` (strict JSON). A resumed run calls `truncate_after(restored_step)`
first, which drops the lines of steps the run is about to redo, so every step
appears exactly once. TensorBoard scalars go to `<run_dir>/tensorboard`
through `clu.metric_writers`; after a resume TensorBoard may show both
versions of the redone steps, the JSONL never does.

`Progress` prints a human-readable line at most every few seconds:

    step 120/4000 (3.0%) 2.41 steps/s ETA 26m50s loss 0.6931 acc 0.5
"""

import json
import math
import os
import tempfile
import time
from typing import Any, Callable, Mapping, Optional

import numpy as np

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def to_float(name: str, value: Any) -> float:
  """Converts a scalar metric (Python, numpy or jax) to float."""
  array = np.asarray(value)
  if array.size != 1:
    raise ValueError(
        f"metric {name!r} must be a scalar, got shape {array.shape}")
  return float(array.reshape(()))


def _parse_lines(path: str, text: str) -> list[dict[str, Any]]:
  records = []
  lines = text.split("\n")
  for number, line in enumerate(lines, start=1):
    if not line:
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      if number == len(lines):
        # The last line has no newline: the write was cut by a kill.
        break
      raise ValueError(f"{path}:{number}: not a JSON line ({e})") from e
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
      raise ValueError(
          f"{path}:{number}: field 'step': expected an integer, got {line!r}")
    records.append(record)
  return records


def read_metrics(run_dir_or_file: str) -> list[dict[str, Any]]:
  """Returns the records of a metrics.jsonl file or of `<run_dir>`'s."""
  path = run_dir_or_file
  if os.path.isdir(path):
    path = os.path.join(path, METRICS_FILE)
  with open(path) as f:
    return _parse_lines(path, f.read())


class MetricsWriter:
  """Writes per-step scalar metrics of one run.

  Args:
    run_dir: the run directory (created if missing).
    tensorboard: also write TensorBoard event files. Importing the writer
      loads TensorFlow (seconds), so tests and quick tools turn it off.
  """

  def __init__(self, run_dir: str, *, tensorboard: bool = True):
    os.makedirs(run_dir, exist_ok=True)
    self.path = os.path.join(run_dir, METRICS_FILE)
    self._file = open(self.path, "a")
    self._summary_writer = None
    if tensorboard:
      from clu import metric_writers  # pylint: disable=g-import-not-at-top
      self._summary_writer = metric_writers.SummaryWriter(
          os.path.join(run_dir, TENSORBOARD_DIR))

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Appends the metrics of `step` (scalars) to the JSONL and TensorBoard."""
    if "step" in metrics:
      raise ValueError("'step' is reserved for the step number; rename the "
                       "metric")
    values = {name: to_float(name, value) for name, value in metrics.items()}
    record = {"step": int(step)}
    record.update({name: value if math.isfinite(value) else None
                   for name, value in values.items()})
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._summary_writer is not None:
      self._summary_writer.write_scalars(int(step), values)

  def truncate_after(self, step: int) -> None:
    """Drops the records of steps > `step` (the steps a resumed run redoes)."""
    self._file.close()
    with open(self.path) as f:
      records = _parse_lines(self.path, f.read())
    kept = [r for r in records if r["step"] <= step]
    directory = os.path.dirname(self.path)
    fd, tmp_path = tempfile.mkstemp(prefix=METRICS_FILE + ".", dir=directory)
    try:
      with os.fdopen(fd, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
      os.replace(tmp_path, self.path)
    except BaseException:
      os.unlink(tmp_path)
      raise
    self._file = open(self.path, "a")

  def flush(self) -> None:
    self._file.flush()
    if self._summary_writer is not None:
      self._summary_writer.flush()

  def close(self) -> None:
    self._file.close()
    if self._summary_writer is not None:
      self._summary_writer.close()


def format_duration(seconds: float) -> str:
  """Formats seconds as `45s`, `26m48s` or `3h05m00s` (rounded)."""
  total = int(round(seconds))
  hours, rest = divmod(total, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m{secs:02d}s"
  if minutes:
    return f"{minutes}m{secs:02d}s"
  return f"{secs}s"


class Progress:
  """Prints step, rate and ETA at most every `every_seconds`.

  The step rate is measured over the window since the previous printed line
  (the first window, from `start`, includes compilation). The first and the
  last (`total_steps`) step are always printed.

  Args:
    total_steps: the step the run ends at.
    every_seconds: minimum time between lines.
    print_fn: where lines go.
    clock: seconds, monotonic (injectable for tests).
  """

  def __init__(self, total_steps: int, *, every_seconds: float = 10.0,
               print_fn: Callable[[str], None] = print,
               clock: Callable[[], float] = time.monotonic):
    self.total_steps = total_steps
    self.every_seconds = every_seconds
    self._print = print_fn
    self._clock = clock
    self._last: Optional[tuple[float, int]] = None
    self._printed = False

  def start(self, step: int) -> None:
    """Marks when training (re)starts at `step`; rates count from here."""
    self._last = (self._clock(), step)

  def update(self, step: int, metrics: Optional[Mapping[str, Any]] = None
             ) -> None:
    """Reports that `step` is done; prints if due."""
    now = self._clock()
    due = (not self._printed or step >= self.total_steps or
           now - self._last[0] >= self.every_seconds)
    if not due:
      return
    rate = None
    if self._last is not None:
      elapsed, steps = now - self._last[0], step - self._last[1]
      if elapsed > 0 and steps > 0:
        rate = steps / elapsed
    parts = [f"step {step}/{self.total_steps} "
             f"({100.0 * step / self.total_steps:.1f}%)"]
    if rate is None:
      parts.append("-- steps/s ETA --")
    else:
      eta = format_duration(max(self.total_steps - step, 0) / rate)
      parts.append(f"{rate:.2f} steps/s ETA {eta}")
    for name, value in (metrics or {}).items():
      parts.append(f"{name} {to_float(name, value):.4g}")
    self._print(" ".join(parts))
    self._printed = True
    self._last = (now, step)

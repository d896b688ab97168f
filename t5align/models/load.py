"""``load_pretrained``: T5 v1.1 weights from a Hugging Face or legacy T5X checkpoint.

Formats, told apart by their files:

* Hugging Face: a directory with ``config.json`` and ``model.safetensors`` or
  ``model.safetensors.index.json`` (sharded) -> ``hf_checkpoint``.
* Legacy T5X: a ``checkpoint_<step>`` directory whose ``checkpoint`` file is
  msgpack, or such a file itself -> ``t5x_checkpoint``.
* Not supported, with a message saying so: T5X's Orbax format (``_METADATA``
  next to ``checkpoint``), TensorFlow checkpoints (``checkpoint`` starts with
  ``model_checkpoint_path``), pickle-based HF weights (``pytorch_model.bin``),
  and a T5X model directory holding several ``checkpoint_<step>``
  subdirectories (pick one).

Every problem with a checkpoint raises ``CheckpointError`` (a ``ValueError``)
naming the file and the field, parameter or tensor. Both readers check what
the files declare before allocating it, up to ``max_bytes`` of arrays
(default ``t5x_checkpoint.DEFAULT_MAX_BYTES``, 64 GiB), and refuse NaN and Inf
weights unless ``allow_nonfinite=True``; the module docstrings of
``t5x_checkpoint`` and ``hf_checkpoint`` list the checks.
"""

import os
import re

from t5align.models import hf_checkpoint, t5, t5x_checkpoint
from t5align.models.t5x_checkpoint import CheckpointError

HF = "hf"
T5X = "t5x"
_HF_WEIGHT_FILES = (hf_checkpoint.SAFETENSORS_FILENAME, hf_checkpoint.SAFETENSORS_INDEX_FILENAME)
_HF_UNSUPPORTED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5",
                           "flax_model.msgpack")
_STEP_DIR = re.compile(r"checkpoint_(\d+)")


def detect_format(path: str) -> tuple[str, str]:
  """``(format, path to pass to its reader)``; raises ``CheckpointError`` otherwise."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise CheckpointError(path, None, "does not exist")
  if os.path.isfile(path):
    if os.path.basename(path) in _HF_WEIGHT_FILES + (hf_checkpoint.CONFIG_FILENAME,):
      return detect_format(os.path.dirname(os.path.abspath(path)))
    return T5X, path
  names = set(os.listdir(path))
  if hf_checkpoint.CONFIG_FILENAME in names:
    if names & set(_HF_WEIGHT_FILES):
      return HF, path
    found = sorted(names & set(_HF_UNSUPPORTED_WEIGHTS))
    raise CheckpointError(path, None, "Hugging Face directory without safetensors weights"
                          + (f" (found {', '.join(found)}; re-save with "
                             "save_pretrained(safe_serialization=True))" if found else ""))
  if names & {t5x_checkpoint.CHECKPOINT_FILENAME, t5x_checkpoint.ORBAX_METADATA_FILENAME}:
    t5x_checkpoint.checkpoint_file(path)  # raises for the Orbax layout
    return T5X, path
  steps = sorted(int(m.group(1)) for n in names if (m := _STEP_DIR.fullmatch(n)))
  if steps:
    latest = os.path.join(path, f"checkpoint_{steps[-1]}")
    raise CheckpointError(path, None, f"T5X model directory with steps {steps}; pass one "
                          f"checkpoint directory, e.g. {latest}")
  raise CheckpointError(path, None, "not a Hugging Face (config.json + *.safetensors) or T5X "
                        "(checkpoint) directory")


def load_pretrained(path: str, *, max_bytes: int = t5x_checkpoint.DEFAULT_MAX_BYTES,
                    allow_nonfinite: bool = False,
                    **config_overrides) -> tuple[t5.T5Config, dict]:
  """``(T5Config, params)`` from a checkpoint in any supported format.

  ``params`` is a plain nested dict of float32 numpy arrays with our (= T5X)
  names. ``config_overrides`` replace config values, e.g. ``dtype='float32'``
  for float32 activations or ``dropout_rate=0.1`` (T5X checkpoints do not
  record dropout; Hugging Face ones do). ``max_bytes`` bounds the arrays as
  stored (the float32 copy comes on top); ``allow_nonfinite`` accepts NaN and
  Inf weights. Raises ``CheckpointError``.
  """
  kind, resolved = detect_format(path)
  reader = hf_checkpoint.load_hf_checkpoint if kind == HF else t5x_checkpoint.load_t5x_checkpoint
  return reader(resolved, max_bytes=max_bytes, allow_nonfinite=allow_nonfinite,
                **config_overrides)

"""Dataset writers: relabelled preference sets and recorded online streams.

Two on-disk formats, both TFRecord (so `tf.data` and seqio read them directly,
and every record carries TFRecord's CRC32C checksums):

* A **preference file** (D_golden and its variants) is one TFRecord file of
  `tf.train.Example`s, one per `PreferenceExample`, holding exactly the schema
  fields (`schema.FIELDS`): the texts as UTF-8 bytes, ``label`` as float32 and
  ``step`` as int64. `write_examples` writes it under a temporary name in the
  same directory and renames it into place, so an interrupted write never
  leaves a file under the final name. `tasks.register_preference_file_task`
  registers such a file back as a seqio task.

* A **stream** (the labelled batches of an online run, in order) is a
  directory with one file per batch, ``batch-<step, 10 digits>.tfrecord``,
  each holding a single `tf.train.Example`: the step and, for every array of
  the batch, its raw little-endian bytes, dtype and shape, so replay is
  token-exact. Each batch file is committed atomically (temporary name, fsync,
  rename), so the directory listing *is* the commit log: a run killed at any
  moment leaves every committed batch readable and no partial batch under a
  batch name. Leftover temporary files are ignored by readers and removed when
  a `StreamWriter` reopens the directory. One process writes a stream.
"""

import os
import re
import uuid
from typing import Iterable, Iterator, Mapping

import numpy as np
import tensorflow as tf

from t5align.data import schema

# How each schema field is stored in a preference file; also the
# `feature_description` that seqio's TFExampleDataSource parses with.
EXAMPLE_FEATURES = {
    "prompt": tf.io.FixedLenFeature([], tf.string),
    "response_a": tf.io.FixedLenFeature([], tf.string),
    "response_b": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.float32),
    "task": tf.io.FixedLenFeature([], tf.string),
    "source": tf.io.FixedLenFeature([], tf.string),
    "example_id": tf.io.FixedLenFeature([], tf.string),
    "step": tf.io.FixedLenFeature([], tf.int64),
}
assert tuple(EXAMPLE_FEATURES) == schema.FIELDS

_BATCH_FILE = re.compile(r"^batch-(\d{10})\.tfrecord$")
_TMP_MARK = ".tmp-"


def _bytes(values) -> tf.train.Feature:
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))


def _temp_path(path: str) -> str:
  directory, name = os.path.split(os.path.abspath(path))
  # Hidden and marked, in the same directory so that os.replace is atomic.
  return os.path.join(directory, f".{name}{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _fsync_dir(directory: str) -> None:
  fd = os.open(directory, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _write_records_atomically(path: str, records: Iterable[bytes]) -> int:
  """Writes serialized records to ``path`` via a temporary file; returns the count."""
  tmp = _temp_path(path)
  count = 0
  try:
    with tf.io.TFRecordWriter(tmp) as writer:
      for record in records:
        writer.write(record)
        count += 1
    # Durable before visible: a crash right after the rename must not expose
    # a file whose blocks never reached the disk.
    with open(tmp, "rb") as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  _fsync_dir(os.path.dirname(os.path.abspath(path)))
  return count


def _read_records(path: str) -> Iterator[bytes]:
  try:
    for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
      yield record
  except tf.errors.DataLossError as e:
    raise schema.BadRecordError(path, "?", "<file>", f"corrupt TFRecord data: {e.message}") from None


# ---------------------------------------------------------------- preference files


def tokens_path(examples_path: str) -> str:
  """Side file of exact token ids for an examples file (``prompt``, ``response_a``,
  ``response_b``, ``label`` arrays); written when text would not re-tokenise exactly,
  e.g. for sampled responses. Readers of pairs prefer it over re-tokenising the text."""
  return examples_path + ".tokens.npz"


def example_to_tf_example(example: schema.PreferenceExample) -> tf.train.Example:
  """The `tf.train.Example` holding the schema fields of ``example``."""
  feature = {
      name: _bytes([getattr(example, name).encode("utf-8")])
      for name in ("prompt", "response_a", "response_b", "task", "source", "example_id")
  }
  feature["label"] = tf.train.Feature(float_list=tf.train.FloatList(value=[example.label]))
  feature["step"] = tf.train.Feature(int64_list=tf.train.Int64List(value=[example.step]))
  return tf.train.Example(features=tf.train.Features(feature=feature))


def write_examples(path: str, examples: Iterable[schema.PreferenceExample]) -> int:
  """Writes ``examples`` to the TFRecord file ``path`` atomically; returns the count.

  The label is stored as float32, so a label round-trips exactly when it is a
  float32 value (0.0, 1.0, 0.5, ...); other soft labels come back rounded to
  float32.
  """
  return _write_records_atomically(
      path, (example_to_tf_example(e).SerializeToString() for e in examples))


def _single(path: str, record: int, name: str, feature: tf.train.Feature, kind: str):
  values = getattr(feature, kind).value
  if feature.WhichOneof("kind") != kind or len(values) != 1:
    raise schema.BadRecordError(path, record, name, f"expected one value in {kind}")
  return values[0]


def read_examples(path: str) -> list[schema.PreferenceExample]:
  """Reads a preference file written by `write_examples`, validating every record."""
  examples = []
  for i, serialized in enumerate(_read_records(path)):
    try:
      features = tf.train.Example.FromString(serialized).features.feature
    except Exception as e:  # protobuf raises its own DecodeError type
      raise schema.BadRecordError(path, i, "<record>", f"not a tf.train.Example: {e}") from None
    d = {}
    for name, spec in EXAMPLE_FEATURES.items():
      if name not in features:
        raise schema.BadRecordError(path, i, name, "missing")
      if spec.dtype == tf.string:
        raw = _single(path, i, name, features[name], "bytes_list")
        try:
          d[name] = raw.decode("utf-8")
        except UnicodeDecodeError:
          raise schema.BadRecordError(path, i, name, "not valid UTF-8") from None
      elif spec.dtype == tf.float32:
        d[name] = _single(path, i, name, features[name], "float_list")
      else:
        d[name] = int(_single(path, i, name, features[name], "int64_list"))
    examples.append(schema.PreferenceExample.from_dict(d, path=path, record=i))
  return examples


# ---------------------------------------------------------------- online streams


def _batch_to_record(step: int, batch: Mapping[str, np.ndarray]) -> bytes:
  feature = {"step": tf.train.Feature(int64_list=tf.train.Int64List(value=[step]))}
  keys = []
  for key, value in batch.items():
    if not isinstance(key, str) or not key:
      raise ValueError(f"stream batch keys must be non-empty strings, got {key!r}")
    array = np.asarray(value)
    if array.dtype.kind not in "biuf":
      raise ValueError(f"stream batch {key!r}: expected a numeric or bool array, got dtype {array.dtype}")
    # Fixed little-endian layout so files are portable across hosts; tobytes()
    # below writes C order whatever the array's memory layout.
    array = array.astype(array.dtype.newbyteorder("<"), copy=False)
    keys.append(key.encode("utf-8"))
    feature[f"{key}/bytes"] = _bytes([array.tobytes()])
    feature[f"{key}/dtype"] = _bytes([array.dtype.str.encode("ascii")])
    feature[f"{key}/shape"] = tf.train.Feature(int64_list=tf.train.Int64List(value=array.shape))
  feature["keys"] = _bytes(keys)
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def _record_to_batch(path: str, serialized: bytes) -> tuple[int, dict[str, np.ndarray]]:
  features = tf.train.Example.FromString(serialized).features.feature
  try:
    step = features["step"].int64_list.value[0]
    keys = [k.decode("utf-8") for k in features["keys"].bytes_list.value]
  except (KeyError, IndexError):
    raise schema.BadRecordError(path, 0, "step/keys", "missing") from None
  batch = {}
  for key in keys:
    try:
      data = features[f"{key}/bytes"].bytes_list.value[0]
      dtype = np.dtype(features[f"{key}/dtype"].bytes_list.value[0].decode("ascii"))
      shape = tuple(features[f"{key}/shape"].int64_list.value)
      batch[key] = np.frombuffer(data, dtype=dtype).reshape(shape).copy()
    except (KeyError, IndexError, TypeError, ValueError) as e:
      raise schema.BadRecordError(path, 0, key, f"unreadable array: {e}") from None
  return step, batch


def _committed(path: str) -> list[tuple[int, str]]:
  """(step, file path) of every committed batch, in step order."""
  found = []
  for name in os.listdir(path):
    match = _BATCH_FILE.match(name)
    if match:
      found.append((int(match.group(1)), os.path.join(path, name)))
  return sorted(found)


def read_stream(path: str) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
  """Yields (step, batch) for every committed batch of the stream at ``path``, in step order.

  Arrays come back with the dtype, shape and bytes they were appended with.
  """
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no stream directory at {path}")
  for step, _ in _committed(path):
    yield step, read_stream_batch(path, step)


def stream_steps(path: str) -> list[int]:
  """The steps of every committed batch of the stream at ``path``, ascending."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no stream directory at {path}")
  return [step for step, _ in _committed(path)]


def read_stream_batch(path: str, step: int) -> dict[str, np.ndarray]:
  """The committed batch of one ``step`` of the stream at ``path``."""
  file_path = os.path.join(path, f"batch-{step:010d}.tfrecord")
  if not os.path.exists(file_path):
    raise FileNotFoundError(f"stream {path} has no committed batch for step {step}")
  records = list(_read_records(file_path))
  if len(records) != 1:
    raise schema.BadRecordError(file_path, "?", "<file>", f"expected 1 record, found {len(records)}")
  record_step, batch = _record_to_batch(file_path, records[0])
  if record_step != step:
    raise schema.BadRecordError(file_path, 0, "step", f"holds step {record_step}, the file name says {step}")
  return batch


class StreamWriter:
  """Appends labelled batches to the stream directory ``path``, one atomic file per batch.

  Steps must strictly increase. Reopening a directory resumes it: appends
  continue after the last committed step, and appending a step that is
  already committed raises. A run that restarts from a checkpoint taken at
  step s calls ``rollback(s)`` first, so the stream holds exactly the batches
  the resumed run trained on.
  """

  def __init__(self, path: str):
    self.path = path
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):
      # Remains of an append that was killed before its rename.
      if name.startswith(".batch-") and _TMP_MARK in name:
        os.remove(os.path.join(path, name))
    self._steps = [step for step, _ in _committed(path)]

  def committed_steps(self) -> list[int]:
    return list(self._steps)

  def append(self, step: int, batch: Mapping[str, np.ndarray]) -> None:
    """Commits ``batch`` as the record of training step ``step``."""
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
      raise ValueError(f"stream {self.path}: step must be a non-negative integer, got {step!r}")
    step = int(step)
    if step in self._steps:
      raise ValueError(f"stream {self.path}: step {step} is already committed")
    if self._steps and step < self._steps[-1]:
      raise ValueError(
          f"stream {self.path}: step {step} comes before the last committed step {self._steps[-1]}; "
          "call rollback() to rewind a stream")
    _write_records_atomically(
        os.path.join(self.path, f"batch-{step:010d}.tfrecord"), [_batch_to_record(step, batch)])
    self._steps.append(step)

  def rollback(self, to_step: int) -> list[int]:
    """Removes the committed batches of steps >= ``to_step``; returns their steps."""
    dropped = [(s, p) for s, p in _committed(self.path) if s >= to_step]
    # Newest first: an interrupted rollback still leaves a prefix of the stream.
    for _, file_path in reversed(dropped):
      os.remove(file_path)
    self._steps = [s for s in self._steps if s < to_step]
    return [s for s, _ in dropped]

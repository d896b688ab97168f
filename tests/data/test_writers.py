"""Tests of t5align.data.writers: preference files and recorded online streams."""

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from t5align.data import schema
from t5align.data import writers

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _examples():
  return [
      schema.PreferenceExample("SUBREDDIT: r/x\nPOST: é ✓ 漢字\nTL;DR:", " a ", "b", 1.0, "tldr", "human",
                               "tldr:train:1"),
      schema.PreferenceExample("p2", "", "long " * 50, 0.0, "hh_helpful", "golden_pm", "id2"),
      schema.PreferenceExample("p3", "x", "y", 0.25, "mini", "proxy_pm", "mini:online:7", step=12),
  ]


def _batch(seed):
  rng = np.random.default_rng(seed)
  return {
      "prompt_tokens": rng.integers(0, 32128, size=(4, 16), dtype=np.int32),
      "winner_tokens": rng.integers(0, 32128, size=(4, 8), dtype=np.int32),
      "loser_tokens": rng.integers(0, 32128, size=(4, 8), dtype=np.int32),
      "label": rng.random(4).astype(np.float32),
      "ref_logp": rng.standard_normal((4, 2)),  # float64
      "mask": rng.random((4, 8)) < 0.5,
      "count": np.int64(seed),  # 0-d
  }


def _assert_bitwise_equal(got, want):
  assert list(got) == list(want)
  for key in want:
    w = np.asarray(want[key])
    assert got[key].dtype == w.dtype, key
    assert got[key].shape == w.shape, key
    assert got[key].tobytes() == w.tobytes(), key


# ------------------------------------------------------------- preference files


def test_examples_round_trip(tmp_path):
  path = str(tmp_path / "d_golden.tfrecord")
  assert writers.write_examples(path, _examples()) == 3
  assert writers.read_examples(path) == _examples()
  assert os.listdir(tmp_path) == ["d_golden.tfrecord"]  # no temporary file left


def test_examples_are_plain_tf_examples(tmp_path):
  # Other tools read the file with tf.data and the published feature spec.
  path = str(tmp_path / "d.tfrecord")
  writers.write_examples(path, _examples())
  rows = list(tf.data.TFRecordDataset(path).map(
      lambda r: tf.io.parse_single_example(r, writers.EXAMPLE_FEATURES)).as_numpy_iterator())
  assert sorted(rows[0]) == sorted(schema.FIELDS)
  assert rows[2]["label"] == np.float32(0.25) and rows[2]["step"] == 12
  assert rows[0]["prompt"].decode("utf-8") == _examples()[0].prompt


def test_read_examples_names_record_and_field(tmp_path):
  path = str(tmp_path / "bad.tfrecord")
  good = writers.example_to_tf_example(_examples()[0])
  bad = writers.example_to_tf_example(_examples()[1])
  del bad.features.feature["label"]
  with tf.io.TFRecordWriter(path) as w:
    w.write(good.SerializeToString())
    w.write(bad.SerializeToString())
  with pytest.raises(schema.BadRecordError) as e:
    writers.read_examples(path)
  assert (e.value.path, e.value.record, e.value.field) == (path, 1, "label")


def test_interrupted_write_leaves_no_file_and_keeps_the_old_one(tmp_path):
  path = str(tmp_path / "d.tfrecord")
  writers.write_examples(path, _examples()[:1])

  def failing():
    yield _examples()[1]
    raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    writers.write_examples(path, failing())
  assert writers.read_examples(path) == _examples()[:1]
  assert os.listdir(tmp_path) == ["d.tfrecord"]
  with pytest.raises(KeyboardInterrupt):
    writers.write_examples(str(tmp_path / "new.tfrecord"), failing())
  assert os.listdir(tmp_path) == ["d.tfrecord"]


# ------------------------------------------------------------- streams


def test_stream_round_trip_is_bitwise(tmp_path):
  path = str(tmp_path / "stream")
  writer = writers.StreamWriter(path)
  batches = {step: _batch(step) for step in (0, 1, 5)}
  for step, batch in batches.items():
    writer.append(step, batch)
  assert writer.committed_steps() == [0, 1, 5]
  got = list(writers.read_stream(path))
  assert [step for step, _ in got] == [0, 1, 5]
  for step, batch in got:
    _assert_bitwise_equal(batch, batches[step])


def test_stream_normalises_byte_order(tmp_path):
  path = str(tmp_path / "stream")
  big_endian = np.arange(6, dtype=">i4").reshape(2, 3)
  writers.StreamWriter(path).append(0, {"tokens": big_endian})
  (_, batch), = writers.read_stream(path)
  assert batch["tokens"].dtype == np.dtype("<i4")
  np.testing.assert_array_equal(batch["tokens"], [[0, 1, 2], [3, 4, 5]])


def test_stream_refuses_duplicate_and_earlier_steps_also_after_reopen(tmp_path):
  path = str(tmp_path / "stream")
  writer = writers.StreamWriter(path)
  writer.append(3, _batch(3))
  with pytest.raises(ValueError, match="already committed"):
    writer.append(3, _batch(4))
  with pytest.raises(ValueError, match="before the last committed"):
    writer.append(2, _batch(2))
  reopened = writers.StreamWriter(path)
  assert reopened.committed_steps() == [3]
  with pytest.raises(ValueError, match="already committed"):
    reopened.append(3, _batch(3))
  reopened.append(4, _batch(4))
  assert [s for s, _ in writers.read_stream(path)] == [3, 4]


def test_stream_rejects_bad_batches(tmp_path):
  writer = writers.StreamWriter(str(tmp_path / "stream"))
  with pytest.raises(ValueError, match="dtype"):
    writer.append(0, {"text": np.array(["a", "b"])})
  with pytest.raises(ValueError, match="non-negative"):
    writer.append(-1, _batch(0))
  assert writer.committed_steps() == []


def test_stream_rollback_for_resume_from_checkpoint(tmp_path):
  path = str(tmp_path / "stream")
  writer = writers.StreamWriter(path)
  for step in range(6):
    writer.append(step, _batch(step))
  assert writer.rollback(4) == [4, 5]
  assert writers.StreamWriter(path).committed_steps() == [0, 1, 2, 3]
  writer.append(4, _batch(40))
  (step, batch), = [(s, b) for s, b in writers.read_stream(path) if s == 4]
  _assert_bitwise_equal(batch, _batch(40))


def test_torn_and_corrupt_files(tmp_path):
  path = str(tmp_path / "stream")
  writer = writers.StreamWriter(path)
  writer.append(0, _batch(0))
  whole = open(os.path.join(path, "batch-0000000000.tfrecord"), "rb").read()
  # A half-written temporary file (killed append) is invisible to readers...
  torn = os.path.join(path, ".batch-0000000001.tfrecord.tmp-123-abcd")
  with open(torn, "wb") as f:
    f.write(whole[:len(whole) // 2])
  assert [s for s, _ in writers.read_stream(path)] == [0]
  # ...and removed when a writer resumes.
  assert writers.StreamWriter(path).committed_steps() == [0]
  assert not os.path.exists(torn)
  # A damaged committed file is an error naming it, never a silently short batch.
  with open(os.path.join(path, "batch-0000000002.tfrecord"), "wb") as f:
    f.write(whole[:-3])
  with pytest.raises(schema.BadRecordError, match="batch-0000000002"):
    list(writers.read_stream(path))


_KILLED_APPEND = """
import os, sys, time
import numpy as np
from t5align.data import writers
writer = writers.StreamWriter(sys.argv[1])
for step in range(3):
  writer.append(step, {"tokens": np.full((2, 3), step, np.int32)})

def stall(src, dst):  # the file is fully written under its temporary name
  print("ready", flush=True)
  time.sleep(600)

writers.os.replace = stall
writer.append(3, {"tokens": np.full((2, 3), 3, np.int32)})
"""

_KILLED_WRITE = """
import sys, time
from t5align.data import schema, writers

def examples():
  for i in range(5):
    yield schema.PreferenceExample("p", "a", "b", 1.0, "mini", "golden_pm", str(i))
  print("ready", flush=True)
  time.sleep(600)

writers.write_examples(sys.argv[1], examples())
"""


def test_killed_processes_leave_committed_data_only(tmp_path):
  stream = str(tmp_path / "stream")
  examples_path = str(tmp_path / "d_golden.tfrecord")
  env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_PLATFORMS": "cpu"}
  procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), arg], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
           for script, arg in ((_KILLED_APPEND, stream), (_KILLED_WRITE, examples_path))]
  try:
    for proc in procs:
      assert proc.stdout.readline().strip() == "ready"
      proc.send_signal(signal.SIGKILL)
      proc.wait(timeout=30)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  # The stream: steps 0-2 committed and exact, step 3 nowhere but a temporary file.
  got = list(writers.read_stream(stream))
  assert [s for s, _ in got] == [0, 1, 2]
  for step, batch in got:
    _assert_bitwise_equal(batch, {"tokens": np.full((2, 3), step, np.int32)})
  assert any(".tmp-" in name for name in os.listdir(stream))
  resumed = writers.StreamWriter(stream)
  assert resumed.committed_steps() == [0, 1, 2]
  resumed.append(3, {"tokens": np.full((2, 3), 3, np.int32)})
  assert sorted(os.listdir(stream)) == [f"batch-{s:010d}.tfrecord" for s in range(4)]
  # The preference file: nothing under its final name.
  assert not os.path.exists(examples_path)

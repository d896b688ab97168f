"""Tests of the training loop, metrics log and progress lines.

The 'model' is a 4-d linear regression trained by Adam with RNG-dependent
gradient noise, fed by a stream of batches indexed by position, so a resumed
run only matches an uninterrupted one bitwise if params, optimizer state, RNG
and data position were all restored. Kills and SIGTERMs hit real processes
running the same toy script as the in-process reference run.
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from test_checkpoints import damage  # tests/train/ is on sys.path under pytest

import t5align
from t5align.train import checkpoints
from t5align.train import loop
from t5align.train import metrics as metrics_lib

TOTAL_STEPS = 40
SAVE_INTERVAL = 10

TOY_SCRIPT = r'''
"""Toy training run for tests/train/test_loop.py."""
import argparse
import asyncio
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from t5align.train import checkpoints, loop, metrics, state as state_lib

DIM = 4
W_TRUE = np.arange(1, DIM + 1, dtype=np.float32)
TX = optax.adam(0.3)
HANG_IN_INIT = None  # a directory: init_state (start-up) waits for its 'release'


def batch_at(index):
  rng = np.random.default_rng(index)
  x = rng.normal(size=(8, DIM)).astype(np.float32)
  y = (x @ W_TRUE + 0.1 * rng.normal(size=8)).astype(np.float32)
  return {"x": x, "y": y, "index": np.int32(index)}


class ToyData:
  """Batch i is a fixed function of i; the position is the next index."""

  def __init__(self, control_dir, hang_at):
    self.index = 0
    self.control_dir = control_dir
    self.hang_at = hang_at
    self.restored_to = []

  def next_batch(self, state):
    if self.index == self.hang_at:
      open(os.path.join(self.control_dir, "hanging"), "w").close()
      while not os.path.exists(os.path.join(self.control_dir, "release")):
        time.sleep(0.01)
    batch = batch_at(self.index)
    self.index += 1
    return batch

  def get_state(self):
    return {"index": self.index}

  def set_state(self, data_state):
    self.index = data_state["index"]

  def on_restore(self, step):
    self.restored_to.append(step)


def make_step_fn(nan_loss_at, nan_grad_at):
  @jax.jit
  def step_fn(state, batch):
    state, key = state.split_rng()

    def loss_fn(params):
      pred = batch["x"] @ params["w"] + params["b"]
      return jnp.mean((pred - batch["y"]) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    # Noise from the state's RNG: a resume that lost the RNG differs bitwise.
    grads = {"w": grads["w"] + 0.3 * jax.random.normal(key, (DIM,)),
             "b": grads["b"]}
    step = state.step + 1
    if nan_loss_at is not None:
      loss = jnp.where(step == nan_loss_at, jnp.nan, loss)
    if nan_grad_at is not None:
      grads = jax.tree.map(
          lambda g: jnp.where(step == nan_grad_at, jnp.nan, g), grads)
    return (state.apply_gradients(grads, TX),
            {"loss": loss, "batch_index": batch["index"]})

  return step_fn


def init_state():
  if HANG_IN_INIT:
    open(os.path.join(HANG_IN_INIT, "hanging"), "w").close()
    while not os.path.exists(os.path.join(HANG_IN_INIT, "release")):
      time.sleep(0.01)
  params = {"w": jnp.zeros((DIM,), jnp.float32),
            "b": jnp.zeros((), jnp.float32)}
  return state_lib.TrainState.create(params=params, tx=TX,
                                     rng=jax.random.key(0))


def block_finalize_of(step, control_dir):
  """Makes Orbax hang before it finalizes `step`, as a kill mid-save would."""
  from orbax.checkpoint._src.path import atomicity
  original = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize(self):
    if self.get_final().name == str(step):
      open(os.path.join(control_dir, "finalize_blocked"), "w").close()
      while True:
        await asyncio.sleep(1)
    await original(self)

  atomicity.AtomicRenameTemporaryPath.finalize = finalize


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--run_dir", required=True)
  parser.add_argument("--total_steps", type=int, required=True)
  parser.add_argument("--save_interval", type=int, required=True)
  parser.add_argument("--keep", type=int, default=3)
  parser.add_argument("--hang_at", type=int, default=None)
  parser.add_argument("--hang_in_init", action="store_true")
  parser.add_argument("--block_finalize_step", type=int, default=None)
  parser.add_argument("--nan_loss_at", type=int, default=None)
  parser.add_argument("--nan_grad_at", type=int, default=None)
  args = parser.parse_args(argv)
  global HANG_IN_INIT
  HANG_IN_INIT = args.run_dir if args.hang_in_init else None
  if args.block_finalize_step is not None:
    block_finalize_of(args.block_finalize_step, args.run_dir)
  data = ToyData(args.run_dir, args.hang_at)
  ckpt = checkpoints.Checkpointer(os.path.join(args.run_dir, "checkpoints"),
                                  keep=args.keep,
                                  save_interval_steps=args.save_interval)
  writer = metrics.MetricsWriter(args.run_dir, tensorboard=False)
  try:
    state = loop.train(
        run_dir=args.run_dir, total_steps=args.total_steps,
        init_state=init_state,
        abstract_state=lambda: checkpoints.abstract_tree(init_state()),
        step_fn=make_step_fn(args.nan_loss_at, args.nan_grad_at),
        data=data, checkpointer=ckpt, metrics=writer,
        progress_every_seconds=0.0)
  finally:
    writer.close()
    ckpt.close()
  return state, data


if __name__ == "__main__":
  main()
'''


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
  """The toy script, written to disk and imported (for in-process runs)."""
  path = tmp_path_factory.mktemp("toy") / "toy_train.py"
  path.write_text(TOY_SCRIPT)
  spec = importlib.util.spec_from_file_location("toy_train", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  module.PATH = str(path)
  return module


def run_args(run_dir, *extra):
  return ["--run_dir", str(run_dir), "--total_steps", str(TOTAL_STEPS),
          "--save_interval", str(SAVE_INTERVAL), *map(str, extra)]


@pytest.fixture(scope="module")
def reference(toy, tmp_path_factory):
  """An uninterrupted in-process run: (final params, metrics records)."""
  run_dir = tmp_path_factory.mktemp("reference")
  state, data = toy.main(run_args(run_dir))
  assert data.restored_to == [0]
  params = {k: np.asarray(v) for k, v in state.params.items()}
  records = metrics_lib.read_metrics(str(run_dir))
  assert [r["step"] for r in records] == list(range(1, TOTAL_STEPS + 1))
  assert [r["batch_index"] for r in records] == list(range(TOTAL_STEPS))
  # The toy actually learns, so the comparisons below are not of constants.
  assert records[-1]["loss"] < 0.2 * records[0]["loss"]
  return params, records


def start(toy, run_dir, *extra):
  # The child imports t5align from this checkout, installed or not.
  repo_root = os.path.dirname(os.path.dirname(os.path.abspath(
      t5align.__file__)))
  python_path = os.pathsep.join(
      p for p in (repo_root, os.environ.get("PYTHONPATH")) if p)
  return subprocess.Popen(
      [sys.executable, toy.PATH, *run_args(run_dir, *extra)],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      env=dict(os.environ, PYTHONPATH=python_path))


def wait_for(path, process, timeout=60.0):
  deadline = time.monotonic() + timeout
  while not os.path.exists(path):
    if process.poll() is not None:
      raise AssertionError(f"process ended (rc {process.returncode}) before "
                           f"{path} appeared:\n{process.stdout.read()}")
    if time.monotonic() > deadline:
      process.kill()
      raise AssertionError(f"timed out waiting for {path}")
    time.sleep(0.02)


def finish(process, timeout=120):
  output, _ = process.communicate(timeout=timeout)
  return process.returncode, output


def assert_matches_reference(run_dir, reference):
  params, records = reference
  final = checkpoints.load_params(os.path.join(run_dir, "checkpoints"))
  assert set(final) == set(params)
  for name in params:
    assert np.array_equal(final[name], params[name]), name
  # Every step once, the same batches, the same losses bit for bit.
  assert metrics_lib.read_metrics(str(run_dir)) == records
  with open(os.path.join(run_dir, loop.STATUS_FILE)) as f:
    assert json.load(f) == {"status": "completed", "step": TOTAL_STEPS,
                            "total_steps": TOTAL_STEPS}


def test_sigkill_during_save_then_resume_is_bitwise_equal(toy, reference,
                                                          tmp_path):
  ckpt_dir = tmp_path / "checkpoints"
  # Orbax hangs before finalizing step 30; the loop runs on to step 40, where
  # the final save waits on 30. Then the process is killed: 30 is on disk
  # only as a temporary directory, and metrics go past the last checkpoint.
  process = start(toy, tmp_path, "--block_finalize_step", 30)
  wait_for(tmp_path / "finalize_blocked", process)
  process.kill()
  process.wait()
  leftovers = [n for n in os.listdir(ckpt_dir) if n.startswith("30.")]
  assert leftovers, os.listdir(ckpt_dir)
  assert checkpoints.list_steps(ckpt_dir) == [10, 20]
  assert metrics_lib.read_metrics(str(tmp_path))[-1]["step"] > 20

  rc, output = finish(start(toy, tmp_path))
  assert rc == 0, output
  assert "resuming from step 20" in output
  assert_matches_reference(tmp_path, reference)
  assert checkpoints.list_steps(ckpt_dir) == [20, 30, 40]
  assert sorted(os.listdir(ckpt_dir)) == ["20", "30", "40"]


@pytest.mark.parametrize(
    "kind", ["flipped", "truncated", "deleted", "data_state", "manifest_deleted"])
def test_damaged_latest_checkpoint_is_skipped_and_resume_is_bitwise_equal(
    toy, reference, tmp_path, capsys, kind):
  toy.main(run_args(tmp_path, "--total_steps", 30))
  ckpt_dir = tmp_path / "checkpoints"
  assert checkpoints.list_steps(ckpt_dir) == [10, 20, 30]
  bad = damage(ckpt_dir / "30", kind)
  capsys.readouterr()
  _, data = toy.main(run_args(tmp_path))
  output = capsys.readouterr().out
  assert data.restored_to == [20]
  (line,) = [l for l in output.splitlines() if l.startswith("damaged checkpoint")]
  assert line.startswith(f"damaged checkpoint {ckpt_dir / '30'}: {bad}: ")
  assert line.endswith(f"skipping step 30 (moved to {ckpt_dir / 'damaged' / '30'})")
  assert "resuming from step 20" in output
  assert_matches_reference(tmp_path, reference)
  assert checkpoints.list_steps(ckpt_dir) == [20, 30, 40]
  assert os.listdir(ckpt_dir / "damaged") == ["30"]


def test_sigterm_saves_current_step_and_resumes_bitwise_equal(
    toy, reference, tmp_path):
  process = start(toy, tmp_path, "--hang_at", 25)  # in the batch of step 26
  wait_for(tmp_path / "hanging", process)
  process.send_signal(signal.SIGTERM)
  (tmp_path / "release").touch()
  rc, output = finish(process)
  assert rc == loop.PREEMPTED_EXIT_CODE == 143, output
  assert "SIGTERM: saved step 26" in output
  assert checkpoints.list_steps(tmp_path / "checkpoints") == [10, 20, 26]
  with open(tmp_path / loop.STATUS_FILE) as f:
    assert json.load(f)["status"] == "preempted"

  rc, output = finish(start(toy, tmp_path))
  assert rc == 0, output
  assert "resuming from step 26" in output
  assert_matches_reference(tmp_path, reference)


@pytest.mark.parametrize("resuming", [False, True])
def test_sigterm_during_start_up_stops_at_once_as_preempted(toy, reference, tmp_path,
                                                            resuming):
  if resuming:
    toy.main(run_args(tmp_path, "--total_steps", 10))
  # init_state runs at start-up: to build a fresh state, or the restore's
  # abstract state.
  process = start(toy, tmp_path, "--hang_in_init")
  wait_for(tmp_path / "hanging", process)
  process.send_signal(signal.SIGTERM)
  (tmp_path / "release").touch()
  rc, output = finish(process)
  start_step = 10 if resuming else 0
  assert rc == loop.PREEMPTED_EXIT_CODE, output
  assert f"SIGTERM during start-up: stopping at step {start_step}" in output
  with open(tmp_path / loop.STATUS_FILE) as f:
    assert json.load(f) == {"status": "preempted", "step": start_step,
                            "total_steps": TOTAL_STEPS}
  assert checkpoints.list_steps(tmp_path / "checkpoints") == (
      [10] if resuming else [])
  assert metrics_lib.read_metrics(str(tmp_path)) == reference[1][:start_step]
  os.remove(tmp_path / "release")
  toy.main(run_args(tmp_path))
  assert_matches_reference(tmp_path, reference)


def test_an_exception_in_training_is_written_as_failed(toy, tmp_path):
  def interrupted_at_3(state, batch):
    if int(state.step) == 2:
      raise KeyboardInterrupt
    return step_fn(state, batch)

  step_fn = toy.make_step_fn(None, None)
  with checkpoints.Checkpointer(tmp_path / "c", save_interval_steps=2) as ckpt:
    writer = metrics_lib.MetricsWriter(str(tmp_path), tensorboard=False)
    with pytest.raises(KeyboardInterrupt):
      loop.train(run_dir=str(tmp_path), total_steps=5, init_state=toy.init_state,
                 abstract_state=None, step_fn=interrupted_at_3,
                 data=toy.ToyData(str(tmp_path), None), checkpointer=ckpt,
                 metrics=writer)
    writer.close()
  with open(tmp_path / loop.STATUS_FILE) as f:
    assert json.load(f) == {"status": "failed", "step": 2, "total_steps": 5,
                            "error": "KeyboardInterrupt: "}


def test_rerun_of_finished_run_does_nothing(toy, tmp_path, capsys):
  toy.main(run_args(tmp_path))
  before = metrics_lib.read_metrics(str(tmp_path))
  state, data = toy.main(run_args(tmp_path))
  assert int(state.step) == TOTAL_STEPS
  assert data.index == TOTAL_STEPS and data.restored_to == [TOTAL_STEPS]
  assert "run already at step 40" in capsys.readouterr().out
  assert metrics_lib.read_metrics(str(tmp_path)) == before


def test_sigterm_handler_is_restored(toy, tmp_path):
  def handler(signum, frame):
    del signum, frame

  previous = signal.signal(signal.SIGTERM, handler)
  try:
    toy.main(run_args(tmp_path))
    assert signal.getsignal(signal.SIGTERM) is handler
  finally:
    signal.signal(signal.SIGTERM, previous)


def test_nan_loss_raises_and_keeps_last_good_checkpoint(toy, reference,
                                                        tmp_path):
  with pytest.raises(loop.DivergenceError, match=r"step 25: loss is nan"):
    toy.main(run_args(tmp_path, "--nan_loss_at", 25))
  ckpt_dir = tmp_path / "checkpoints"
  assert checkpoints.list_steps(ckpt_dir) == [10, 20]
  assert metrics_lib.read_metrics(str(tmp_path)) == reference[1][:24]
  with open(tmp_path / loop.STATUS_FILE) as f:
    assert json.load(f) == {"status": "diverged", "step": 25,
                            "total_steps": TOTAL_STEPS}
  # The last good checkpoint restores, and resuming from it (with the bug
  # gone) reproduces the uninterrupted run.
  state, data = toy.main(run_args(tmp_path))
  assert data.restored_to == [20]
  assert_matches_reference(tmp_path, reference)


def test_nan_state_with_finite_loss_is_never_saved(toy, tmp_path):
  # Step 20's loss is finite but its update makes the params NaN; 20 is a
  # save step, so the check of the state before saving must catch it.
  with pytest.raises(loop.DivergenceError,
                     match=r"step 20: the train state holds NaN"):
    toy.main(run_args(tmp_path, "--nan_grad_at", 20))
  assert checkpoints.list_steps(tmp_path / "checkpoints") == [10]
  params = checkpoints.load_params(tmp_path / "checkpoints")
  assert all(np.isfinite(v).all() for v in params.values())


def test_on_checkpoint_and_messages(toy, tmp_path):
  saved, lines = [], []
  with checkpoints.Checkpointer(tmp_path / "c", save_interval_steps=5) as ckpt:
    writer = metrics_lib.MetricsWriter(str(tmp_path), tensorboard=False)
    state = loop.train(
        run_dir=str(tmp_path), total_steps=12, init_state=toy.init_state,
        abstract_state=None, step_fn=toy.make_step_fn(None, None),
        data=toy.ToyData(str(tmp_path), None), checkpointer=ckpt,
        metrics=writer, progress_every_seconds=3600,
        on_checkpoint=saved.append, print_fn=lines.append)
    writer.close()
  assert int(state.step) == 12
  assert saved == [5, 10, 12]
  # Only the first and the last step within the hour.
  assert [line.split(" (")[0] for line in lines] == ["step 1/12", "step 12/12"]
  assert "loss" in lines[-1] and "steps/s ETA 0s" in lines[-1]


def test_step_fn_must_advance_step(toy, tmp_path):
  def frozen_step(state, batch):
    del batch
    return state, {"loss": 1.0}

  ckpt = checkpoints.Checkpointer(tmp_path / "c", save_interval_steps=5)
  writer = metrics_lib.MetricsWriter(str(tmp_path), tensorboard=False)
  with pytest.raises(RuntimeError, match="went from 0 to 0"):
    loop.train(run_dir=str(tmp_path), total_steps=3,
               init_state=toy.init_state, abstract_state=None,
               step_fn=frozen_step, data=toy.ToyData(str(tmp_path), None),
               checkpointer=ckpt, metrics=writer)
  ckpt.close()
  writer.close()


def test_metrics_writer_truncate_and_torn_line(tmp_path):
  writer = metrics_lib.MetricsWriter(str(tmp_path), tensorboard=False)
  for step in range(1, 6):
    writer.write(step, {"loss": np.float32(step / 2), "acc": float("nan")})
  with pytest.raises(ValueError, match="'step' is reserved"):
    writer.write(6, {"step": 1})
  with pytest.raises(ValueError, match="'loss' must be a scalar"):
    writer.write(6, {"loss": np.zeros(2)})
  writer.close()
  path = tmp_path / metrics_lib.METRICS_FILE
  lines = path.read_text().splitlines()
  assert json.loads(lines[1]) == {"step": 2, "loss": 1.0, "acc": None}
  # A kill in the middle of a write leaves a line without its newline.
  with open(path, "a") as f:
    f.write('{"step": 6, "lo')
  writer = metrics_lib.MetricsWriter(str(tmp_path), tensorboard=False)
  writer.truncate_after(3)
  writer.write(4, {"loss": 9.0})
  writer.close()
  assert [(r["step"], r["loss"]) for r in
          metrics_lib.read_metrics(str(tmp_path))] == [
              (1, 0.5), (2, 1.0), (3, 1.5), (4, 9.0)]
  # A bad line that is not the last is corruption, named by file and line.
  path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON line"):
    metrics_lib.read_metrics(str(path))
  path.write_text('{"loss": 1}\n')
  with pytest.raises(ValueError, match=r":1: field 'step'"):
    metrics_lib.read_metrics(str(tmp_path))


def test_metrics_writer_tensorboard(tmp_path):
  pytest.importorskip("tensorboard")
  writer = metrics_lib.MetricsWriter(str(tmp_path), tensorboard=True)
  writer.write(1, {"loss": 0.5})
  writer.close()
  events = os.listdir(tmp_path / metrics_lib.TENSORBOARD_DIR)
  assert any(name.startswith("events.out.tfevents") for name in events)


class FakeClock:

  def __init__(self):
    self.now = 1000.0

  def __call__(self):
    return self.now


def test_progress_lines_and_eta():
  clock, lines = FakeClock(), []
  progress = metrics_lib.Progress(4000, every_seconds=10, print_fn=lines.append,
                                  clock=clock)
  progress.start(0)
  clock.now += 4.0  # the first step (compilation) took 4 s
  progress.update(1, {"loss": 0.693147, "acc": 0.5})
  # 1 step / 4 s = 0.25 steps/s; 3999 steps left -> 15996 s = 4h26m36s.
  assert lines == ["step 1/4000 (0.0%) 0.25 steps/s ETA 4h26m36s "
                   "loss 0.6931 acc 0.5"]
  clock.now += 5.0
  progress.update(60, {"loss": 0.5})
  assert len(lines) == 1  # 5 s < every_seconds
  clock.now += 44.0  # 119 steps in the 49 s since the last line
  progress.update(120, {"loss": 0.5})
  # 119 / 49 = 2.4286 steps/s; (4000 - 120) / (119 / 49) = 1597.6 s.
  assert lines[1] == "step 120/4000 (3.0%) 2.43 steps/s ETA 26m38s loss 0.5"
  clock.now += 1.0
  progress.update(4000)  # the last step is always printed
  assert lines[2] == "step 4000/4000 (100.0%) 3880.00 steps/s ETA 0s"


def test_progress_without_start_and_durations():
  clock, lines = FakeClock(), []
  progress = metrics_lib.Progress(10, print_fn=lines.append, clock=clock)
  progress.update(1)
  assert lines == ["step 1/10 (10.0%) -- steps/s ETA --"]
  assert metrics_lib.format_duration(59.4) == "59s"
  assert metrics_lib.format_duration(60) == "1m00s"
  assert metrics_lib.format_duration(3 * 3600 + 5 * 60) == "3h05m00s"

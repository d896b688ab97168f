"""The one training loop of t5align, shared by every stage (SFT, PM, IPO, ...).

A stage supplies a jitted `step_fn(state, batch) -> (state, metrics)`, a data
source and the run's `Checkpointer` and `MetricsWriter`; `train` does the rest:

- resume: if the checkpoint directory has a checkpoint, the train state
  (params, optimizer state, step, RNG) and the data position are restored and
  training continues from `state.step`. The metrics JSONL is cut back to that
  step and the data source is told (`on_restore`), so a killed-and-restarted
  run consumes exactly the batches, and logs exactly the lines, of an
  uninterrupted one (Tang et al. App. F: one or two lost batches already
  change results).
- checkpoints every `checkpointer.save_interval_steps` and at the last step.
- SIGTERM (preemption): the current step finishes, a checkpoint of it is
  saved, and `Preempted` (a `SystemExit` with code 143 = 128 + SIGTERM) is
  raised, so an unhandled preemption ends the process with that code and no
  traceback. Rerun the same command to continue.
- divergence: a non-finite `metrics[loss_key]`, or a non-finite value in the
  state about to be saved, raises `DivergenceError`; the bad state is never
  saved, so the newest checkpoint is the last good one.

`<run_dir>/status.json` says how the last invocation ended
(`running`, `completed`, `preempted`, `diverged` or `failed`) with the step,
for launch scripts that decide whether to rerun. It is `running` only while
a process trains (or after a SIGKILL): a SIGTERM during start-up (restore or
initialisation) ends the run at once as `preempted` at the restored step, and
any other exception, KeyboardInterrupt included, is written as `failed` with
the error before it propagates.

Every step synchronises with the device (its metrics are read back), because
the divergence check must see a step's loss before that state can be saved;
a T5 step is long enough that this costs little.
"""

import json
import math
import os
import signal
import tempfile
import threading
from typing import Any, Callable, Mapping, Optional, Protocol, TypeVar, Union

import jax
import jax.numpy as jnp

from t5align.train import checkpoints as checkpoints_lib
from t5align.train import metrics as metrics_lib

State = TypeVar("State")

PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM
STATUS_FILE = "status.json"


class DataSource(Protocol):
  """Where training batches come from, with a position that is checkpointed."""

  def next_batch(self, state: Any) -> Any:
    """The next batch. Gets the current train state: an online source samples
    from the current policy."""

  def get_state(self) -> dict[str, Any]:
    """The position after the batches handed out so far, as a JSON dict."""

  def set_state(self, data_state: dict[str, Any]) -> None:
    """Moves to a position returned by `get_state`."""

  def on_restore(self, step: int) -> None:
    """Training (re)starts at `step` (0 for a fresh run), after `set_state`;
    e.g. an online source truncates its recorded stream to `step` batches."""


class DivergenceError(RuntimeError):
  """Training produced NaN or Inf; the run stopped without saving that state."""

  def __init__(self, step: int, problem: str, metrics: Mapping[str, float]):
    self.step = step
    self.metrics = dict(metrics)
    shown = ", ".join(f"{k}={v}" for k, v in self.metrics.items())
    super().__init__(f"training diverged at step {step}: {problem} "
                     f"(metrics of step {step}: {shown})")


class Preempted(SystemExit):
  """Raised after a SIGTERM, once the checkpoint of `step` is on disk."""

  def __init__(self, step: int):
    super().__init__(PREEMPTED_EXIT_CODE)
    self.step = step


class _Status:
  """Writes `status.json` atomically and remembers the step it last wrote."""

  def __init__(self, run_dir: str, total_steps: int):
    self.run_dir, self.total_steps = run_dir, total_steps
    self.step: Optional[int] = None

  def write(self, status: str, step: Optional[int], **extra: Any) -> None:
    self.step = step
    os.makedirs(self.run_dir, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=STATUS_FILE + ".", dir=self.run_dir)
    with os.fdopen(fd, "w") as f:
      json.dump({"status": status, "step": step,
                 "total_steps": self.total_steps, **extra}, f)
    os.replace(tmp_path, os.path.join(self.run_dir, STATUS_FILE))


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
           if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


class _SigtermFlag:
  """Records SIGTERMs while installed (main thread only, as Python requires)."""

  def __init__(self):
    self.requested = False
    self._previous = None
    self._installed = False

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __enter__(self) -> "_SigtermFlag":
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
      self._installed = True
    return self

  def __exit__(self, *exc_info) -> None:
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous)


def train(*, run_dir: str, total_steps: int,
          init_state: Callable[[], State],
          abstract_state: Union[Callable[[], Any], Any],
          step_fn: Callable[[State, Any], tuple[State, Mapping[str, Any]]],
          data: DataSource,
          checkpointer: checkpoints_lib.Checkpointer,
          metrics: metrics_lib.MetricsWriter,
          progress_every_seconds: float = 10.0,
          loss_key: str = "loss",
          on_checkpoint: Optional[Callable[[int], None]] = None,
          print_fn: Callable[[str], None] = print) -> State:
  """Trains until `state.step == total_steps`, resuming from a checkpoint.

  Args:
    run_dir: the run directory; `status.json` is written here.
    total_steps: the step count at which training ends.
    init_state: builds the step-0 state (called only when there is no
      checkpoint). The state is a pytree with an integer scalar `step` field,
      e.g. `t5align.train.state.TrainState`.
    abstract_state: the state's structure as jax.ShapeDtypeStruct leaves with
      the shardings to restore onto (see `checkpoints.abstract_tree`), or a
      callable returning it (called only when restoring).
    step_fn: one update: returns the new state, whose `step` must be the old
      one plus 1, and a dict of scalar metrics containing `loss_key`.
    data: the data source (see `DataSource`).
    checkpointer: the run's checkpointer; it decides the save interval.
    metrics: the run's metrics writer.
    progress_every_seconds: minimum seconds between progress lines.
    loss_key: the metric checked for NaN/Inf after every step.
    on_checkpoint: called with the step after each checkpoint save has been
      started (saves may be asynchronous: call `checkpointer.wait()` in it if
      the files must be complete).
    print_fn: where resume and progress messages go.

  Returns:
    The final state. Pending checkpoint writes have finished.

  Raises:
    DivergenceError: see module docstring.
    Preempted: after a SIGTERM; the checkpoint of the current step is saved.
  """
  status = _Status(run_dir, total_steps)
  with _SigtermFlag() as sigterm:
    try:
      return _train(status, total_steps, init_state, abstract_state, step_fn,
                    data, checkpointer, metrics, progress_every_seconds,
                    loss_key, on_checkpoint, print_fn, sigterm)
    except (DivergenceError, Preempted):
      raise
    except BaseException as e:
      # Never leave `running` behind a process that has stopped.
      status.write("failed", status.step,
                   error=f"{type(e).__name__}: {e}".splitlines()[0])
      raise
    finally:
      # Lets an in-flight save of a good state finish even when the loop
      # raises, so the newest checkpoint on disk is complete.
      checkpointer.wait()
      metrics.flush()


def _train(status, total_steps, init_state, abstract_state, step_fn, data,
           checkpointer, metrics, progress_every_seconds, loss_key,
           on_checkpoint, print_fn, sigterm):
  """`train` inside its signal handler and cleanup."""
  restored = None
  if checkpointer.latest_step() is not None:
    abstract = abstract_state() if callable(abstract_state) else abstract_state
    restored = checkpointer.restore_newest_intact(abstract_state=abstract,
                                                  report=print_fn)
    if restored is None:
      print_fn(f"no intact checkpoint left in {checkpointer.directory}; "
               "starting from step 0")
  if restored is not None:
    state, data_state = restored
    data.set_state(data_state)
    step = int(state.step)
    print_fn(f"resuming from step {step} ({checkpointer.directory})")
  else:
    state = init_state()
    step = int(state.step)
  data.on_restore(step)
  metrics.truncate_after(step)
  if step >= total_steps:
    print_fn(f"run already at step {step} >= total_steps {total_steps}")
    status.write("completed", step)
    return state
  if sigterm.requested:
    # During start-up no step was taken: the newest checkpoint (or nothing, at
    # step 0) already is this state, and a step now could outlast the grace
    # period before SIGKILL.
    print_fn(f"SIGTERM during start-up: stopping at step {step}; exiting "
             f"with code {PREEMPTED_EXIT_CODE}")
    status.write("preempted", step)
    raise Preempted(step)
  status.write("running", step)

  progress = metrics_lib.Progress(total_steps,
                                  every_seconds=progress_every_seconds,
                                  print_fn=print_fn)
  progress.start(step)
  while step < total_steps:
    new_state, step_metrics = step_fn(state, data.next_batch(state))
    values = {name: metrics_lib.to_float(name, value)
              for name, value in jax.device_get(dict(step_metrics)).items()}
    new_step = int(new_state.step)
    if new_step != step + 1:
      raise RuntimeError(f"step_fn must advance state.step by exactly 1; it "
                         f"went from {step} to {new_step}")
    if loss_key not in values:
      raise KeyError(f"step_fn metrics have no {loss_key!r} (loss_key); "
                     f"got {sorted(values)}")
    if not math.isfinite(values[loss_key]):
      status.write("diverged", new_step)
      raise DivergenceError(new_step, f"{loss_key} is {values[loss_key]}",
                            values)
    state, step = new_state, new_step
    status.step = step  # what a `failed` status reports
    metrics.write(step, values)
    progress.update(step, values)

    if sigterm.requested or step == total_steps or checkpointer.should_save(
        step):
      if not bool(_all_finite(state)):
        status.write("diverged", step)
        raise DivergenceError(
            step, "the train state holds NaN or Inf (not saved)", values)
      saved = checkpointer.save(step, state, data.get_state(), force=True)
      if saved and on_checkpoint is not None:
        on_checkpoint(step)
    if sigterm.requested and step < total_steps:
      checkpointer.wait()
      print_fn(f"SIGTERM: saved step {step} to {checkpointer.directory}; "
               f"exiting with code {PREEMPTED_EXIT_CODE}")
      status.write("preempted", step)
      raise Preempted(step)

  checkpointer.wait()
  status.write("completed", step)
  return state

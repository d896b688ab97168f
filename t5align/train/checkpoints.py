"""Checkpoints of a training run: Orbax `CheckpointManager` with two items.

A checkpoint directory holds one Orbax step directory per saved step:

    <directory>/<step>/state/       the train state pytree (params,
                                    optimizer state, step, RNG key data)
    <directory>/<step>/data_state/  the data position as JSON, e.g.
                                    {'epoch': 1, 'index': 37} or
                                    {'stream_step': 120}

Both items of a step are written into one temporary directory that Orbax
renames to `<step>` only after everything (and its `commit_success.txt`) is on
disk, so a process killed mid-save leaves a `<step>.orbax-checkpoint-tmp*`
directory that no reader counts as a checkpoint; a later `Checkpointer` on
the directory deletes it before its first save. `list_steps` and
`load_params` let evaluation read a run without knowing its optimizer.

Saves are asynchronous by default: `save` returns once the arrays are copied
off the devices (so the next step may donate their buffers), and the write
continues in a background thread. Call `wait` (or `close`) before the process
exits; `restore` waits by itself.
"""

import json
import os
from typing import Any, Optional, Union

import jax
import numpy as np
import orbax.checkpoint as ocp

STATE = "state"
DATA_STATE = "data_state"

PathLike = Union[str, os.PathLike]


def abstract_tree(tree: Any) -> Any:
  """Replaces each array of `tree` by a ShapeDtypeStruct with its sharding.

  Builds the `abstract_state` of `Checkpointer.restore` from a state that was
  initialised (or `jax.eval_shape`d and sharded) the way training uses it.
  """

  def to_abstract(x):
    x = x if hasattr(x, "dtype") else np.asarray(x)
    return jax.ShapeDtypeStruct(x.shape, x.dtype,
                                sharding=getattr(x, "sharding", None))

  return jax.tree.map(to_abstract, tree)


def list_steps(checkpoint_dir: PathLike) -> list[int]:
  """Returns the finalized checkpoint steps under `checkpoint_dir`, ascending.

  Partial (killed or still running) saves are not listed, so this is safe to
  call on the directory of a run that is still training.
  """
  return sorted(ocp.path.step.checkpoint_steps(os.fspath(checkpoint_dir)))


def _is_step_dir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, STATE))


def load_params(path: PathLike, step: Optional[int] = None, *,
                abstract_params: Any = None) -> Any:
  """Reads only the params of a checkpoint, without the optimizer structure.

  Args:
    path: a checkpoint directory (then `step`, or the latest step, is read) or
      one step directory `<directory>/<step>` (then `step` must be None).
    step: which step of a checkpoint directory to read; None = the latest.
    abstract_params: optional tree of jax.ShapeDtypeStruct with shardings;
      given, the params are restored as jax arrays onto those shardings,
      otherwise as numpy arrays in the saved structure.

  Returns:
    The params tree.

  Raises:
    FileNotFoundError: no finalized checkpoint (or not `step`) at `path`.
  """
  path = os.path.abspath(os.fspath(path))
  if _is_step_dir(path):
    if step is not None:
      raise ValueError(f"{path} is one step directory; step={step} makes no "
                       "sense with it (pass the checkpoint directory instead)")
    step_dir = path
  else:
    steps = list_steps(path)
    if not steps:
      raise FileNotFoundError(f"no finalized checkpoint in {path}")
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise FileNotFoundError(
          f"no finalized checkpoint for step {step} in {path}; have {steps}")
    step_dir = os.path.join(path, str(step))
  state_dir = os.path.join(step_dir, STATE)
  checkpointer = ocp.PyTreeCheckpointer()
  saved = checkpointer.metadata(state_dir).item_metadata.tree
  if "params" not in saved:
    raise ValueError(f"{state_dir} has no 'params' entry; it has "
                     f"{sorted(saved)}")
  if abstract_params is None:
    item = saved["params"]
    restore_args = jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  else:
    item = abstract_params
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_params)
  restored = checkpointer.restore(
      state_dir,
      args=ocp.args.PyTreeRestore(item={"params": item},
                                  restore_args={"params": restore_args},
                                  partial_restore=True))
  return restored["params"]


class Checkpointer:
  """Saves and restores (train state, data position) pairs of one run.

  Args:
    directory: where the step directories go (created if missing).
    keep: how many most recent checkpoints to keep; older ones are deleted.
    save_interval_steps: `should_save(step)` is true every this many steps.
    async_save: write in a background thread (see module docstring).
  """

  def __init__(self, directory: PathLike, *, keep: int = 3,
               save_interval_steps: int = 200, async_save: bool = True):
    if keep < 1:
      raise ValueError(f"keep must be >= 1, got {keep}")
    if save_interval_steps < 1:
      raise ValueError(
          f"save_interval_steps must be >= 1, got {save_interval_steps}")
    self.directory = os.path.abspath(os.fspath(directory))
    self.save_interval_steps = save_interval_steps
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            # Deletes what a killed save left behind.
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
            create=True),
        item_names=(STATE, DATA_STATE))

  def latest_step(self) -> Optional[int]:
    """The newest saved step (including a save still being written), or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """All kept steps, ascending."""
    return sorted(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    """True on multiples of `save_interval_steps` not saved yet."""
    # Not Orbax's should_save: its default policy also saves the first step
    # of a directory without checkpoints.
    return (step % self.save_interval_steps == 0 and
            step not in self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict[str, Any], *,
           force: bool = False) -> bool:
    """Saves `state` and `data_state` as `step` if due (or forced).

    Returns:
      True if a save was started; False if not due or `step` already exists.
    """
    try:
      json.dumps(data_state)
    except (TypeError, ValueError) as e:
      # Checked here because the JSON write itself runs in a background thread.
      raise ValueError(
          f"data_state for step {step} is not JSON-serializable: {e}; "
          f"got {data_state!r}") from e
    due = force or step % self.save_interval_steps == 0
    if not due or step in self._manager.all_steps():
      return False
    return self._manager.save(
        step,
        args=ocp.args.Composite(**{
            STATE: ocp.args.StandardSave(state),
            DATA_STATE: ocp.args.JsonSave(data_state)}),
        force=True)  # the decision was made above, by our rule

  def wait(self) -> None:
    """Blocks until every started save is on disk and finalized."""
    self._manager.wait_until_finished()

  def restore(self, step: Optional[int] = None, *,
              abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Restores (state, data_state) of `step` (None = latest).

    Args:
      step: the step to restore; None = the latest.
      abstract_state: tree like the saved state whose leaves are
        jax.ShapeDtypeStruct; arrays are placed on their `.sharding` (see
        `abstract_tree`). Leaves without a sharding come back as numpy arrays.

    Raises:
      FileNotFoundError: nothing (or not `step`) saved in the directory.
    """
    self.wait()
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise FileNotFoundError(f"no checkpoint to restore in {self.directory}")
      step = steps[-1]
    elif step not in steps:
      raise FileNotFoundError(
          f"no checkpoint for step {step} in {self.directory}; have {steps}")
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(**{
            STATE: ocp.args.StandardRestore(abstract_state),
            DATA_STATE: ocp.args.JsonRestore()}))
    return restored[STATE], restored[DATA_STATE]

  def restore_params(self, step: Optional[int] = None, *,
                     abstract_params: Any = None) -> Any:
    """Params only of `step` (None = latest); see `load_params`."""
    self.wait()
    return load_params(self.directory, step, abstract_params=abstract_params)

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

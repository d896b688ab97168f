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

Integrity. Every step directory carries `t5align_manifest.json`: the size
and SHA-256 of each of its files, written atomically (temporary file, then
rename) right after Orbax has renamed the finished step into place, so it is
the last file of a step. Every read (`Checkpointer.restore`, `load_params`)
first checks the files against it, then refuses NaN/Inf parameters; a step
that fails raises `DamagedCheckpointError`, naming the step directory, the
file (or parameter) and what is wrong. `Checkpointer.restore_newest_intact`,
which the training loop resumes with, reports a damaged step, moves it to
`<directory>/damaged/` and tries the next older one.

A step without a manifest is taken as written before manifests existed when
no older step of its directory has one: its values are checked for NaN/Inf
only, with a warning. A step without a manifest after one that has one is an
incomplete save (killed between Orbax's rename and the manifest) or has lost
its manifest, and is damaged.

Saves are asynchronous by default: `save` returns once the arrays are copied
off the devices (so the next step may donate their buffers), and the write
continues in a background thread. Call `wait` (or `close`) before the process
exits; `restore` waits by itself.
"""

import hashlib
import json
import logging
import os
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

STATE = "state"
DATA_STATE = "data_state"
MANIFEST = "t5align_manifest.json"
DAMAGED_SUBDIR = "damaged"
_MANIFEST_FORMAT = 1

PathLike = Union[str, os.PathLike]

_log = logging.getLogger(__name__)


class DamagedCheckpointError(Exception):
  """A checkpoint step that must not be used.

  Its files differ from its manifest (changed, truncated or missing), the
  manifest itself is missing or unreadable, or a parameter holds NaN/Inf.

  Attributes:
    step_dir: the step directory, e.g. `<run>/checkpoints/300`.
    file: the file relative to `step_dir`, or the parameter, that is wrong.
    problem: what is wrong with it.
  """

  def __init__(self, step_dir: str, file: str, problem: str):
    self.step_dir, self.file, self.problem = step_dir, file, problem
    super().__init__(f"damaged checkpoint {step_dir}: {file}: {problem}")


def _sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(step_dir: PathLike) -> None:
  """Writes the manifest of every file now in `step_dir` (atomically)."""
  step_dir = os.fspath(step_dir)
  files = {}
  for root, _, names in os.walk(step_dir):
    for name in names:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, step_dir)
      if rel != MANIFEST:
        files[rel] = {"size": os.path.getsize(path), "sha256": _sha256(path)}
  tmp = os.path.join(step_dir, f"{MANIFEST}.tmp-{os.getpid()}")
  with open(tmp, "w") as f:
    json.dump({"format": _MANIFEST_FORMAT,
               "files": dict(sorted(files.items()))}, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(step_dir, MANIFEST))


def _read_manifest(step_dir: str) -> Optional[dict[str, dict[str, Any]]]:
  """The `files` table of `step_dir`'s manifest; None if it has none."""
  path = os.path.join(step_dir, MANIFEST)
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      manifest = json.load(f)
    files = manifest["files"]
    for rel, entry in files.items():
      # Only plain relative paths inside the step: a manifest never makes
      # the reader look elsewhere.
      if (os.path.isabs(rel) or os.path.normpath(rel) != rel or
          rel.startswith("..")):
        raise ValueError(f"file name {rel!r} is outside the step")
      if not (isinstance(entry["size"], int) and
              isinstance(entry["sha256"], str)):
        raise ValueError(f"entry of {rel!r} is not {{size, sha256}}")
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise DamagedCheckpointError(step_dir, MANIFEST,
                                 f"unreadable ({type(e).__name__}: {e})") from e
  return files


def _has_manifest(checkpoint_dir: str, step: int) -> bool:
  return os.path.exists(os.path.join(checkpoint_dir, str(step), MANIFEST))


def verify_step(checkpoint_dir: PathLike, step: int) -> bool:
  """Checks the files of step `step` of `checkpoint_dir` against its manifest.

  Returns:
    True if verified; False for a step written before manifests existed
    (see the module docstring), whose values still need the NaN/Inf check.

  Raises:
    DamagedCheckpointError: a file is missing, has another size or other
      bytes than when it was saved, or the manifest is missing or unreadable.
  """
  checkpoint_dir = os.fspath(checkpoint_dir)
  older = [s for s in list_steps(checkpoint_dir)
           if s < step and _has_manifest(checkpoint_dir, s)]
  return _verify_step_dir(os.path.join(checkpoint_dir, str(step)),
                          older[-1] if older else None)


def _verify_step_dir(step_dir: str, older_with_manifest: Optional[int]) -> bool:
  files = _read_manifest(step_dir)
  if files is None:
    if older_with_manifest is not None:
      raise DamagedCheckpointError(
          step_dir, MANIFEST,
          f"missing although step {older_with_manifest} has one: the save "
          "did not complete or the file was deleted")
    return False
  for rel, entry in files.items():
    path = os.path.join(step_dir, rel)
    if not os.path.isfile(path):
      raise DamagedCheckpointError(step_dir, rel, "missing")
    size = os.path.getsize(path)
    if size != entry["size"]:
      raise DamagedCheckpointError(
          step_dir, rel, f"{size} bytes, the manifest says {entry['size']} "
          "(truncated or overwritten)")
    if _sha256(path) != entry["sha256"]:
      raise DamagedCheckpointError(
          step_dir, rel, "SHA-256 differs from the manifest (the bytes "
          "changed after the save)")
  return True


@jax.jit
def _finite_flags(leaves: list[jax.Array]) -> jax.Array:
  return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def _check_finite(tree: Any, step_dir: str, prefix: str) -> None:
  """Raises DamagedCheckpointError naming the first leaf holding NaN/Inf."""
  leaves = [(path, x) for path, x in jax.tree_util.tree_flatten_with_path(
      tree)[0] if np.issubdtype(x.dtype, np.inexact)]
  on_device = [(path, x) for path, x in leaves if isinstance(x, jax.Array)]
  flags = {}
  if on_device:
    flags.update(zip((jax.tree_util.keystr(p) for p, _ in on_device),
                     np.asarray(_finite_flags([x for _, x in on_device]))))
  for path, x in leaves:
    name = jax.tree_util.keystr(path)
    if not flags.get(name, True) or (
        not isinstance(x, jax.Array) and not np.isfinite(x).all()):
      raise DamagedCheckpointError(step_dir, f"{prefix}{name}",
                                   "holds NaN or Inf")


def _unverified_note(step_dir: str) -> str:
  return (f"checkpoint {step_dir} has no {MANIFEST} (written before "
          "t5align checksummed checkpoints): its values were checked for "
          "NaN/Inf only")


class _ManifestedRename(ocp.path.atomicity.AtomicRenameTemporaryPath):
  """Orbax's atomic rename of a finished save, then the step's manifest.

  Orbax uses this class for the step directory and for each item directory
  inside it; only step directories (named by their number) get a manifest.
  """

  async def finalize(self):
    await super().finalize()
    final = self.get_final()
    if final.name.isdigit():
      write_manifest(final)


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
  return (os.path.isdir(os.path.join(path, STATE)) or
          os.path.isfile(os.path.join(path, MANIFEST)))


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
    DamagedCheckpointError: the step's files differ from its manifest, or its
      params hold NaN/Inf (see the module docstring).
  """
  path = os.path.abspath(os.fspath(path))
  if _is_step_dir(path):
    if step is not None:
      raise ValueError(f"{path} is one step directory; step={step} makes no "
                       "sense with it (pass the checkpoint directory instead)")
    step_dir = path
    name = os.path.basename(path)
    # A step directory of a run is judged with its siblings (see the module
    # docstring); one copied elsewhere on its own.
    verified = (verify_step(os.path.dirname(path), int(name)) if name.isdigit()
                else _verify_step_dir(path, None))
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
    verified = verify_step(path, step)
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
  _check_finite(restored["params"], step_dir, f"{STATE}/params")
  if not verified:
    _log.warning(_unverified_note(step_dir))
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
            temporary_path_class=_ManifestedRename,
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

  def restore(self, step: Optional[int] = None, *, abstract_state: Any,
              report: Callable[[str], None] = _log.warning
              ) -> tuple[Any, dict[str, Any]]:
    """Restores (state, data_state) of `step` (None = latest), verified.

    Args:
      step: the step to restore; None = the latest.
      abstract_state: tree like the saved state whose leaves are
        jax.ShapeDtypeStruct; arrays are placed on their `.sharding` (see
        `abstract_tree`). Leaves without a sharding come back as numpy arrays.
      report: gets the warning about a step without a manifest.

    Raises:
      FileNotFoundError: nothing (or not `step`) saved in the directory.
      DamagedCheckpointError: see the module docstring.
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
    verified = verify_step(self.directory, step)
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(**{
            STATE: ocp.args.StandardRestore(abstract_state),
            DATA_STATE: ocp.args.JsonRestore()}))
    step_dir = os.path.join(self.directory, str(step))
    _check_finite(restored[STATE], step_dir, STATE)
    if not verified:
      report(_unverified_note(step_dir))
    return restored[STATE], restored[DATA_STATE]

  def restore_newest_intact(
      self, *, abstract_state: Any, report: Callable[[str], None]
  ) -> Optional[tuple[Any, dict[str, Any]]]:
    """(state, data_state) of the newest step that passes `restore`'s checks.

    Each damaged newer step is reported in one line and moved to
    `<directory>/damaged/`, so that it is neither retried nor counted as a
    kept checkpoint, and the run saves that step again when it gets there.

    Returns:
      The restored pair, or None when no intact step is left.
    """
    self.wait()
    for step in reversed(self.all_steps()):
      try:
        return self.restore(step, abstract_state=abstract_state, report=report)
      except DamagedCheckpointError as e:
        moved_to = self._set_aside(step)
        report(f"{e}; skipping step {step} (moved to {moved_to})")
    return None

  def _set_aside(self, step: int) -> str:
    damaged_dir = os.path.join(self.directory, DAMAGED_SUBDIR)
    target = os.path.join(damaged_dir, str(step))
    suffix = 0
    while os.path.exists(target):
      suffix += 1
      target = os.path.join(damaged_dir, f"{step}.{suffix}")
    if jax.process_index() == 0:
      os.makedirs(damaged_dir, exist_ok=True)
      os.rename(os.path.join(self.directory, str(step)), target)
    # Every process must see the same steps before any of them saves again.
    ocp.multihost.sync_global_processes(f"t5align_set_aside_{step}")
    self._manager.reload()
    return target

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

"""Command line: ``t5align <command> --gin_file=... --gin.NAME=VALUE``.

Stage commands (``sft``, ``preference``, ``align``, ``relabel``, ``sample``,
``eval``) call the function of that name with the arguments bound by gin, in
T5X's conventions: ``--gin_file`` may repeat (later files win), ``--gin.X=V``
adds the binding ``X = V``, and ``--gin_search_paths`` lists directories for
relative gin paths and includes (the repo's ``gin/`` is always searched).
All gin files and bindings are parsed before any work starts, so a misspelt
parameter, configurable or macro (``--gin.TRAIN_STEP=3`` where the files say
``%TRAIN_STEPS``) fails at once, with the closest names; so do a required
macro left unset and an input file or directory that does not exist. The
full config is written to ``<run_dir>/config.gin``.

Errors. A failing command prints one line on stderr, ``t5align <command>:
error: ...``, naming the file, binding or field, and exits with code 1; the
Python traceback is printed only with ``--debug`` (anywhere on the command
line) or ``T5ALIGN_DEBUG=1``. A preempted run exits with 143 (docs/launch.md).

Other commands: ``t5align data prepare ...`` (dataset preparation),
``t5align report ...`` and ``t5align study ...`` (the study runner).

Multi-process runs: with ``T5ALIGN_DISTRIBUTED=auto`` every command first
joins the run through ``jax.distributed`` with the values JAX detects (Cloud
TPU VMs, SLURM, Open MPI); with ``T5ALIGN_DISTRIBUTED=1`` the values come from
``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``. The
launchers in ``launch/`` set these (docs/launch.md).
"""

import difflib
import inspect
import os
import re
import sys
import tokenize
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

DEBUG_ENV = "T5ALIGN_DEBUG"
DEBUG_FLAG = "--debug"

REPO_GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin")


class UsageError(ValueError):
  """A mistake in the command line or its gin config; the message is one line."""


def _stage_functions() -> dict[str, Callable]:
  from t5align.eval import evaluate
  from t5align.train import fixed_policy
  from t5align.train import stages
  return {**stages.STAGES, "pairs": fixed_policy.fixed_policy_pairs, "eval": evaluate.evaluate_stage}


def split_gin_args(argv: Sequence[str]) -> tuple[list[str], list[str], list[str], list[str]]:
  """Separates ``--gin_file``, ``--gin.X=V`` and ``--gin_search_paths`` from other args."""
  files, bindings, search, rest = [], [], [], []
  args = list(argv)
  i = 0
  while i < len(args):
    arg = args[i]
    if arg.startswith("--gin_file") or arg.startswith("--gin_search_paths"):
      name, _, value = arg.partition("=")
      if not value:
        if i + 1 >= len(args):
          raise SystemExit(f"{name} needs a value")
        i += 1
        value = args[i]
      if name == "--gin_file":
        files.append(value)
      else:
        search.extend(v for v in value.split(",") if v)
    elif arg.startswith("--gin."):
      binding = arg[len("--gin."):]
      if "=" not in binding:
        raise SystemExit(f"{arg}: expected --gin.NAME=VALUE")
      name, _, value = binding.partition("=")
      bindings.append(f"{name} = {value}")
    else:
      rest.append(arg)
    i += 1
  return files, bindings, search, rest


def parse_gin(files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str] = ()):
  """Parses gin files and bindings, then checks them; raises `UsageError` on a mistake.

  A mistake is a file that does not parse, a binding to an unknown configurable
  or parameter, a binding that sets a macro no file uses, or a macro that is
  used but not set. Each error names the file or ``--gin.`` argument.
  """
  import gin
  roots = [os.getcwd(), REPO_GIN_DIR, *search_paths]
  for root in roots:
    gin.add_config_file_search_path(root)
  resolved = []
  for name in files:
    found = [os.path.join(root, name) for root in roots if os.path.isfile(os.path.join(root, name))]
    if not found:
      raise UsageError(f"--gin_file={name}: not found in {', '.join(roots)}")
    resolved.append(os.path.abspath(found[0]))
  for path in resolved:
    try:
      gin.parse_config_file(path)
    except (ValueError, SyntaxError, tokenize.TokenError, ImportError) as e:
      raise UsageError(f"--gin_file={path}: {_gin_message(e)}") from e
  for binding in bindings:
    name, _, value = binding.partition(" = ")
    try:
      gin.parse_config(binding)
    except (ValueError, SyntaxError, tokenize.TokenError, ImportError) as e:
      raise UsageError(f"--gin.{name}={value}: {_gin_message(e, where=False)}") from e
  _check_macros_are_used(bindings)
  try:
    gin.finalize()
  except ValueError as e:
    unset = (re.search(r"No bindings specified for '([^']+)/gin\.macro'", str(e)) or
             re.search(r"([\w.]+)/macro\.value set to `%gin\.REQUIRED`", str(e)))
    if unset:
      raise UsageError(f"macro {unset.group(1)} is used but not set: add --gin.{unset.group(1)}=... "
                       "(each run file lists its macros in its header comment)") from e
    raise UsageError(_gin_message(e)) from e


def _one_line(text: str) -> str:
  """``text`` without gin's call-site notes, its lines joined (caret lines dropped)."""
  text = text.split("\n  In call to configurable")[0]
  lines = [line.strip() for line in text.splitlines()]
  return " | ".join(line for line in lines if line and set(line) != {"^"})


def _gin_message(e: Exception, *, where: bool = True) -> str:
  """What gin says about ``e``, in one line, with the closest valid names.

  ``where=False`` drops gin's "In bindings string line 1 ..." for an error
  whose ``--gin.`` argument the caller names.
  """
  import gin
  if isinstance(e, tokenize.TokenError):
    return f"unclosed bracket or quote (TokenError: {e.args[0]})"
  message = _one_line(f"{type(e).__name__}: {e}")
  if not where:
    message = message.split(" | In bindings string")[0]
  registry = gin.config._REGISTRY  # pylint: disable=protected-access
  param = re.search(r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'", str(e))
  unknown = re.search(r"No configurable matching '([^']+)'", str(e))
  if param:
    configurable = registry.get_match(param.group(1))
    names = list(inspect.signature(configurable.wrapped).parameters) if configurable else []
    return message + _did_you_mean(param.group(2), names)
  if unknown:
    suffixes = set()
    for selector, _ in registry.items():
      parts = selector.split(".")
      suffixes.update((parts[-1], ".".join(parts[-2:])))
    return message + _did_you_mean(unknown.group(1), suffixes)
  return message


def _did_you_mean(name: str, candidates: Iterable[str]) -> str:
  close = difflib.get_close_matches(name, sorted(set(candidates)), n=3, cutoff=0.6)
  return f" (did you mean {' or '.join(close)}?)" if close else ""


def _macros_in_config() -> tuple[set[str], set[str]]:
  """(macros set, macros used with %NAME) in the parsed gin config."""
  import gin
  config = gin.config._CONFIG  # pylint: disable=protected-access
  defined = {scope for scope, selector in config if selector == "gin.macro"}
  used = set()

  def walk(value: Any) -> None:
    if isinstance(value, gin.config.ConfigurableReference):
      scope, _, selector = value.scoped_selector.rpartition("/")
      if selector == "gin.macro":
        used.add(scope)
    elif isinstance(value, (list, tuple, set)):
      for item in value:
        walk(item)
    elif isinstance(value, dict):
      for item in value.values():
        walk(item)

  for params in config.values():
    for value in params.values():
      walk(value)
  return defined, used


def _check_macros_are_used(bindings: Sequence[str]) -> None:
  """Refuses ``--gin.NAME=V`` for a macro NAME that no file uses: gin would ignore it."""
  defined, used = _macros_in_config()
  for binding in bindings:
    name, _, value = binding.partition(" = ")
    if "." not in name and "/" not in name and name not in used:
      raise UsageError(f"--gin.{name}={value}: no gin file uses the macro {name}, so it would be "
                       f"ignored{_did_you_mean(name, (defined | used) - {name})}")


# Parameters of each stage that name inputs which must exist, checked before any work
# (a remote path, with '://', is left to the reader).
STAGE_INPUTS = {
    "sft": ("train_data", "init_checkpoint", "vocabulary_path"),
    "preference": ("train_data", "validation_data", "init_checkpoint", "vocabulary_path"),
    "align": ("sft_checkpoint", "train_data", "pm_run", "replay_stream", "vocabulary_path"),
    "relabel": ("pm_run", "input_data", "vocabulary_path"),
    "sample": ("checkpoint", "prompts_data", "vocabulary_path"),
    "pairs": ("policy_a", "policy_b", "golden_pm_run", "prompts_data", "vocabulary_path"),
    "eval": ("run_dir", "sft_checkpoint", "golden_policy_checkpoint", "golden_pm_run",
             "d_golden", "online_stream", "vocabulary_path"),
}


def _binding_name(fn: Callable, param: str) -> str:
  """``MACRO (module.fn.param)`` when ``param`` is bound to a macro, else ``module.fn.param``."""
  import gin
  selector = f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}.{param}"
  configurable = gin.config._REGISTRY.get_match(f"{fn.__module__}.{fn.__name__}")  # pylint: disable=protected-access
  value = gin.config._CONFIG.get(("", configurable.selector), {}).get(param)  # pylint: disable=protected-access
  if isinstance(value, gin.config.ConfigurableReference) and value.scoped_selector.endswith(
      "/gin.macro"):
    return f"{value.scoped_selector.split('/')[0]} ({selector})"
  return selector


def check_stage_inputs(name: str, fn: Callable, bound: Mapping[str, Any]) -> None:
  """Raises `UsageError` for an input of stage ``name`` that does not exist."""
  for param in STAGE_INPUTS.get(name, ()):
    value = bound.get(param)
    paths = [value] if isinstance(value, (str, os.PathLike)) else list(value or ())
    for path in paths:
      path = os.fspath(path)
      if "://" not in path and not os.path.exists(path):
        raise UsageError(f"{_binding_name(fn, param)} = {path!r}: no such file or directory; "
                         "point it at an existing one")
  if name == "eval":
    from t5align.train import checkpoints
    from t5align.train import stages
    run_dir = bound["run_dir"]
    nested = os.path.join(run_dir, stages.CHECKPOINT_SUBDIR)
    checkpoint_dir = nested if os.path.isdir(nested) else run_dir
    if not checkpoints.list_steps(checkpoint_dir):
      raise UsageError(f"{_binding_name(fn, 'run_dir')} = {run_dir!r}: no finalized checkpoint "
                       f"in {checkpoint_dir}, nothing to evaluate; train the run first or point "
                       "RUN_DIR at a run directory")


def run_stage(name: str, argv: Sequence[str]):
  import gin
  files, bindings, search, rest = split_gin_args(argv)
  if rest:
    raise SystemExit(f"t5align {name}: unexpected arguments {rest}; use --gin_file and "
                     "--gin.NAME=VALUE")
  if not files:
    raise SystemExit(f"t5align {name}: give at least one --gin_file (see gin/runs/{name}.gin)")
  fn = _stage_functions()[name]
  parse_gin(files, bindings, search)
  configured = gin.get_configurable(fn)
  bound = gin.get_bindings(fn)
  check_stage_inputs(name, fn, bound)
  # Evaluation writes into output_dir; it must not overwrite the policy run's config.
  run_dir = bound.get("output_dir") or bound.get("run_dir")
  if isinstance(run_dir, str):
    os.makedirs(run_dir, exist_ok=True)
    tmp = os.path.join(run_dir, f"config.gin.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
      f.write(gin.config_str())
    os.replace(tmp, os.path.join(run_dir, "config.gin"))
  return configured()


DISTRIBUTED_ENV = "T5ALIGN_DISTRIBUTED"


def init_distributed_from_env(environ: Optional[Mapping[str, str]] = None) -> bool:
  """Joins a multi-process run if ``T5ALIGN_DISTRIBUTED`` asks; returns whether it did.

  Unset, empty or ``0``: one process. ``auto``: JAX detects the coordinator,
  process count and id. ``1``: they are read from ``JAX_COORDINATOR_ADDRESS``,
  ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``. Must run before anything
  touches JAX (see ``partitioning.initialize_distributed``).
  """
  environ = os.environ if environ is None else environ
  mode = environ.get(DISTRIBUTED_ENV, "").strip().lower()
  if mode in ("", "0"):
    return False
  from t5align import partitioning
  if mode == "auto":
    return partitioning.initialize_distributed(auto_detect=True)
  if mode != "1":
    raise SystemExit(f"{DISTRIBUTED_ENV}={environ[DISTRIBUTED_ENV]!r}: expected 'auto', '1' or '0'")
  names = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
  missing = [name for name in names if not environ.get(name, "").strip()]
  if missing:
    raise SystemExit(f"{DISTRIBUTED_ENV}=1 needs {', '.join(names)} in the environment; "
                     f"missing {', '.join(missing)}")
  values = {}
  for name in names[1:]:
    try:
      values[name] = int(environ[name])
    except ValueError:
      raise SystemExit(f"{name}={environ[name]!r} is not an integer") from None
  return partitioning.initialize_distributed(
      environ["JAX_COORDINATOR_ADDRESS"].strip(), num_processes=values["JAX_NUM_PROCESSES"],
      process_id=values["JAX_PROCESS_ID"])


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs a command; a failure is one line on stderr and exit code 1 (see the module docstring)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")
  argv = [arg for arg in argv if arg != DEBUG_FLAG]
  try:
    return _main(argv)
  except Exception as e:  # pylint: disable=broad-except
    if debug:
      raise
    command = argv[0] if argv else ""
    message = str(e) if isinstance(e, UsageError) else _one_line(f"{type(e).__name__}: {e}")
    print(f"t5align {command}: error: {message} ({DEBUG_FLAG} or {DEBUG_ENV}=1 shows the "
          "traceback)", file=sys.stderr)
    return 1


def _main(argv: list[str]) -> int:
  if argv and argv[0] not in ("-h", "--help"):
    # Before _stage_functions: importing the stages already runs JAX code.
    init_distributed_from_env()
  commands = sorted([*_stage_functions(), "data", "report", "study"])
  if not argv or argv[0] in ("-h", "--help"):
    print(__doc__.strip())
    print("\ncommands: " + ", ".join(commands))
    return 0
  command, rest = argv[0], argv[1:]
  if command == "data":
    from t5align.data import prepare
    return prepare.main(rest)
  if command == "report":
    from t5align.eval import report
    return report.main(rest)
  if command == "study":
    from t5align import study
    return study.main(rest)
  if command not in _stage_functions():
    raise SystemExit(f"t5align: unknown command {command!r}; commands: {', '.join(commands)}")
  run_stage(command, rest)
  return 0

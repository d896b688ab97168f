"""Command line: ``t5align <command> --gin_file=... --gin.NAME=VALUE``.

Stage commands (``sft``, ``preference``, ``align``, ``relabel``, ``sample``,
``eval``) call the function of that name with the arguments bound by gin, in
T5X's conventions: ``--gin_file`` may repeat (later files win), ``--gin.X=V``
adds the binding ``X = V``, and ``--gin_search_paths`` lists directories for
relative gin paths and includes (the repo's ``gin/`` is always searched).
All gin files and bindings are parsed before any work starts, so a misspelt
parameter or configurable fails at once; the full config is written to
``<run_dir>/config.gin``.

Other commands: ``t5align data prepare ...`` (dataset preparation),
``t5align report ...`` and ``t5align study ...`` (the study runner).

Multi-process runs: with ``T5ALIGN_DISTRIBUTED=auto`` every command first
joins the run through ``jax.distributed`` with the values JAX detects (Cloud
TPU VMs, SLURM, Open MPI); with ``T5ALIGN_DISTRIBUTED=1`` the values come from
``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``. The
launchers in ``launch/`` set these (docs/launch.md).
"""

import os
import sys
from typing import Callable, Mapping, Optional, Sequence

REPO_GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin")


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
  """Parses gin files and bindings; raises on unknown configurables or parameters."""
  import gin
  roots = [os.getcwd(), REPO_GIN_DIR, *search_paths]
  for root in roots:
    gin.add_config_file_search_path(root)
  resolved = []
  for name in files:
    found = [os.path.join(root, name) for root in roots if os.path.isfile(os.path.join(root, name))]
    if not found:
      raise FileNotFoundError(f"gin file {name!r} not found in {roots}")
    resolved.append(os.path.abspath(found[0]))
  gin.parse_config_files_and_bindings(resolved, list(bindings), finalize_config=True)


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
  argv = list(sys.argv[1:] if argv is None else argv)
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

"""The launchers in launch/ and the T5ALIGN_DISTRIBUTED hook of the command line.

The scripts run for real under bash with stand-ins on PATH for what a laptop
lacks: a fake `gcloud` that runs the remote command locally in one home
directory per worker, a fake `srun` that runs every task in turn, a fake
`scontrol`, and a fake `t5align` that records its arguments and environment.
So the tests need neither Google Cloud nor SLURM, and check what reaches the
t5align processes, not only the printed command lines. The hook is tested
with a recording stand-in for `partitioning.initialize_distributed` and once
for real: two CPU processes joined through jax.distributed.
"""

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import types

import pytest

from t5align import cli
from t5align import partitioning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
SCRIPTS = ("local.sh", "tpu_vm.sh", "slurm.sbatch", "slurm_worker.sh")

# A t5align stand-in: writes its arguments, working directory and the
# launcher-relevant environment to $FAKE_RECORD_DIR/<JAX_PROCESS_ID or "run">.json,
# waits for SIGTERM when FAKE_WAIT is set, and exits with $FAKE_EXIT.
FAKE_T5ALIGN = r"""#!/usr/bin/env python3
import json, os, signal, sys, time
name = os.environ.get("JAX_PROCESS_ID", "run")
keys = [k for k in os.environ if k.startswith(("JAX_", "T5ALIGN_", "XLA_", "TF_NUM", "OMP_", "CUDA_"))
        or k in ("FOO", "WORKER")]
record = {"argv": sys.argv[1:], "cwd": os.getcwd(), "env": {k: os.environ[k] for k in keys}}
path = os.path.join(os.environ.get("FAKE_RECORD_DIR", os.getcwd()), name + ".json")
with open(path, "w") as f:
  json.dump(record, f)
if os.environ.get("FAKE_WAIT"):
  def stop(signum, frame):
    with open(path + ".terminated", "w") as f:
      f.write("SIGTERM")
    sys.exit(143)
  signal.signal(signal.SIGTERM, stop)
  for _ in range(600):
    time.sleep(0.1)
sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
"""

# gcloud stand-in: logs its arguments; `... ssh ... --command CMD` runs CMD with
# bash in $FAKE_HOME/worker0 and worker1 (HOME set to it), as --worker=all
# does on a two-host slice; `... scp SRC NAME:DEST` copies into both homes.
FAKE_GCLOUD = r"""#!/usr/bin/env bash
printf '%s\n' "$*" >> "$FAKE_LOG"
action="$4"; cmd=""; args=()
while (($#)); do
  case "$1" in
    --command) cmd="$2"; shift ;;
    --zone|--project) shift ;;
    --*) ;;
    *) args+=("$1") ;;
  esac
  shift
done
status=0
for w in 0 1; do
  home="$FAKE_HOME/worker$w"; mkdir -p "$home"
  if [[ "$action" == ssh ]]; then
    (cd "$home" && HOME="$home" WORKER=$w bash -c "$cmd") || status=$?
  else
    cp "${args[4]}" "$home/${args[5]#*:}"
  fi
done
exit $status
"""

# srun stand-in: runs the task command once per task with SLURM's per-task variables.
FAKE_SRUN = r"""#!/usr/bin/env bash
printf 'srun %s\n' "$*" >> "$FAKE_LOG"
while [[ "$1" == --* ]]; do shift; done
status=0
per_node="${SLURM_NTASKS_PER_NODE:-1}"
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$((i % per_node)) "$@" || status=$?
done
exit $status
"""

FAKE_SCONTROL = r"""#!/usr/bin/env bash
printf 'scontrol %s\n' "$*" >> "$FAKE_LOG"
if [[ "$1 $2" == "show hostnames" ]]; then printf 'node017\nnode018\n'; fi
"""


def _executable(path, text):
  with open(path, "w") as f:
    f.write(text)
  os.chmod(path, 0o755)
  return str(path)


def _clean_env(**extra):
  """This process's environment without launcher inputs (conftest sets XLA_FLAGS etc.)."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "TPU_", "T5ALIGN_", "JAX_", "XLA_", "CLOUDSDK_"))
         and k not in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")}
  env.update(extra)
  return env


def _bash(script, *args, env=None, check=True, cwd=ROOT):
  proc = subprocess.run(["bash", os.path.join(LAUNCH, script), *args], env=env or _clean_env(),
                        cwd=cwd, capture_output=True, text=True, timeout=60)
  if check:
    assert proc.returncode == 0, proc.stderr
  return proc


def _env_assignments(words):
  """Splits `env A=1 B=2 cmd args` into ({'A': '1', 'B': '2'}, [cmd, args...])."""
  assert words[0] == "env", words
  env, i = {}, 1
  while "=" in words[i] and not words[i].startswith(("-", "/", ".")):
    name, _, value = words[i].partition("=")
    env[name] = value
    i += 1
  return env, words[i:]


@pytest.fixture
def fakes(tmp_path):
  """A bin directory with fake gcloud/srun/scontrol/t5align first on PATH."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  records = tmp_path / "records"
  records.mkdir()
  t5align = _executable(bin_dir / "t5align", FAKE_T5ALIGN)
  _executable(bin_dir / "gcloud", FAKE_GCLOUD)
  _executable(bin_dir / "srun", FAKE_SRUN)
  _executable(bin_dir / "scontrol", FAKE_SCONTROL)
  env = _clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_LOG=str(tmp_path / "log"),
                   FAKE_RECORD_DIR=str(records), FAKE_HOME=str(tmp_path / "home"))
  return {"tmp": tmp_path, "bin": bin_dir, "records": records, "t5align": t5align, "env": env}


def _record(records, name="run"):
  with open(os.path.join(records, f"{name}.json")) as f:
    return json.load(f)


# ---------------------------------------------------------------- syntax ---

@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse_and_are_executable(script):
  path = os.path.join(LAUNCH, script)
  subprocess.run(["bash", "-n", path], check=True)
  assert os.access(path, os.X_OK)


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck(script):
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed")
  proc = subprocess.run(["shellcheck", "-S", "warning", "-s", "bash", os.path.join(LAUNCH, script)],
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout


def test_docs_and_readme_mention_every_script():
  with open(os.path.join(ROOT, "docs", "launch.md")) as f:
    docs = f.read()
  with open(os.path.join(LAUNCH, "README.md")) as f:
    readme = f.read()
  for script in SCRIPTS:
    assert f"launch/{script}" in docs
  assert "docs/launch.md" in readme


# ----------------------------------------------------------------- local ---

def test_local_dry_run_prints_env_and_forwards_arguments_verbatim(fakes):
  args = ["study", "--gin_file=experiments/mini.gin", "--gin.STUDY_DIR='/tmp/a b'", "--quick"]
  out = _bash("local.sh", "--cpu", "--threads", "1", "--devices=4", "--env", "FOO=x y",
              "--dry-run", *args, env=fakes["env"]).stdout
  env, command = _env_assignments(shlex.split(out))
  assert env == {"JAX_PLATFORMS": "cpu",
                 "XLA_FLAGS": "--xla_force_host_platform_device_count=4 "
                              "--xla_cpu_multi_thread_eigen=false",
                 "OMP_NUM_THREADS": "1", "TF_NUM_INTRAOP_THREADS": "1",
                 "TF_NUM_INTEROP_THREADS": "1", "FOO": "x y"}
  venv = os.path.join(ROOT, ".venv", "bin", "t5align")
  expected_bin = venv if os.access(venv, os.X_OK) else fakes["t5align"]
  assert command == [expected_bin, *args]


def test_local_runs_t5align_with_gpu_env_and_taskset(fakes):
  if shutil.which("taskset") is None:
    pytest.skip("taskset is not installed")
  env = dict(fakes["env"], T5ALIGN_BIN=fakes["t5align"])
  _bash("local.sh", "--gpu=1", "--cpus=0", "--", "sft", "--gin.MODEL_DIR='/r u n'", env=env)
  record = _record(fakes["records"])
  assert record["argv"] == ["sft", "--gin.MODEL_DIR='/r u n'"]
  assert record["env"]["JAX_PLATFORMS"] == "cuda" and record["env"]["CUDA_VISIBLE_DEVICES"] == "1"
  assert record["cwd"] == ROOT


def test_local_keeps_existing_xla_flags(fakes):
  env = dict(fakes["env"], XLA_FLAGS="--xla_dump_to=/tmp/d", T5ALIGN_BIN="t5align")
  out = _bash("local.sh", "--devices", "2", "--dry-run", "eval", env=env).stdout
  assert _env_assignments(shlex.split(out))[0] == {
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": "--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=2"}


@pytest.mark.parametrize("args, message", [
    (["--bogus", "sft"], "unknown launcher option '--bogus'"),
    (["--cpu"], "no t5align command"),
    (["--threads", "0", "sft"], "--threads expects a positive integer"),
    (["--gpu", "--devices=2", "sft"], "cannot be combined"),
    (["--env", "1X=2", "sft"], "--env expects NAME=VALUE"),
])
def test_local_rejects_bad_options(fakes, args, message):
  proc = _bash("local.sh", *args, env=fakes["env"], check=False)
  assert proc.returncode == 2 and message in proc.stderr


# ---------------------------------------------------------------- TPU VM ---

TPU = ["--tpu", "t5-v4-32", "--zone", "us-central2-b", "--project", "my-proj"]


def _gcloud_lines(out):
  return [shlex.split(line) for line in out.splitlines() if line.startswith("gcloud ")]


def test_tpu_run_dry_run_is_one_ssh_to_all_workers(fakes):
  args = ["sft", "--gin_file=runs/sft.gin", "--gin.MODEL_DIR='/mnt/shared/it''s'"]
  out = _bash("tpu_vm.sh", *TPU, "--env", "FOO=a b", "--dry-run", "run", "--", *args,
              env=fakes["env"]).stdout
  (words,) = _gcloud_lines(out)
  assert words[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "t5-v4-32"]
  assert words[words.index("--zone") + 1] == "us-central2-b"
  assert words[words.index("--project") + 1] == "my-proj"
  assert "--worker=all" in words
  remote = shlex.split(words[words.index("--command") + 1])
  assert remote[:3] == ["cd", "t5align", "&&"]
  env, command = _env_assignments(remote[3:])
  assert env == {"T5ALIGN_DISTRIBUTED": "auto", "FOO": "a b"}
  assert command == [".venv/bin/t5align", *args]
  assert not os.path.exists(fakes["env"]["FAKE_LOG"])  # nothing was executed


def test_tpu_run_reaches_t5align_on_every_worker(fakes):
  env = dict(fakes["env"], TPU_NAME="pod", TPU_ZONE="z", TPU_PROJECT="p")
  del env["FAKE_RECORD_DIR"]  # each worker's record goes into its own checkout
  checkouts = [fakes["tmp"] / "home" / f"worker{w}" / "t5align" for w in (0, 1)]
  for checkout in checkouts:
    (checkout / ".venv" / "bin").mkdir(parents=True)
    _executable(checkout / ".venv" / "bin" / "t5align", FAKE_T5ALIGN)
  args = ["align", "--gin.MODEL_DIR='/mnt/r u n'", "--gin.MESH_MODEL=4"]
  _bash("tpu_vm.sh", "--env", "FOO=1", "run", *args, env=env)
  for w, checkout in enumerate(checkouts):
    record = _record(checkout)
    assert record["argv"] == args and record["cwd"] == str(checkout)
    assert record["env"]["T5ALIGN_DISTRIBUTED"] == "auto" and record["env"]["FOO"] == "1"
    assert record["env"]["WORKER"] == str(w)
  with open(env["FAKE_LOG"]) as f:
    assert "ssh pod --zone z --project p --worker=all --command" in f.read()


def test_tpu_detached_run_logs_and_stop_sends_sigterm(fakes):
  env = fakes["env"]
  homes = [fakes["tmp"] / "home" / f"worker{w}" for w in (0, 1)]
  for home in homes:
    bin_dir = home / "t5align" / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    _executable(bin_dir / "t5align", FAKE_T5ALIGN)
  records = [home / "records" for home in homes]
  for r in records:
    r.mkdir()
  pids = []
  try:
    # FAKE_RECORD_DIR relative to each worker's checkout: one record per worker.
    out = _bash("tpu_vm.sh", *TPU, "--env", "FAKE_WAIT=1", "--env", "FAKE_RECORD_DIR=../records",
                "run", "--detach", "sft", "--gin_file=runs/sft.gin", env=env).stdout
    assert out.count("started pid") == 2
    for home in homes:
      pid_file = home / "t5align" / "logs" / "t5align.pid"
      pids.append(int(pid_file.read_text()))
    deadline = time.time() + 30
    while not all((r / "run.json").exists() for r in records) and time.time() < deadline:
      time.sleep(0.1)
    for r in records:
      assert json.loads((r / "run.json").read_text())["argv"] == ["sft", "--gin_file=runs/sft.gin"]
    again = _bash("tpu_vm.sh", *TPU, "run", "--detach", "sft", env=env, check=False)
    assert again.returncode != 0 and "already running" in again.stdout
    out = _bash("tpu_vm.sh", *TPU, "stop", env=env).stdout
    assert out.count("sent SIGTERM") == 2
    deadline = time.time() + 30
    while not all((r / "run.json.terminated").exists() for r in records) and time.time() < deadline:
      time.sleep(0.1)
    assert all((r / "run.json.terminated").exists() for r in records)
    assert _bash("tpu_vm.sh", *TPU, "logs", "5", env=env).stdout.count("== ") == 2
  finally:
    for pid in pids:
      try:
        os.kill(pid, 9)
      except ProcessLookupError:
        pass


def test_tpu_setup_dry_run_copies_this_checkout(fakes, tmp_path):
  env = dict(fakes["env"], TMPDIR=str(tmp_path))
  out = _bash("tpu_vm.sh", *TPU, "--dry-run", "setup", env=env).stdout
  lines = [shlex.split(line) for line in out.splitlines()]
  assert [w[0] for w in lines] == ["tar", "gcloud", "gcloud"]
  tar_cmd, scp, ssh = lines
  assert tar_cmd[:3] == ["tar", "-C", ROOT] and "--exclude=./.venv" in tar_cmd
  assert scp[4] == "scp" and scp[5] == str(tmp_path / "t5align-src.tar.gz")
  assert scp[6] == "t5-v4-32:t5align-src.tar.gz" and "--worker=all" in scp
  assert ssh[4] == "ssh" and "--worker=all" in ssh
  remote = ssh[ssh.index("--command") + 1]
  assert "tar -xzf t5align-src.tar.gz -C t5align" in remote
  assert ".venv/bin/pip install --quiet -e . 'jax[tpu]';" in remote


# A python3 stand-in for setup: `-m venv DIR` makes DIR/bin/pip and DIR/bin/python
# that log their arguments to $FAKE_LOG.
FAKE_PYTHON = r"""#!/usr/bin/env bash
[[ "$1 $2" == "-m venv" ]] || exit 3
mkdir -p "$3/bin"
for tool in pip python; do
  printf '#!/usr/bin/env bash\nprintf "%%s\\n" "$WORKER %s $*" >> "$FAKE_LOG"\n' "$tool" > "$3/bin/$tool"
  chmod +x "$3/bin/$tool"
done
"""


def test_tpu_setup_installs_a_copy_without_venv_runs_or_git(fakes, tmp_path):
  src = tmp_path / "src"
  for name in ("setup.py", "t5align/cli.py", ".venv/bin/stale", "runs/a/x", ".git/HEAD",
               "t5align/__pycache__/cli.pyc", "t5align.egg-info/PKG-INFO"):
    (src / name).parent.mkdir(parents=True, exist_ok=True)
    (src / name).write_text("x")
  python = _executable(fakes["bin"] / "fakepython", FAKE_PYTHON)
  env = dict(fakes["env"], TMPDIR=str(tmp_path))
  _bash("tpu_vm.sh", *TPU, "--source", str(src), "--python", python, "setup", env=env)
  for w in (0, 1):
    home = fakes["tmp"] / "home" / f"worker{w}"
    files = sorted(str(p.relative_to(home / "t5align")) for p in (home / "t5align").rglob("*")
                   if p.is_file())
    assert files == [".venv/bin/pip", ".venv/bin/python", "setup.py", "t5align/cli.py"]
    assert not (home / "t5align-src.tar.gz").exists()
  with open(env["FAKE_LOG"]) as f:
    log = f.read().splitlines()
  for w in (0, 1):
    assert f"{w} pip install --quiet -e . jax[tpu]" in log
  assert not list(tmp_path.glob("t5align-src.*"))  # the local tarball is removed


def test_tpu_setup_from_git_checks_out_the_ref(fakes):
  out = _bash("tpu_vm.sh", *TPU, "--repo", "https://example.org/t5align.git", "--ref", "v1",
              "--remote-dir", "code", "--python", "python3.11", "--dry-run", "setup",
              env=fakes["env"]).stdout
  (words,) = _gcloud_lines(out)
  remote = words[words.index("--command") + 1]
  assert "git clone --quiet https://example.org/t5align.git code" in remote
  assert "checkout --quiet --detach origin/v1" in remote
  assert "python3.11 -m venv .venv" in remote and "python3.11-venv" in remote


@pytest.mark.parametrize("args, message", [
    (["run", "sft"], "no TPU name"),
    (["--tpu", "x", "--zone", "z", "run", "sft"], "no project"),
    (TPU + ["run"], "run needs a t5align command"),
    (TPU + ["--worker", "every", "run", "sft"], "--worker expects"),
    (TPU + ["--source", ".", "--repo", "u", "setup"], "not both"),
    (TPU + ["launch"], "unknown subcommand 'launch'"),
])
def test_tpu_rejects_bad_invocations(fakes, args, message):
  proc = _bash("tpu_vm.sh", "--dry-run", *args, env=fakes["env"], check=False)
  assert proc.returncode == 2 and message in proc.stderr


# ----------------------------------------------------------------- SLURM ---

def _slurm_env(fakes, **extra):
  return {**fakes["env"], "SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "node[017-018]",
          "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_SUBMIT_DIR": ROOT,
          "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7", "T5ALIGN_BIN": fakes["t5align"], **extra}


def test_sbatch_directives():
  with open(os.path.join(LAUNCH, "slurm.sbatch")) as f:
    directives = [line.split(None, 1)[1].strip() for line in f if line.startswith("#SBATCH")]
  for expected in ("--ntasks-per-node=1", "--signal=TERM@120", "--requeue", "--open-mode=append"):
    assert expected in directives


def test_sbatch_dry_run_outside_slurm_is_symbolic(fakes):
  out = _bash("slurm.sbatch", "--dry-run", "align", "--gin.MESH_MODEL=8", env=fakes["env"]).stdout
  exports, srun = out.splitlines()
  assert "JAX_NUM_PROCESSES='$SLURM_NTASKS'" in exports and "T5ALIGN_DISTRIBUTED=1" in exports
  assert shlex.split(srun) == ["srun", "--kill-on-bad-exit=1",
                               os.path.join(ROOT, "launch", "slurm_worker.sh"), "align",
                               "--gin.MESH_MODEL=8"]


@pytest.mark.parametrize("use_scontrol", [True, False])
def test_sbatch_dry_run_in_a_job_resolves_the_coordinator(fakes, use_scontrol):
  env = _slurm_env(fakes, SLURM_JOB_NODELIST="gpu[003-004,007],cpu1", SLURM_CPUS_PER_TASK="48")
  if not use_scontrol:
    if shutil.which("scontrol", path=os.environ["PATH"]):
      pytest.skip("a real scontrol is installed")
    os.remove(fakes["bin"] / "scontrol")
  out = _bash("slurm.sbatch", "--dry-run", "sft", env=env).stdout
  exports = shlex.split(out.splitlines()[0])
  # 123456 mod 4096 = 576, the port JAX itself would pick for this job.
  host = "node017" if use_scontrol else "gpu003"
  assert f"JAX_COORDINATOR_ADDRESS={host}:62016" in exports and "JAX_NUM_PROCESSES=2" in exports
  assert "--cpus-per-task=48" in shlex.split(out.splitlines()[1])


def test_sbatch_runs_every_task_with_its_process_id_and_all_gpus(fakes):
  env = _slurm_env(fakes)
  _bash("slurm.sbatch", "align", "--gin.MODEL_DIR='/shared/ipo run'", env=env)
  for pid in (0, 1):
    record = _record(fakes["records"], str(pid))
    assert record["argv"] == ["align", "--gin.MODEL_DIR='/shared/ipo run'"]
    assert record["env"]["JAX_PROCESS_ID"] == str(pid)
    assert record["env"]["JAX_NUM_PROCESSES"] == "2"
    assert record["env"]["JAX_COORDINATOR_ADDRESS"] == "node017:62016"
    assert record["env"]["T5ALIGN_DISTRIBUTED"] == "1"
    assert record["env"]["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3,4,5,6,7"
  with open(env["FAKE_LOG"]) as f:
    assert "requeue" not in f.read()


def test_sbatch_requeues_after_preemption_exit_code(fakes):
  env = _slurm_env(fakes, FAKE_EXIT="143")
  proc = _bash("slurm.sbatch", "align", env=env, check=False)
  assert proc.returncode == 143 and "requeueing job 123456" in proc.stdout
  with open(env["FAKE_LOG"]) as f:
    assert "scontrol requeue 123456" in f.read().splitlines()


@pytest.mark.parametrize("extra", [{"SLURM_RESTART_COUNT": "20"}, {"T5ALIGN_REQUEUE": "0"},
                                   {"FAKE_EXIT": "1"}])
def test_sbatch_does_not_requeue(fakes, extra):
  env = _slurm_env(fakes, **{"FAKE_EXIT": "143", **extra})
  proc = _bash("slurm.sbatch", "align", env=env, check=False)
  assert proc.returncode == int(env["FAKE_EXIT"])
  with open(env["FAKE_LOG"]) as f:
    assert "requeue" not in f.read()


def test_sbatch_refuses_to_run_outside_slurm(fakes):
  proc = _bash("slurm.sbatch", "align", env=fakes["env"], check=False)
  assert proc.returncode == 2 and "not inside a SLURM job" in proc.stderr


@pytest.mark.parametrize("layout, expected", [
    ({"SLURM_NTASKS_PER_NODE": "1", "CUDA_VISIBLE_DEVICES": "4,5,6,7"}, "0,1,2,3"),
    ({"SLURM_TASKS_PER_NODE": "1(x2)", "SLURM_GPUS_ON_NODE": "2"}, "0,1"),
    ({"SLURM_NTASKS_PER_NODE": "8", "CUDA_VISIBLE_DEVICES": "3"}, "0"),
    ({"SLURM_TASKS_PER_NODE": "8(x2)", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}, "5"),
    ({"SLURM_NTASKS_PER_NODE": "1", "JAX_LOCAL_DEVICE_IDS": "2"}, "2"),
    ({"SLURM_NTASKS_PER_NODE": "1"}, None),
])
def test_worker_picks_the_gpus_of_its_process(fakes, layout, expected):
  env = dict(fakes["env"], SLURM_PROCID="13", SLURM_LOCALID="5", **layout)
  out = _bash("slurm_worker.sh", "--dry-run", "sft", "--gin.X=1", env=env).stdout
  assigned, command = _env_assignments(shlex.split(out))
  assert assigned.get("JAX_LOCAL_DEVICE_IDS") == expected
  assert assigned["JAX_PROCESS_ID"] == "13" and command[1:] == ["sft", "--gin.X=1"]


def test_worker_refuses_an_ambiguous_gpu_layout(fakes):
  env = dict(fakes["env"], SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NTASKS_PER_NODE="4",
             CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7")
  proc = _bash("slurm_worker.sh", "--dry-run", "sft", env=env, check=False)
  assert proc.returncode == 2 and "4 tasks share 8 visible GPUs" in proc.stderr


# ------------------------------------------------------- the cli.py hook ---

@pytest.fixture
def init_calls(monkeypatch):
  calls = []

  def fake(coordinator_address=None, num_processes=None, process_id=None, *, auto_detect=False):
    calls.append((coordinator_address, num_processes, process_id, auto_detect))
    return True

  monkeypatch.setattr(partitioning, "initialize_distributed", fake)
  return calls


def test_hook_auto_detects(init_calls):
  assert cli.init_distributed_from_env({"T5ALIGN_DISTRIBUTED": "auto"})
  assert init_calls == [(None, None, None, True)]


def test_hook_reads_the_three_jax_variables(init_calls):
  environ = {"T5ALIGN_DISTRIBUTED": "1", "JAX_COORDINATOR_ADDRESS": "node017:62016",
             "JAX_NUM_PROCESSES": "16", "JAX_PROCESS_ID": "3"}
  assert cli.init_distributed_from_env(environ)
  assert init_calls == [("node017:62016", 16, 3, False)]


@pytest.mark.parametrize("environ", [{}, {"T5ALIGN_DISTRIBUTED": ""}, {"T5ALIGN_DISTRIBUTED": "0"}])
def test_hook_does_nothing_for_one_process(init_calls, environ):
  assert not cli.init_distributed_from_env(environ)
  assert init_calls == []


@pytest.mark.parametrize("environ, message", [
    ({"T5ALIGN_DISTRIBUTED": "yes"}, "expected 'auto', '1' or '0'"),
    ({"T5ALIGN_DISTRIBUTED": "1", "JAX_COORDINATOR_ADDRESS": "h:1"},
     "missing JAX_NUM_PROCESSES, JAX_PROCESS_ID"),
    ({"T5ALIGN_DISTRIBUTED": "1", "JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two",
      "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES='two' is not an integer"),
])
def test_hook_rejects_bad_settings(init_calls, environ, message):
  with pytest.raises(SystemExit, match=message):
    cli.init_distributed_from_env(environ)
  assert init_calls == []


def _fake_study(monkeypatch, main):
  """Puts a stand-in `t5align.study` in place (the real one imports every stage)."""
  import t5align
  fake = types.ModuleType("t5align.study")
  fake.main = main
  monkeypatch.setitem(sys.modules, "t5align.study", fake)
  monkeypatch.setattr(t5align, "study", fake, raising=False)


def test_main_joins_before_anything_else(init_calls, monkeypatch):
  seen = []
  monkeypatch.setenv("T5ALIGN_DISTRIBUTED", "auto")
  # Importing the stages runs JAX code, after which jax.distributed refuses to start.
  monkeypatch.setattr(cli, "_stage_functions", lambda: seen.append(("stages", list(init_calls))) or {})
  _fake_study(monkeypatch, lambda rest: seen.append(("study", rest)) or 0)
  assert cli.main(["study", "--quick"]) == 0
  assert seen == [("stages", [(None, None, None, True)]), ("study", ["--quick"])]
  init_calls.clear()
  assert cli.main(["--help"]) == 0
  assert init_calls == []


# One of two processes: `t5align study` with a stand-in study module that
# reports what jax.distributed joined.
_TWO_PROCESS_WORKER = """
import sys, types
import t5align
from t5align import cli
def main(rest):
  import jax
  print("process", jax.process_index(), "of", jax.process_count(), "sees", jax.device_count(),
        "devices", flush=True)
  return 0
cli._stage_functions = lambda: {}
sys.modules["t5align.study"] = t5align.study = types.SimpleNamespace(main=main)
sys.exit(cli.main(["study"]))
"""


def test_two_processes_join_through_the_environment():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  procs = []
  for i in range(2):
    env = _clean_env(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
                     T5ALIGN_DISTRIBUTED="1", JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                     JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i), TF_CPP_MIN_LOG_LEVEL="3",
                     PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    procs.append(subprocess.Popen([sys.executable, "-c", _TWO_PROCESS_WORKER], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=180)[0])
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  for i, (proc, out) in enumerate(zip(procs, outputs)):
    assert proc.returncode == 0 and f"process {i} of 2 sees 4 devices" in out, out[-3000:]

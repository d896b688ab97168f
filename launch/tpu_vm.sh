#!/usr/bin/env bash
# Installs and runs t5align on every worker of a Cloud TPU VM (one host or a
# pod slice) with `gcloud compute tpus tpu-vm ssh --worker=all`. Documented in
# docs/launch.md.
#
#   launch/tpu_vm.sh [options] setup
#   launch/tpu_vm.sh [options] run [--detach] [--] COMMAND [t5align arguments...]
#   launch/tpu_vm.sh [options] logs [LINES]
#   launch/tpu_vm.sh [options] stop
#   launch/tpu_vm.sh [options] exec [--] SHELL_COMMAND
#
# setup  puts the code into --remote-dir on every worker, either a copy of a
#        local checkout (--source; .venv, runs/ and .git are left out) or a git
#        clone (--repo URL [--ref REF]), then makes a virtualenv there with
#        `pip install -e .` and JAX for TPU.
# run    starts `t5align COMMAND ...` on all workers at once with
#        T5ALIGN_DISTRIBUTED=auto: each process joins the slice through
#        jax.distributed, which finds the coordinator, process count and process
#        id itself on TPU VMs. --detach leaves the processes running under nohup
#        (logs/t5align.log and logs/t5align.pid in --remote-dir on each worker).
# logs   prints the last LINES (default 50) of every worker's log.
# stop   sends SIGTERM to a detached run: a training loop saves a checkpoint of
#        its current step and exits with 143; `run` with the same arguments
#        resumes from it.
# exec   runs a shell command in --remote-dir on every worker.
#
# Options (before the subcommand; --opt VALUE or --opt=VALUE):
#   --tpu NAME          TPU name (default $TPU_NAME)
#   --zone ZONE         zone (default $TPU_ZONE, then $CLOUDSDK_COMPUTE_ZONE)
#   --project PROJECT   Google Cloud project (default $TPU_PROJECT, then $CLOUDSDK_CORE_PROJECT)
#   --worker all|N      workers to address (default all)
#   --remote-dir DIR    checkout on the workers, relative to the home directory (default t5align)
#   --source PATH       setup: local directory to copy (default: the repository of this script)
#   --repo URL          setup: git URL to clone instead of copying a local directory
#   --ref REF           setup: branch, tag or commit of --repo (default: the default branch)
#   --python PYTHON     setup: interpreter for the virtualenv (default python3); current
#                       JAX needs Python >= 3.11: pass python3.11 on Ubuntu 22.04 images
#   --jax SPEC          setup: pip requirement for JAX (default 'jax[tpu]', libtpu from PyPI)
#   --env NAME=VALUE    run: extra environment variable on every worker (repeatable)
#   --gcloud-flag FLAG  extra flag for every gcloud call, e.g. --internal-ip (repeatable)
#   --dry-run           print the commands instead of running them (needs no gcloud)

set -euo pipefail

launcher="launch/tpu_vm.sh"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

tpu="${TPU_NAME:-}"
zone="${TPU_ZONE:-${CLOUDSDK_COMPUTE_ZONE:-}}"
project="${TPU_PROJECT:-${CLOUDSDK_CORE_PROJECT:-}}"
worker="all"
remote_dir="t5align"
source_dir=""
repo_url=""
ref=""
python="python3"
jax_spec="jax[tpu]"
run_env=()
gcloud_flags=()
dry_run=0

while (($#)); do
  case "$1" in
    --tpu|--zone|--project|--worker|--remote-dir|--source|--repo|--ref|--python|--jax|--env|--gcloud-flag)
      (($# >= 2)) || die "$1 needs a value"
      set -- "$1=$2" "${@:3}"
      ;;
  esac
  opt="${1%%=*}"
  value=""
  [[ "$1" != *=* ]] || value="${1#*=}"
  case "$opt" in
    -h|--help) usage ;;
    --dry-run) dry_run=1 ;;
    --tpu) tpu="$value" ;;
    --zone) zone="$value" ;;
    --project) project="$value" ;;
    --worker) worker="$value" ;;
    --remote-dir) remote_dir="$value" ;;
    --source) source_dir="$value" ;;
    --repo) repo_url="$value" ;;
    --ref) ref="$value" ;;
    --python) python="$value" ;;
    --jax) jax_spec="$value" ;;
    --env)
      [[ "$value" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env expects NAME=VALUE, got '$value'"
      run_env+=("$value")
      ;;
    --gcloud-flag) gcloud_flags+=("$value") ;;
    -*) die "unknown option '$1'; see --help" ;;
    *) break ;;
  esac
  shift
done

(($#)) || die "no subcommand given (setup, run, logs, stop or exec); see --help"
subcommand="$1"
shift

[[ -n "$tpu" ]] || die "no TPU name: pass --tpu NAME or set TPU_NAME"
[[ -n "$zone" ]] || die "no zone: pass --zone ZONE or set TPU_ZONE"
[[ -n "$project" ]] || die "no project: pass --project PROJECT or set TPU_PROJECT"
[[ "$worker" == all || "$worker" =~ ^[0-9]+(,[0-9]+)*$ ]] \
  || die "--worker expects 'all' or worker numbers such as 0 or 0,1; got '$worker'"
[[ -n "$remote_dir" ]] || die "--remote-dir must not be empty"
if [[ -n "$source_dir" && -n "$repo_url" ]]; then
  die "give either --source (copy a local directory) or --repo (git clone), not both"
fi
[[ -z "$ref" || -n "$repo_url" ]] || die "--ref needs --repo"

run() {
  if ((dry_run)); then
    quote "$@"
  else
    "$@"
  fi
}

gcloud_ssh() {
  run gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --project "$project" \
    --worker="$worker" "${gcloud_flags[@]+"${gcloud_flags[@]}"}" --command "$1"
}

dir_q="$(quote "$remote_dir")"

setup() {
  (($# == 0)) || die "setup takes no arguments (got $*)"
  local fetch
  if [[ -n "$repo_url" ]]; then
    local url_q ref_q
    url_q="$(quote "$repo_url")"
    fetch="if [ -d $dir_q/.git ]; then git -C $dir_q fetch --quiet --tags origin; else git clone --quiet $url_q $dir_q; fi"
    if [[ -n "$ref" ]]; then
      ref_q="$(quote "$ref")"
      # A branch name means the fetched remote branch, not a stale local one.
      fetch+="; git -C $dir_q checkout --quiet --detach origin/$ref_q 2>/dev/null || git -C $dir_q checkout --quiet --detach $ref_q"
    else
      fetch+="; git -C $dir_q pull --quiet --ff-only"
    fi
  else
    local src="${source_dir:-$REPO}"
    [[ -f "$src/setup.py" ]] || die "--source $src: no setup.py there; give the t5align checkout to copy"
    remote_tarball="t5align-src.tar.gz"
    # tarball is global, not local: the EXIT trap runs after this function returns.
    if ((dry_run)); then
      tarball="${TMPDIR:-/tmp}/t5align-src.tar.gz"
    else
      tarball="$(mktemp "${TMPDIR:-/tmp}/t5align-src.XXXXXX")"
      trap 'rm -f "$tarball"' EXIT
    fi
    run tar -C "$src" --exclude=./.venv --exclude=./runs --exclude=./.git --exclude=__pycache__ \
      --exclude='*.egg-info' -czf "$tarball" .
    run gcloud compute tpus tpu-vm scp "$tarball" "$tpu:$remote_tarball" --zone "$zone" \
      --project "$project" --worker="$worker" "${gcloud_flags[@]+"${gcloud_flags[@]}"}"
    fetch="mkdir -p $dir_q && tar -xzf $remote_tarball -C $dir_q && rm -f $remote_tarball"
  fi
  local py_q venv_pkg_q jax_q
  py_q="$(quote "$python")"
  venv_pkg_q="$(quote "${python##*/}-venv")"
  jax_q="$(quote "$jax_spec")"
  # Ubuntu images ship python3 without the venv module; install it only when missing.
  gcloud_ssh "set -e; $fetch; cd $dir_q; \
if [ ! -x .venv/bin/python ]; then $py_q -m venv .venv || { sudo apt-get update -q && sudo apt-get install -y -q $venv_pkg_q && $py_q -m venv .venv; }; fi; \
.venv/bin/pip install --quiet --upgrade pip; \
.venv/bin/pip install --quiet -e . $jax_q; \
.venv/bin/python -c 'import jax, t5align; print(\"t5align ready, jax\", jax.__version__)'"
}

run_t5align() {
  local detach=0
  if [[ "${1:-}" == --detach ]]; then
    detach=1
    shift
  fi
  [[ "${1:-}" != -- ]] || shift
  (($#)) || die "run needs a t5align command, e.g. run sft --gin_file=runs/sft.gin ..."
  local cmd
  cmd="$(quote env T5ALIGN_DISTRIBUTED=auto "${run_env[@]+"${run_env[@]}"}" .venv/bin/t5align "$@")"
  if ((detach)); then
    # `nohup` execs env, which execs t5align: $! is the training process itself,
    # so `stop` signals it directly.
    gcloud_ssh "cd $dir_q || exit 1; mkdir -p logs; \
if [ -f logs/t5align.pid ] && kill -0 \"\$(cat logs/t5align.pid)\" 2>/dev/null; then echo \"\$(hostname): t5align already running (pid \$(cat logs/t5align.pid))\"; exit 1; fi; \
nohup $cmd >> logs/t5align.log 2>&1 < /dev/null & echo \$! > logs/t5align.pid; echo \"\$(hostname): started pid \$!\""
  else
    gcloud_ssh "cd $dir_q && $cmd"
  fi
}

logs() {
  local lines="${1:-50}"
  [[ "$lines" =~ ^[1-9][0-9]*$ ]] || die "logs expects a line count, got '$lines'"
  gcloud_ssh "echo \"== \$(hostname)\"; tail -n $lines $dir_q/logs/t5align.log"
}

stop() {
  (($# == 0)) || die "stop takes no arguments (got $*)"
  gcloud_ssh "cd $dir_q || exit 1; pid=\$(cat logs/t5align.pid 2>/dev/null) || { echo \"\$(hostname): no detached run\"; exit 0; }; \
if ps -p \"\$pid\" -o args= | grep -q t5align; then kill -TERM \"\$pid\" && echo \"\$(hostname): sent SIGTERM to \$pid\"; \
else echo \"\$(hostname): pid \$pid is not running\"; fi"
}

exec_remote() {
  [[ "${1:-}" != -- ]] || shift
  (($#)) || die "exec needs a shell command"
  gcloud_ssh "cd $dir_q && $*"
}

case "$subcommand" in
  setup) setup "$@" ;;
  run) run_t5align "$@" ;;
  logs) logs "$@" ;;
  stop) stop "$@" ;;
  exec) exec_remote "$@" ;;
  *) die "unknown subcommand '$subcommand' (setup, run, logs, stop, exec)" ;;
esac

#!/usr/bin/env bash
# One SLURM task of launch/slurm.sbatch: sets this process's id and GPUs, then
# execs t5align (exec, so that SLURM's SIGTERM reaches the training loop).
#
#   srun launch/slurm_worker.sh COMMAND [t5align arguments...]     (from slurm.sbatch)
#   launch/slurm_worker.sh --dry-run COMMAND ...                    (print instead of exec)
#
# Exports JAX_PROCESS_ID=$SLURM_PROCID and, unless already set,
# JAX_LOCAL_DEVICE_IDS: jax.distributed, when it runs under SLURM, otherwise
# restricts each process to the single GPU numbered $SLURM_LOCALID, which is
# right for one process per GPU but would leave seven of eight GPUs idle with
# one process per node.
#   one task on the node          all visible GPUs (0..n-1)
#   one visible GPU per task      that GPU (0)
#   as many tasks as visible GPUs GPU $SLURM_LOCALID
# Visible GPUs are counted from CUDA_VISIBLE_DEVICES, else SLURM_GPUS_ON_NODE.

set -euo pipefail

launcher="launch/slurm_worker.sh"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

dry_run=0
if [[ "${1:-}" == --dry-run ]]; then
  dry_run=1
  shift
fi
(($#)) || die "no t5align command given"

[[ -n "${SLURM_PROCID:-}" ]] || die "not a SLURM task (SLURM_PROCID is not set); submit launch/slurm.sbatch with sbatch"
export JAX_PROCESS_ID="$SLURM_PROCID"

# Tasks on this node: SLURM_NTASKS_PER_NODE when given to sbatch, else the
# first count of SLURM_TASKS_PER_NODE ("8(x2),4" -> 8).
local_tasks="${SLURM_NTASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-1}}"
local_tasks="${local_tasks%%[(,]*}"

if [[ -n "${CUDA_VISIBLE_DEVICES:-}" && "${CUDA_VISIBLE_DEVICES}" != NoDevFiles ]]; then
  IFS=, read -r -a visible <<< "$CUDA_VISIBLE_DEVICES"
  num_visible="${#visible[@]}"
else
  num_visible="${SLURM_GPUS_ON_NODE:-0}"
fi

if [[ -z "${JAX_LOCAL_DEVICE_IDS:-}" ]] && ((num_visible > 0)); then
  if ((local_tasks == 1)); then
    JAX_LOCAL_DEVICE_IDS="$(seq -s, 0 $((num_visible - 1)))"
  elif ((num_visible == 1)); then
    JAX_LOCAL_DEVICE_IDS=0
  elif ((num_visible == local_tasks)); then
    JAX_LOCAL_DEVICE_IDS="${SLURM_LOCALID:?SLURM_LOCALID is not set}"
  else
    die "$local_tasks tasks share $num_visible visible GPUs on $(hostname); use one task per node," \
      "one per GPU, or set JAX_LOCAL_DEVICE_IDS for each task"
  fi
  export JAX_LOCAL_DEVICE_IDS
fi

repo="${T5ALIGN_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
if [[ -n "${T5ALIGN_BIN:-}" ]]; then
  t5align_bin="$T5ALIGN_BIN"
elif [[ -x "$repo/.venv/bin/t5align" ]]; then
  t5align_bin="$repo/.venv/bin/t5align"
elif command -v t5align >/dev/null 2>&1; then
  t5align_bin="$(command -v t5align)"
else
  die "no t5align executable: create $repo/.venv, put t5align on PATH or set T5ALIGN_BIN"
fi

if ((dry_run)); then
  quote env "JAX_PROCESS_ID=$JAX_PROCESS_ID" ${JAX_LOCAL_DEVICE_IDS:+"JAX_LOCAL_DEVICE_IDS=$JAX_LOCAL_DEVICE_IDS"} \
    "$t5align_bin" "$@"
  exit 0
fi
exec "$t5align_bin" "$@"

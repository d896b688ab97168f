#!/usr/bin/env bash
# Runs one t5align command (a stage, the study, data preparation) on this
# machine: CPU, or one GPU. Documented in docs/launch.md.
#
#   launch/local.sh [launcher options] [--] COMMAND [t5align arguments...]
#
#   launch/local.sh --cpu study --gin_file=experiments/mini.gin --quick
#   launch/local.sh --gpu=0 sft --gin_file=runs/sft.gin --gin.MODEL_DIR="'/tmp/sft'" ...
#
# Launcher options (they come before COMMAND; everything from COMMAND on is
# handed to t5align unchanged):
#   --cpu                JAX_PLATFORMS=cpu
#   --gpu[=INDEX]        JAX_PLATFORMS=cuda on GPU INDEX only (CUDA_VISIBLE_DEVICES; default 0)
#   --platform=NAME      JAX_PLATFORMS=NAME (cpu, cuda, rocm, tpu)
#   --threads=N          cap host threads: OMP/TF thread pools to N; N=1 also turns off
#                        XLA's multi-threaded Eigen on CPU
#   --cpus=LIST          pin the process to these cores with taskset (e.g. 0-3)
#   --devices=N          N fake CPU devices (--xla_force_host_platform_device_count), to try
#                        data_parallel / fsdp meshes on one CPU
#   --env NAME=VALUE     extra environment variable (repeatable)
#   --dry-run            print the command instead of running it
#
# The t5align executable is $T5ALIGN_BIN if set, else the repository's
# .venv/bin/t5align if present, else `t5align` on PATH. Relative paths in the
# t5align arguments (run directories, gin files) are resolved from the current
# directory, as with a bare `t5align`.

set -euo pipefail

launcher="launch/local.sh"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

dry_run=0
platform=""
gpu_index=""
threads=""
cpus=""
devices=""
extra_env=()

# Options may be written --opt=value or --opt value.
while (($#)); do
  case "$1" in
    --platform|--threads|--cpus|--devices|--env)
      (($# >= 2)) || die "$1 needs a value"
      set -- "$1=$2" "${@:3}"
      ;;
  esac
  opt="${1%%=*}"
  value=""
  [[ "$1" != *=* ]] || value="${1#*=}"
  case "$opt" in
    -h|--help) usage ;;
    --) shift; break ;;
    --dry-run) dry_run=1 ;;
    --cpu) platform="cpu" ;;
    --gpu) platform="cuda"; gpu_index="${value:-0}" ;;
    --platform) platform="$value" ;;
    --threads) threads="$value" ;;
    --cpus) cpus="$value" ;;
    --devices) devices="$value" ;;
    --env)
      [[ "$value" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env expects NAME=VALUE, got '$value'"
      extra_env+=("$value")
      ;;
    -*) die "unknown launcher option '$1' (launcher options come before the t5align command)" ;;
    *) break ;;
  esac
  shift
done

(($#)) || die "no t5align command given (e.g. 'study --gin_file=experiments/mini.gin'); see --help"

is_count() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }
[[ -z "$threads" ]] || is_count "$threads" || die "--threads expects a positive integer, got '$threads'"
[[ -z "$devices" ]] || is_count "$devices" || die "--devices expects a positive integer, got '$devices'"
[[ -z "$gpu_index" ]] || [[ "$gpu_index" =~ ^[0-9]+(,[0-9]+)*$ ]] \
  || die "--gpu expects a GPU index, got '$gpu_index'"
if [[ -n "$devices" && -n "$platform" && "$platform" != "cpu" ]]; then
  die "--devices makes fake CPU devices; it cannot be combined with --platform=$platform"
fi

if [[ -n "${T5ALIGN_BIN:-}" ]]; then
  t5align_bin="$T5ALIGN_BIN"
elif [[ -x "$REPO/.venv/bin/t5align" ]]; then
  t5align_bin="$REPO/.venv/bin/t5align"
elif command -v t5align >/dev/null 2>&1; then
  t5align_bin="$(command -v t5align)"
else
  die "no t5align executable: create $REPO/.venv (see README.md), put t5align on PATH or set T5ALIGN_BIN"
fi

env_vars=()
[[ -z "$platform" ]] || env_vars+=("JAX_PLATFORMS=$platform")
[[ -z "$gpu_index" ]] || env_vars+=("CUDA_VISIBLE_DEVICES=$gpu_index")
if [[ -n "$devices" ]]; then
  # --devices implies CPU: fake devices exist only on the host platform.
  [[ -n "$platform" ]] || env_vars+=("JAX_PLATFORMS=cpu")
fi
xla_flags="${XLA_FLAGS:-}"
[[ -z "$devices" ]] || xla_flags="${xla_flags:+$xla_flags }--xla_force_host_platform_device_count=$devices"
if [[ "$threads" == 1 ]]; then
  xla_flags="${xla_flags:+$xla_flags }--xla_cpu_multi_thread_eigen=false"
fi
[[ "$xla_flags" == "${XLA_FLAGS:-}" ]] || env_vars+=("XLA_FLAGS=$xla_flags")
if [[ -n "$threads" ]]; then
  # seqio / tf.data and numpy keep their own pools besides XLA's.
  env_vars+=("OMP_NUM_THREADS=$threads" "TF_NUM_INTRAOP_THREADS=$threads"
             "TF_NUM_INTEROP_THREADS=$threads")
fi
env_vars+=("${extra_env[@]+"${extra_env[@]}"}")

cmd=(env "${env_vars[@]+"${env_vars[@]}"}")
[[ -z "$cpus" ]] || cmd+=(taskset -c "$cpus")
cmd+=("$t5align_bin" "$@")

if ((dry_run)); then
  printf '%q ' "${cmd[@]}" | sed 's/ $//'
  echo
  exit 0
fi
exec "${cmd[@]}"

#!/usr/bin/env bash
# Run one medjax config on several GPU nodes under SLURM: one process per node owning all its GPUs, joined by
# jax.distributed through the JAX coordinator environment.
#
#   launch/slurm_gpu.sh --config CONFIG --nodes N --gpus-per-node G [options] [-- --config.x=y ...]
#   launch/slurm_gpu.sh --grid FILTER ...       (cells of configs/grid.py, one after the other: medjax.grid run)
#   launch/slurm_gpu.sh --config configs/grid.py:model=aimv2_h,dataset=isic2019,head=linear,freeze=full \
#       --nodes 2 --gpus-per-node 8 --partition gpu --dry-run
#
# Writes an sbatch script to WORKDIR/medjax.sbatch and submits it with sbatch (--dry-run prints the script and the
# sbatch command and writes nothing). In the job: JAX_COORDINATOR_ADDRESS = the first node of the allocation and a
# port derived from the job id, JAX_LOCAL_DEVICE_IDS = all GPUs of a node; jax.distributed.initialize() takes the
# process count and index from SLURM (SLURM_NTASKS, SLURM_PROCID). srun starts
# `python -m medjax.main --config=CONFIG --workdir=WORKDIR --distributed` once per node. For a configs/grid.py cell,
# grid_cell.json is written into WORKDIR first (for `python -m medjax.report`). With --grid FILTER, srun starts
# `python -m medjax.grid run --filter FILTER --workdir-root WORKDIR --distributed` instead (finished cells skipped).
#
# The checkout, the Python environment, the data and WORKDIR must be on a filesystem all nodes share (orbax writes
# each process's checkpoint shards into WORKDIR; metrics.json is written by process 0).
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
  cat <<'EOF'
Options:
  --config CONFIG        config file[:argument], relative to the checkout
  --grid FILTER          instead of --config: the configs/grid.py cells FILTER selects (python -m medjax.grid list)
  --workdir DIR          work directory (with --grid: the root of the cells' directories), relative to the
                         checkout (default: runs/JOB_NAME)
  --nodes N              nodes (default: 2)
  --gpus-per-node G      GPUs per node (default: 8)
  --cpus-per-node C      CPU cores per node for the input pipeline (default: 32)
  --nodelist LIST        run on these nodes (sbatch --nodelist), e.g. gpu[01-02]
  --partition P          SLURM partition
  --account A            SLURM account
  --time T               time limit (default: 24:00:00)
  --job-name NAME        job name (default: medjax)
  --port PORT            coordinator port (default: 61440 + job id mod 4096, as JAX picks for SLURM)
  --env-setup CMD        shell line run on each node before python (default: activate the checkout's .venv)
  --data-dir DIR         export MEDJAX_DATA (read by configs/grid.py)
  --weights-dir DIR      export MEDJAX_WEIGHTS (read by configs/grid.py)
  --dry-run              print the sbatch script and the command, write and run nothing
  -- ARGS                --config.x=y overrides passed to medjax.main
EOF
}

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/common.sh
. "$REPO/launch/common.sh"
NODES=2
GPUS=8
CPUS=32
NODELIST=""
PARTITION=""
ACCOUNT=""
TIME="24:00:00"
JOB_NAME="medjax"
PORT=""
ENV_SETUP=""
while [[ $# -gt 0 ]]; do
  take_run_option "$@"
  if [[ $TAKEN -gt 0 ]]; then shift "$TAKEN"; continue; fi
  case "$1" in
    --nodes) need_value "$@"; NODES="$2"; shift 2 ;;
    --gpus-per-node) need_value "$@"; GPUS="$2"; shift 2 ;;
    --cpus-per-node) need_value "$@"; CPUS="$2"; shift 2 ;;
    --nodelist) need_value "$@"; NODELIST="$2"; shift 2 ;;
    --partition) need_value "$@"; PARTITION="$2"; shift 2 ;;
    --account) need_value "$@"; ACCOUNT="$2"; shift 2 ;;
    --time) need_value "$@"; TIME="$2"; shift 2 ;;
    --job-name) need_value "$@"; JOB_NAME="$2"; shift 2 ;;
    --port) need_value "$@"; PORT="$2"; shift 2 ;;
    --env-setup) need_value "$@"; ENV_SETUP="$2"; shift 2 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

CONFIG="$(check_run_args "$REPO" "$CONFIG" "$GRID" "${OVERRIDES[@]+"${OVERRIDES[@]}"}")"
CONFIG_FILE="${CONFIG%%:*}"
for n in "$NODES" "$GPUS" "$CPUS" ${PORT:+"$PORT"}; do
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "error: expected a positive integer, got $n" >&2; exit 2; }
done
WORKDIR="${WORKDIR:-runs/$JOB_NAME}"
[[ "$WORKDIR" == /* ]] || WORKDIR="$REPO/$WORKDIR"
if [[ -z "$ENV_SETUP" && -f "$REPO/.venv/bin/activate" ]]; then
  ENV_SETUP="source $(q "$REPO/.venv/bin/activate")"
fi
DEVICE_IDS="$(seq -s, 0 $((GPUS - 1)))"
# shellcheck disable=SC2016  # expanded in the job, not here
PORT_EXPR='$((SLURM_JOB_ID % 4096 + 61440))'
[[ -n "$PORT" ]] && PORT_EXPR="$PORT"

sbatch_script() {
  echo "#!/bin/bash"
  echo "#SBATCH --job-name=$(q "$JOB_NAME")"
  echo "#SBATCH --nodes=$NODES"
  echo "#SBATCH --ntasks-per-node=1"
  echo "#SBATCH --gpus-per-node=$GPUS"
  echo "#SBATCH --cpus-per-task=$CPUS"
  echo "#SBATCH --time=$TIME"
  echo "#SBATCH --chdir=$(q "$REPO")"
  echo "#SBATCH --output=$(q "$WORKDIR/slurm-%j.out")"
  [[ -z "$NODELIST" ]] || echo "#SBATCH --nodelist=$NODELIST"
  [[ -z "$PARTITION" ]] || echo "#SBATCH --partition=$PARTITION"
  [[ -z "$ACCOUNT" ]] || echo "#SBATCH --account=$ACCOUNT"
  echo "set -eo pipefail"
  [[ -z "$ENV_SETUP" ]] || printf '# shellcheck disable=SC1090,SC1091\n%s\n' "$ENV_SETUP"
  echo "set -u  # after the environment set-up: activate scripts may read unset variables"
  [[ -z "$DATA_DIR" ]] || echo "export MEDJAX_DATA=$(q "$DATA_DIR")"
  [[ -z "$WEIGHTS_DIR" ]] || echo "export MEDJAX_WEIGHTS=$(q "$WEIGHTS_DIR")"
  echo "# jax.distributed: the coordinator is the allocation's first node; every process owns all GPUs of its node"
  # no `| head -n 1`: under pipefail, scontrol's SIGPIPE would fail the job
  echo "mapfile -t NODES < <(scontrol show hostnames \"\$SLURM_JOB_NODELIST\")"
  echo "[[ -n \"\${NODES[0]:-}\" ]] || { echo \"cannot list the nodes of \$SLURM_JOB_NODELIST\" >&2; exit 1; }"
  echo "export JAX_COORDINATOR_ADDRESS=\"\${NODES[0]}:$PORT_EXPR\""
  echo "export JAX_LOCAL_DEVICE_IDS=$DEVICE_IDS"
  echo "echo \"medjax: \$SLURM_NNODES nodes (\$SLURM_JOB_NODELIST), coordinator \$JAX_COORDINATOR_ADDRESS\""
  if [[ -n "$GRID" ]]; then
    local grid=(srun --ntasks-per-node=1 --kill-on-bad-exit=1 python -m medjax.grid run --filter "$GRID"
                --workdir-root "$WORKDIR" --distributed)
    [[ ${#OVERRIDES[@]} -eq 0 ]] || grid+=(-- "${OVERRIDES[@]}")
    joinq "${grid[@]}"; echo
    return
  fi
  if [[ "$CONFIG_FILE" == "configs/grid.py" && "$CONFIG" == *:* ]]; then
    local cell=(python -m medjax.grid cell "${CONFIG#*:}" --workdir "$WORKDIR")
    [[ ${#OVERRIDES[@]} -eq 0 ]] || cell+=(-- "${OVERRIDES[@]}")
    joinq "${cell[@]}"; echo
  fi
  joinq srun --ntasks-per-node=1 --kill-on-bad-exit=1 python -m medjax.main "--config=$CONFIG" "--workdir=$WORKDIR" \
    "${OVERRIDES[@]+"${OVERRIDES[@]}"}" --distributed
  echo
}

SCRIPT="$WORKDIR/medjax.sbatch"
if [[ $DRY_RUN == 1 ]]; then
  echo "+ $(joinq mkdir -p "$WORKDIR")"
  echo "# $SCRIPT:"
  sbatch_script
  echo "+ $(joinq sbatch "$SCRIPT")"
  exit 0
fi
mkdir -p "$WORKDIR"
sbatch_script > "$SCRIPT"
echo "+ $(joinq sbatch "$SCRIPT")"
sbatch "$SCRIPT"

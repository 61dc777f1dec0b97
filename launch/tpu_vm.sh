#!/usr/bin/env bash
# Run one medjax config on a Cloud TPU VM (single host or pod slice), then copy the results back and delete the VM.
#
#   launch/tpu_vm.sh --name NAME --zone ZONE --type ACCELERATOR --config CONFIG [options] [-- --config.x=y ...]
#   launch/tpu_vm.sh ... --grid FILTER          (cells of configs/grid.py, one after the other: medjax.grid run)
#   launch/tpu_vm.sh --config configs/grid.py:model=dinov2_l,dataset=chexpert,head=linear,freeze=full \
#       --type v4-32 --zone us-central2-b --data-dir /mnt/disks/data --weights-dir /mnt/disks/weights --dry-run
#
# Steps (each printed as `+ command`; --dry-run prints them all and runs nothing):
#   1. gcloud compute tpus tpu-vm create (the VM, all its workers)
#   2. pack this checkout (git-tracked and untracked-not-ignored files), copy it to every worker, install it in a
#      Python 3.11 venv with jax[tpu] (uv fetches the interpreter: TPU images ship an older python3)
#   3. optional --setup command on every worker (mount the data, e.g. gcsfuse), then on every worker at once:
#      python -m medjax.main --config=CONFIG --workdir=WORKDIR --distributed (jax.distributed finds the other
#      workers from the TPU metadata); for a configs/grid.py cell, grid_cell.json is written first (for the report).
#      With --grid FILTER instead: python -m medjax.grid run --filter FILTER --workdir-root WORKDIR --distributed,
#      which skips the cells already finished in WORKDIR
#   4. tar the work directory on worker 0 (checkpoints left out unless --with-checkpoints), copy it back, unpack it
#      into RESULTS/<workdir name>
#   5. gcloud compute tpus tpu-vm delete (also when a step fails; --keep leaves the VM up)
#
# On a pod slice (several workers), WORKDIR must be a directory all workers share (a gcsfuse or Filestore mount made
# by --setup): orbax writes each worker's shards of a checkpoint there. Data and converted weights must be readable
# on every worker; --data-dir / --weights-dir set MEDJAX_DATA / MEDJAX_WEIGHTS, which configs/grid.py reads.
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
  cat <<'EOF'
Options:
  --name NAME            TPU VM name (default: medjax-$USER)
  --zone ZONE            zone (default: us-central2-b)
  --type TYPE            accelerator type, e.g. v4-8, v4-32, v5litepod-16 (default: v4-8)
  --version VERSION      TPU runtime image (default: tpu-ubuntu2204-base)
  --project PROJECT      GCP project (default: gcloud's)
  --spot                 create a Spot VM
  --config CONFIG        config file[:argument], relative to the checkout
  --grid FILTER          instead of --config: the configs/grid.py cells FILTER selects (python -m medjax.grid list)
  --workdir DIR          work directory on the workers (with --grid: the root of the cells' directories),
                         relative to the checkout there (default: runs/NAME)
  --results DIR          local folder the results are unpacked into (default: results)
  --data-dir DIR         MEDJAX_DATA on the workers
  --weights-dir DIR      MEDJAX_WEIGHTS on the workers
  --setup CMD            command run on every worker before the run (e.g. mount a bucket)
  --install CMD          replace the install command (run in ~ on every worker)
  --with-checkpoints     copy checkpoints back too (large)
  --keep                 do not delete the VM at the end
  --dry-run              print every command, run nothing
  -- ARGS                --config.x=y overrides passed to medjax.main
EOF
}

# `+ command` (shell-quoted) on stdout, then the command unless --dry-run.
run() {
  printf '+ %s\n' "$(joinq "$@")"
  if [[ $DRY_RUN == 0 ]]; then "$@"; fi
}

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/common.sh
. "$REPO/launch/common.sh"
NAME="medjax-${USER:-user}"
ZONE="us-central2-b"
TYPE="v4-8"
VERSION="tpu-ubuntu2204-base"
PROJECT=""
SPOT=0
RESULTS="results"
SETUP=""
INSTALL=""
WITH_CHECKPOINTS=0
KEEP=0
while [[ $# -gt 0 ]]; do
  take_run_option "$@"
  if [[ $TAKEN -gt 0 ]]; then shift "$TAKEN"; continue; fi
  case "$1" in
    --name) need_value "$@"; NAME="$2"; shift 2 ;;
    --zone) need_value "$@"; ZONE="$2"; shift 2 ;;
    --type) need_value "$@"; TYPE="$2"; shift 2 ;;
    --version) need_value "$@"; VERSION="$2"; shift 2 ;;
    --project) need_value "$@"; PROJECT="$2"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --results) need_value "$@"; RESULTS="$2"; shift 2 ;;
    --setup) need_value "$@"; SETUP="$2"; shift 2 ;;
    --install) need_value "$@"; INSTALL="$2"; shift 2 ;;
    --with-checkpoints) WITH_CHECKPOINTS=1; shift ;;
    --keep) KEEP=1; shift ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

CONFIG="$(check_run_args "$REPO" "$CONFIG" "$GRID" "${OVERRIDES[@]+"${OVERRIDES[@]}"}")"
CONFIG_FILE="${CONFIG%%:*}"
WORKDIR="${WORKDIR:-runs/$NAME}"
REMOTE_SRC="medjax"  # the checkout on every worker, relative to the home directory
PY="\$HOME/medjax-venv/bin/python"
JAX_VERSION="$(awk -F'"jax==' 'NF > 1 { split($2, v, "\""); print v[1]; exit }' "$REPO/setup.py")"
JAX_TPU="jax[tpu]${JAX_VERSION:+==$JAX_VERSION}"
DEFAULT_INSTALL="python3 -m pip install -q --user uv && python3 -m uv venv -q --python 3.11 ~/medjax-venv"
DEFAULT_INSTALL+=" && python3 -m uv pip install -q --python ~/medjax-venv/bin/python -e ~/$REMOTE_SRC $(q "$JAX_TPU")"
INSTALL="${INSTALL:-$DEFAULT_INSTALL}"

GCLOUD_FLAGS=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && GCLOUD_FLAGS+=(--project="$PROJECT")

on_workers() {  # on_workers WORKER COMMAND: run a shell command on worker(s) of the VM over gcloud ssh
  run gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_FLAGS[@]}" --worker="$1" --command="$2"
}

LOCAL_TARBALL="$(mktemp -u "${TMPDIR:-/tmp}/medjax-src.XXXXXX").tgz"
CREATED=0
finish() {
  local rc=$?
  trap - EXIT
  if [[ $CREATED == 1 ]]; then
    copy_back || { echo "warning: copying the results back failed" >&2; [[ $rc != 0 ]] || rc=1; }
    if [[ $KEEP == 1 ]]; then
      echo "# --keep: the VM $NAME stays up; delete it with:"
      echo "#   gcloud compute tpus tpu-vm delete $NAME --zone=$ZONE --quiet"
    else
      run gcloud compute tpus tpu-vm delete "$NAME" "${GCLOUD_FLAGS[@]}" --quiet || rc=1
    fi
  fi
  [[ $DRY_RUN == 1 ]] || rm -f "$LOCAL_TARBALL"
  exit "$rc"
}
copy_back() {
  local excludes="--exclude=checkpoints --exclude=best"
  [[ $WITH_CHECKPOINTS == 1 ]] && excludes=""
  local name
  name="$(basename "$WORKDIR")"
  on_workers 0 "cd ~/$REMOTE_SRC && tar -czf ~/medjax-results.tgz $excludes -C $(q "$WORKDIR") ." &&
    run mkdir -p "$RESULTS/$name" &&
    run gcloud compute tpus tpu-vm scp "$NAME:~/medjax-results.tgz" "$RESULTS/$name.tgz" "${GCLOUD_FLAGS[@]}" \
      --worker=0 &&
    run tar -xzf "$RESULTS/$name.tgz" -C "$RESULTS/$name" &&
    run rm -f "$RESULTS/$name.tgz" &&
    echo "# results in $RESULTS/$name"
}
trap finish EXIT

create=(gcloud compute tpus tpu-vm create "$NAME" "${GCLOUD_FLAGS[@]}" --accelerator-type="$TYPE" --version="$VERSION")
[[ $SPOT == 1 ]] && create+=(--spot)
run "${create[@]}"
CREATED=1

# This checkout, as git sees it (tracked + untracked-not-ignored: no .venv, no build outputs).
echo "+ git -C $(q "$REPO") ls-files -z --cached --others --exclude-standard |" \
  "tar -czf $(q "$LOCAL_TARBALL") -C $(q "$REPO") --null -T -"
if [[ $DRY_RUN == 0 ]]; then
  git -C "$REPO" ls-files -z --cached --others --exclude-standard | tar -czf "$LOCAL_TARBALL" -C "$REPO" --null -T -
fi
run gcloud compute tpus tpu-vm scp "$LOCAL_TARBALL" "$NAME:~/medjax-src.tgz" "${GCLOUD_FLAGS[@]}" --worker=all
on_workers all "set -e; rm -rf ~/$REMOTE_SRC && mkdir -p ~/$REMOTE_SRC && tar -xzf ~/medjax-src.tgz -C ~/$REMOTE_SRC \
&& $INSTALL"
[[ -n "$SETUP" ]] && on_workers all "$SETUP"

ENV_PREFIX=""
[[ -n "$DATA_DIR" ]] && ENV_PREFIX+="export MEDJAX_DATA=$(q "$DATA_DIR"); "
[[ -n "$WEIGHTS_DIR" ]] && ENV_PREFIX+="export MEDJAX_WEIGHTS=$(q "$WEIGHTS_DIR"); "
REMOTE="set -e; cd ~/$REMOTE_SRC; ${ENV_PREFIX}mkdir -p $(q "$WORKDIR"); "
if [[ -n "$GRID" ]]; then
  REMOTE+="$PY -m medjax.grid run $(joinq --filter "$GRID" --workdir-root "$WORKDIR") --distributed"
  [[ ${#OVERRIDES[@]} -eq 0 ]] || REMOTE+=" -- $(joinq "${OVERRIDES[@]}")"
  on_workers all "$REMOTE"
  exit 0
fi
if [[ "$CONFIG_FILE" == "configs/grid.py" && "$CONFIG" == *:* ]]; then
  REMOTE+="$PY -m medjax.grid cell $(q "${CONFIG#*:}") --workdir $(q "$WORKDIR")"
  [[ ${#OVERRIDES[@]} -gt 0 ]] && REMOTE+=" -- $(joinq "${OVERRIDES[@]}")"
  REMOTE+="; "
fi
REMOTE+="$PY -m medjax.main $(joinq "--config=$CONFIG" "--workdir=$WORKDIR" "${OVERRIDES[@]+"${OVERRIDES[@]}"}")"
REMOTE+=" --distributed"
on_workers all "$REMOTE"

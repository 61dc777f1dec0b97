#!/usr/bin/env bash
# The headline figures on one NVIDIA GPU in under 8 minutes, nothing downloaded (docs/planning.md, "Device check").
#
#   benchmarks/device_check.sh [--dry-run] [--wheels DIR] [--out DIR] [--budget SECONDS]
#
# ViT-B/16 and DINOv2-L/14 bf16 full fine-tuning images/s and MFU in medjax (cuDNN attention on and off) and in
# PyTorch on the same GPU, and the prepared-data input pipeline with 16 workers (benchmarks/device_check.py).
# --wheels DIR: first install what is missing from wheels carried in DIR (pip --no-index --find-links DIR: the jax
# CUDA plugin, a CUDA torch, ...), into the active Python environment. --dry-run: the same path on CPU with tiny
# sizes (about a minute). Results: OUT/device_check.json and OUT/device_check.md (default /tmp/medjax_device_check).
set -euo pipefail
cd "$(dirname "$0")/.."

dry_run=()
wheels=""
out="${TMPDIR:-/tmp}/medjax_device_check"
budget=480
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=(--dry-run); shift ;;
    --wheels) wheels="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --budget) budget="$2"; shift 2 ;;
    *) echo "error: unknown argument $1 (expected --dry-run, --wheels DIR, --out DIR, --budget SECONDS)" >&2; exit 2 ;;
  esac
done

python=${PYTHON:-python}
if [ -n "$wheels" ]; then
  if [ ! -d "$wheels" ]; then
    echo "error: --wheels $wheels is not a folder" >&2
    exit 2
  fi
  # every wheel in the folder, resolved against each other and what is installed; nothing from the network
  "$python" -m pip install --no-index --find-links "$wheels" "$wheels"/*.whl
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ ${#dry_run[@]} -eq 0 ] && ! "$python" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")'; then
  echo "error: jax sees no GPU (install jax's CUDA plugin, e.g. with --wheels DIR); --dry-run runs on CPU" >&2
  exit 2
fi
exec "$python" benchmarks/device_check.py --out "$out" --budget "$budget" "${dry_run[@]}"

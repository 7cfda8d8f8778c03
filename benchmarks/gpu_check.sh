#!/usr/bin/env bash
# The GPU check on a machine that received a copy of this working tree and has no network (docs/gpu.md).
#
#   benchmarks/gpu_check.sh [OUT] [more fastvlm selfcheck options, e.g. --dry-run or --parts targets]
#
# Runs with whatever torch and triton the machine has (the check reports their versions); fastvlm itself runs
# from the tree, no install needed. Environment:
#   PYTHON=/path/to/python  the interpreter to use (default: the first of .venv/bin/python, python3, python
#                           that imports torch and triton)
#   FASTVLM_WHEELS=DIR      a wheel folder carried with the tree: installed first, offline, with
#                           pip install --no-index --find-links DIR -r DIR/requirements.txt
set -u
cd "$(dirname "$0")/.."
OUT=${1:-bench-out/selfcheck}
[ $# -gt 0 ] && shift

PY=""
for c in "${PYTHON:-}" .venv/bin/python python3 python; do
    if [ -n "$c" ] && command -v "$c" >/dev/null 2>&1 && "$c" -c "import torch, triton" >/dev/null 2>&1; then
        PY=$c
        break
    fi
done

if [ -n "${FASTVLM_WHEELS:-}" ]; then
    PIPPY=${PY:-$(command -v python3 || command -v python)}
    echo "[gpu_check] installing from $FASTVLM_WHEELS (offline) with $PIPPY"
    "$PIPPY" -m pip install --no-index --find-links "$FASTVLM_WHEELS" -r "$FASTVLM_WHEELS/requirements.txt" \
        || echo "[gpu_check] the offline install failed: continuing with what is installed"
    [ -z "$PY" ] && "$PIPPY" -c "import torch, triton" >/dev/null 2>&1 && PY=$PIPPY
fi

if [ -z "$PY" ]; then
    echo "[gpu_check] no python here imports torch and triton: set PYTHON=..., or carry a wheel folder" \
         "(FASTVLM_WHEELS, docs/gpu.md)" >&2
    mkdir -p "$OUT" && echo "# fastvlm selfcheck: NOT RUN (no python with torch and triton)" > "$OUT/summary.md"
    exit 2
fi

echo "[gpu_check] $PY: $("$PY" -c 'import sys, torch, triton; print(sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available())')"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m fastvlm.cli selfcheck --out "$OUT" "$@"

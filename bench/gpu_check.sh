#!/usr/bin/env bash
# One-call GPU acceptance (bench/gpu_check.py says what it runs; ≤ 5 minutes on one H100/H200).
#
# Prepare here (once per session, needs PyPI):   bash bench/gpu_wheels.sh        → .whl/ (git-ignored)
# Device command (the device tool):              run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=420)
# CPU rehearsal with the same wheels:            GPU_CHECK_ARGS=--toy bash bench/gpu_check.sh
#
# Results: $OUT/gpu_check.json (rewritten after every part), $OUT/gpu_scale.json, logs.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu_check}
PY=${PYTHON:-python3}   # the GPU image's python3 holds PyTorch; elsewhere set PYTHON to your environment's
mkdir -p "$OUT"
# the carried wheels are cp312 (the GPU machine's Python); a rehearsal elsewhere uses its own environment
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1 && "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing the carried wheels failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
  export PATH=/tmp/site/bin:$PATH
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}   # the project itself, from this tree
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
exec "$PY" bench/gpu_check.py --out "$OUT" ${GPU_CHECK_ARGS:-}

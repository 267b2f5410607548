#!/usr/bin/env bash
# One-call GPU acceptance: numeric checks, one verdict (docs/gpu-acceptance.md; bench/gpu_check.py).
#
# Prepare here (once per session, needs PyPI):   bash bench/gpu_wheels.sh        → .whl/ (git-ignored)
# Device command (the device tool):              run(command="OUT=$OUT bash bench/gpu_check.sh", carry=[".whl"], timeout_s=330)
# CPU rehearsal:                                 GPU_CHECK_ARGS=--toy OUT=/tmp/gc PYTHON=.venv/bin/python bash bench/gpu_check.sh
#
# Environment: OUT (results folder), PYTHON (default python3), GPU_CHECK_ARGS (e.g. --toy, --parts, --inject-failure).
# Everything else happens in a scratch folder outside $OUT (mktemp under ${TMPDIR:-/tmp}), removed at the end;
# $OUT gets gpu_check.json (rewritten after every check), gpu_check.log, gpu_scale.json, gpu_scale.png.
# The last line printed is the verdict; the exit status is gpu_check.py's (0 PASS, 1 FAIL, 2 bad arguments).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu_check}
PY=${PYTHON:-python3}   # the GPU image's python3 holds PyTorch; elsewhere set PYTHON to your environment's
mkdir -p "$OUT" || { echo "gpu_check: FAIL: cannot create OUT=$OUT"; exit 1; }
OUT=$(cd "$OUT" && pwd)
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || { echo "gpu_check: FAIL: no scratch folder"; exit 1; }
trap 'rm -rf "$SCRATCH"' EXIT
fail_early() {  # a verdict even when gpu_check.py cannot start
  printf '{"verdict": "FAIL", "complete": true, "checks": {"%s": {"ok": false, "value": "%s", "limit": "%s"}}}\n' \
    "$1" "$2" "$3" > "$OUT/gpu_check.json"
  echo "gpu_check: FAIL: $1"
  exit 1
}
# the carried wheels are cp312 (the GPU machine's Python); a rehearsal elsewhere uses its own environment
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1 && "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SCRATCH/site" .whl/*.whl \
    > "$SCRATCH/pip.log" 2>&1 \
    || { tail -c 4000 "$SCRATCH/pip.log" > "$OUT/gpu_check.log"; fail_early wheels_installed "pip install failed (gpu_check.log)" \
         "the carried .whl files install with pip --no-index"; }
  export PYTHONPATH=$SCRATCH/site${PYTHONPATH:+:$PYTHONPATH}
  export PATH=$SCRATCH/site/bin:$PATH
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}   # the project itself, from this tree
"$PY" -c "import torch" 2>/dev/null || fail_early torch_importable "$PY cannot import torch" "$PY imports torch"
# shellcheck disable=SC2086  # GPU_CHECK_ARGS is a list of words
"$PY" bench/gpu_check.py --out "$OUT" --work "$SCRATCH/work" ${GPU_CHECK_ARGS:-}
rc=$?
if [ "$rc" -ne 0 ] && [ "$rc" -ne 1 ] && [ "$rc" -ne 2 ]; then
  echo "gpu_check: FAIL: harness (gpu_check.py exited $rc without a verdict)"
fi
exit "$rc"

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
# Where gpu_check.py dies without a verdict (another exit status, or no complete gpu_check.json), this script
# writes a FAIL report itself, with the exit status, and prints the FAIL verdict. SIGTERM/SIGINT/SIGHUP are
# passed on to gpu_check.py, which kills its children's process groups and still writes its verdict.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu_check}
PY=${PYTHON:-python3}   # the GPU image's python3 holds PyTorch; elsewhere set PYTHON to your environment's
mkdir -p "$OUT" || { echo "gpu_check: FAIL: cannot create OUT=$OUT"; exit 1; }
OUT=$(cd "$OUT" && pwd)
rm -f "$OUT/gpu_check.json" "$OUT/gpu_check.log" "$OUT/gpu_scale.json" "$OUT/gpu_scale.png"  # no stale verdict
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || { echo "gpu_check: FAIL: no scratch folder"; exit 1; }
trap 'rm -rf "$SCRATCH"' EXIT
fail_early() {  # a verdict even when gpu_check.py cannot start
  printf '{"verdict": "FAIL", "complete": true, "checks": {"%s": {"ok": false, "value": "%s", "limit": "%s"}}}\n' \
    "$1" "$2" "$3" > "$OUT/gpu_check.json"
  echo "gpu_check: FAIL: $1"
  exit 1
}
toy=0
case " ${GPU_CHECK_ARGS:-} " in *" --toy "*) toy=1 ;; esac
pyver=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) \
  || fail_early python_runs "$PY does not run" "the PYTHON interpreter runs"
# the carried wheels are cp312 (the GPU machine's Python); a toy rehearsal elsewhere uses its own environment
if ls .whl/*.whl >/dev/null 2>&1; then
  if ls .whl/*-cp312-*.whl >/dev/null 2>&1 && [ "$pyver" != 3.12 ]; then
    [ "$toy" = 1 ] || fail_early wheels_match_python "the carried .whl files are cp312 but $PY is Python $pyver" \
      "the carried cp312 wheels install into a Python 3.12"
    echo "gpu_check: toy rehearsal under Python $pyver: the carried cp312 wheels are not installed"
  else
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SCRATCH/site" .whl/*.whl \
      > "$SCRATCH/pip.log" 2>&1 \
      || { tail -c 4000 "$SCRATCH/pip.log" > "$OUT/gpu_check.log"; fail_early wheels_installed "pip install failed (gpu_check.log)" \
           "the carried .whl files install with pip --no-index"; }
    export PYTHONPATH=$SCRATCH/site${PYTHONPATH:+:$PYTHONPATH}
    export PATH=$SCRATCH/site/bin:$PATH
  fi
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}   # the project itself, from this tree
"$PY" -c "import torch" 2>/dev/null || fail_early torch_importable "$PY cannot import torch" "$PY imports torch"
# shellcheck disable=SC2086  # GPU_CHECK_ARGS is a list of words
"$PY" bench/gpu_check.py --out "$OUT" --work "$SCRATCH/work" ${GPU_CHECK_ARGS:-} &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null' TERM INT HUP   # gpu_check.py ends its children and writes its verdict
rc=0
wait "$pid" || rc=$?
while kill -0 "$pid" 2>/dev/null; do rc=0; wait "$pid" || rc=$?; done   # a trapped signal interrupted wait
trap - TERM INT HUP
# gpu_check.py's verdict stands when it exited 0/1/2 with a complete report; otherwise a FAIL report from here
"$PY" - "$OUT/gpu_check.json" "$rc" <<'PYEOF'
import glob, json, os, signal, sys
path, rc = sys.argv[1], int(sys.argv[2])
try:
    with open(path) as f:
        rep = json.load(f)
except (OSError, ValueError) as exc:
    rep = {"checks": {}, "pending": [], "report_error": f"gpu_check.json missing or unreadable: {exc}"}
if rc in (0, 1, 2) and rep.get("complete"):
    sys.exit(0)
# the driver died without ending its children: kill what is left of its process groups, in this session only
groups, sid, killed = set(rep.get("child_groups", [])), os.getsid(0), []
for stat in glob.glob("/proc/[0-9]*/stat"):
    try:
        with open(stat) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        if int(fields[2]) in groups and int(fields[3]) == sid:
            os.kill(int(stat.split("/")[2]), signal.SIGKILL)
            killed.append(int(stat.split("/")[2]))
    except (OSError, IndexError, ValueError):
        pass
rep["killed_after_the_driver"] = killed
tmp = rep.get("children_tmp_dir") or ""
if os.path.basename(tmp).startswith("gpu_check."):  # the short /tmp folder the driver would have removed
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)
checks = rep.setdefault("checks", {})
failing = [n for n, c in checks.items() if not c.get("ok")] + [n for n in rep.get("pending", []) if n not in checks]
rep.update(verdict="FAIL", complete=True, harness_exit_code=rc,
           harness_error=f"gpu_check.py exited {rc} without a complete report (patched by gpu_check.sh)")
with open(path + ".tmp", "w") as f:
    json.dump(rep, f, indent=1)
os.replace(path + ".tmp", path)
print("gpu_check: FAIL: " + ", ".join(failing + ["harness"]), flush=True)
sys.exit(3)
PYEOF
patched=$?
if [ "$patched" -ne 0 ]; then
  if [ "$patched" -ne 3 ]; then  # not even that ran: a minimal report
    printf '{"verdict": "FAIL", "complete": true, "harness_exit_code": %s, "checks": {}}\n' "$rc" > "$OUT/gpu_check.json"
    echo "gpu_check: FAIL: harness (gpu_check.py exited $rc without a verdict)"
  fi
  [ "$rc" -eq 0 ] && rc=1
fi
exit "$rc"

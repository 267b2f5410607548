#!/usr/bin/env bash
# Prepare .whl/ (git-ignored) with the cp312 wheels the offline GPU machine lacks (Python 3.12, torch 2.11):
# the project's dependencies that its image does not hold, and theirs (read from each wheel's METADATA).
# Versions are the ones CI pins (constraints.txt). DeepSpeed ships as a source archive: its wheel is built
# here (pure Python; its CUDA ops JIT-build there on first use). nvidia-ml-py (the pynvml module, not a project
# dependency): bench/gpu_scale.py reads torch.cuda.utilization() with it where importable.
#   bash bench/gpu_wheels.sh && GPU_CHECK_ARGS=--toy OUT=/tmp/gc bash bench/gpu_check.sh   # rehearse on the CPU
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
pin() { grep -i "^$1==" constraints.txt | head -1 || true; }  # unpinned (e.g. nvidia-ml-py): latest
NAMES="zarr numcodecs nibabel submitit hjson pydantic pydantic_core annotated-types typing-inspection typing_extensions donfig google-crc32c nvidia-ml-py"
PLATS="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any"
for name in $NAMES; do
  spec=$(pin "$name"); spec=${spec:-$name}
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLATS -d .whl "$spec"
done
python3 -m pip wheel -q --no-deps -w .whl "$(pin deepspeed)"
echo "wheels in .whl ($(du -sh .whl | cut -f1)):"; ls .whl
echo "their requirements (check that the GPU image has each one that is not here):"
python3 - <<'PY'
import glob, zipfile
for w in sorted(glob.glob(".whl/*.whl")):
    with zipfile.ZipFile(w) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        reqs = [l.split(":", 1)[1].strip() for l in z.read(meta).decode().splitlines()
                if l.startswith("Requires-Dist") and "extra ==" not in l]
    print(f"  {w.split('/')[-1].split('-')[0]}: {', '.join(reqs) or '-'}")
PY

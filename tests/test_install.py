"""The package works from a wheel, outside the checkout: configs and the site profile ship as
package data, ``hpc-seg submit`` replaces the script path, no source tree is needed.

The wheel is built here (no build isolation, no index: nothing is downloaded) and installed with
``--no-deps --no-index`` into a fresh virtual environment whose only view of the dependencies is
the test environment's site-packages, added as a plain path (a ``.pth`` line: so the checkout's
own editable install is *not* activated there, and ``hpc_seg`` can only come from the wheel).
"""

import os
import site
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, cwd, env, timeout=600):
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def test_wheel_in_fresh_venv_outside_checkout(tmp_path, phantom_dir):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PIP_NO_INDEX": "1",
           "HOME": str(tmp_path / "home")}
    env.pop("HPC_SEG_SITE", None)
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", wheels, ROOT], tmp_path, env)
    wheel = next(wheels.glob("hpc_seg-*.whl"))
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], tmp_path, env)
    py = venv / "bin" / "python"
    site_dir = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path,
                         env).stdout.strip())
    (site_dir / "zz_test_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], tmp_path, env)
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = _run([py, "-c", "import hpc_seg; print(hpc_seg.__file__)"], work, env).stdout.strip()
    assert where.startswith(str(venv)), where
    hpc = venv / "bin" / "hpc-seg"
    assert "name: tiny_cpu" in _run([hpc, "config", "--config", "tiny_cpu.yaml"], work, env).stdout
    (work / "mine.yaml").write_text("base: tiny_cpu.yaml\nname: mine\ntrain:\n  max_steps: 2\n")
    assert "max_steps: 2" in _run([hpc, "config", "--config", "mine.yaml"], work, env).stdout
    _run([hpc, "prepare", "phantom", phantom_dir, "store.zarr", "--quiet"], work, env)
    dry = _run([hpc, "submit", "--config", "mine.yaml", "--dry-run", "--set", "data.store=store.zarr"], work, env)
    assert "#SBATCH" in dry.stdout and "name: mine" in dry.stdout
    sets = ["data.store=store.zarr", "data.size=[32,32]", "data.batch_size=2", "data.num_workers=0",
            "train.val_max_cases=1", "train.val_every_steps=0", "checkpoint.every_steps=0"]
    _run([hpc, "train", "--config", "mine.yaml", "--run-dir", "run", *[a for s in sets for a in ("--set", s)]],
         work, env)
    assert (work / "run" / "plan.json").is_file() and (work / "run" / "final.json").is_file()

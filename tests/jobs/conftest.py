"""Launch tests run against the real local SLURM cluster (slurm/local_cluster.sh, started by
``make test``). Without it they fail — in CI that is a defect, never a skip."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.runs import records, wait_for  # noqa: F401  (shared helpers)

ROOT = Path(__file__).resolve().parents[2]
SITE = ROOT / "slurm" / "site.local.yaml"


@pytest.fixture(scope="session")
def slurm_cluster():
    assert shutil.which("sbatch"), "SLURM client tools missing: run 'slurm/local_cluster.sh start' (make test does)"
    r = subprocess.run(["bash", str(ROOT / "slurm" / "local_cluster.sh"), "status"], capture_output=True, text=True)
    assert r.returncode == 0, f"local SLURM cluster not up:\n{r.stdout}{r.stderr}"
    return True


def submit(*args, timeout=900, env: dict | None = None) -> subprocess.CompletedProcess:
    """``launch/submit.py`` with ``env`` added to the submitting shell's environment (sbatch passes it on)."""
    cmd = [sys.executable, str(ROOT / "launch" / "submit.py"), "--site", str(SITE), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(env or {})})


def tiny_sets(store: Path, steps: int = 6) -> list[str]:
    sets = [f"data.store={store}", "data.size=[32,32]", "data.batch_size=2", "data.num_workers=0",
            f"train.max_steps={steps}", "train.val_every_steps=0", "train.val_max_cases=1",
            "train.log_every_steps=1", "checkpoint.every_steps=0"]
    return [a for s in sets for a in ("--set", s)]



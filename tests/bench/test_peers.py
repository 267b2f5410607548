"""bench/peers.py end to end at toy size on real data (shared-data suite): hpc-seg and nnU-Net v2
trained on the same cases for the same minutes, both scored by hpc-seg's metric code."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import shared_path

ROOT = Path(__file__).resolve().parents[2]


def _peers(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "peers.json"
    cmd = [sys.executable, str(ROOT / "bench" / "peers.py"), "--work", str(tmp_path / "w"), "--out", str(out), *args]
    env = dict(os.environ, HPC_SEG_PEER_EPOCHS="4")  # fewer nnU-Net epochs: each has at least one iteration
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert out.with_suffix(".png").stat().st_size > 5000
    return json.loads(out.read_text())


def _check_system(res: dict, name: str, evals: list[str], target: str, minutes: float) -> None:
    for ev in evals:
        pc = res["results"][name][ev]["per_class"]
        assert 0.0 <= pc[target]["iou"] <= 1.0 and pc[target]["tp"] + pc[target]["fn"] > 0
    sys_ = res["systems"][name]
    assert set(sys_["minutes"]) >= {"preprocessing", "training", "inference"}
    assert sys_["minutes"]["training"] <= minutes * 1.5 + 0.25 and sys_["samples_per_s"] > 0
    assert sys_["curve"] and all(0.0 <= c["iou"] <= 1.0 for c in sys_["curve"])


@pytest.mark.shared_data
def test_peers_kvasir_toy(tmp_path, kvasir_subset):
    res = _peers(tmp_path, "--task", "kvasir", "--minutes", "0.25", "--peer-minutes", "0.35",
                 "--set", f"data.source={kvasir_subset}", "--set", "data.val_fraction=0.2",
                 "--set", "data.test_fraction=0.2", "--set", "train.val_every_steps=20",
                 "--set", "checkpoint.every_steps=20")
    assert set(res["results"]) == {"hpc-seg", "nnunet", "nnunet-0.35min"} and res["mirroring"] is True
    for name, minutes in (("hpc-seg", 0.25), ("nnunet", 0.25), ("nnunet-0.35min", 0.35)):
        _check_system(res, name, ["test"], "polyp", minutes)
    nn = res["systems"]["nnunet"]
    assert nn["minutes"]["training"] >= 0.24  # trained for its budget: the poly LR ran out on time
    assert len(nn["curve"]) >= 2 and nn["curve"][-1]["checkpoint"] == "checkpoint_final.pth"
    hpc = res["systems"]["hpc-seg"]
    assert hpc["steps"][0] < 4200  # the recipe's 4200 steps cut by the budget
    assert len(hpc["curve"]) >= 2 and all(c["tag"].startswith("step") for c in hpc["curve"])  # its checkpoints
    assert nn["last_lr"] < 2.5e-3  # nnU-Net's poly LR (from 1e-2) ran down over the budget
    assert res["results"]["nnunet"]["test"]["cases"] == res["results"]["hpc-seg"]["test"]["cases"]


@pytest.mark.shared_data
def test_peers_liver_toy(tmp_path):
    """The cascade recipe and nnU-Net on two real CTs, scored on a third neither trained on."""
    shared_path("lits-tiny"), shared_path("lits-117"), shared_path("totalseg-ct")
    res = _peers(tmp_path, "--task", "liver", "--minutes", "0.3", "--heldout", "lits:../shared/data/lits-tiny",
                 "--set", "data.extra_sources=[{kind: totalseg, path: ../shared/data/totalseg-ct}]",
                 "--set", "train.max_steps=30", "--set", "cascade.stage2.train.max_steps=30")
    assert set(res["results"]) == {"hpc-seg", "nnunet"} and res["eval"]["lits-tiny"][1] == "all"
    for name in ("hpc-seg", "nnunet"):
        _check_system(res, name, ["lits-tiny"], "tumour", 0.3)
        assert res["results"][name]["lits-tiny"]["lesions"]["reference"] >= 1
    assert len(res["systems"]["hpc-seg"]["steps"]) == 2  # both stages of the cascade

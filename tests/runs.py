"""Real DeepSpeed runs on the CPU accelerator: torchrun, gloo, 2 ranks, tiny models, phantom data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def base_sets(store: Path) -> list[str]:
    return [f"data.store={store}", "data.size=[32,32]", "data.batch_size=2", "data.num_workers=0",
            "train.val_max_cases=1", "train.log_every_steps=1", "train.warmup_steps=2"]


def command(run_dir: Path, store: Path, sets: list[str], nproc: int = 2, resume: str | None = None,
            config: str = "tiny_cpu.yaml") -> list[str]:
    args = ["--config", config, "--run-dir", str(run_dir)]
    for s in base_sets(store) + sets:
        args += ["--set", s]
    if resume:
        args += ["--resume", resume]
    if nproc == 1:
        return [str(BIN / "hpc-seg"), "train", *args]
    return [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(_port()),
            "-m", "hpc_seg.train", *args]


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_train(run_dir, store, sets, nproc=2, resume=None, timeout=600, config="tiny_cpu.yaml"):
    r = subprocess.run(command(run_dir, store, sets, nproc, resume, config), cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=timeout)
    return r


def start_train(run_dir, store, sets, nproc=2, resume=None):
    return subprocess.Popen(command(run_dir, store, sets, nproc, resume), cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def records(run_dir: Path, kind: str | None = None) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    if not p.exists():
        return []
    rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return [r for r in rows if kind is None or r["type"] == kind]


def wait_for(predicate, timeout=300, poll=0.02):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(poll)
    return False


def final_weights(run_dir: Path):
    from hpc_seg.distributed.checkpoint import CheckpointManager
    from hpc_seg.distributed.consolidate import consolidated_state_dict

    root = Path(run_dir) / "checkpoints"
    tag = (root / "latest").read_text().strip()
    assert CheckpointManager(root, 0, 1).verify(tag) is None
    return tag, consolidated_state_dict(root, tag)

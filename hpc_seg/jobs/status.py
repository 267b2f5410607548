"""``hpc-seg status RUN_DIR``: jobs, steps, last checkpoint and metrics of a run (or of every run
of a grid directory)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path


def _records(run: Path) -> list[dict]:
    p = run / "metrics.jsonl"
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def _job_states(ids: list[str]) -> dict[str, str]:
    if not ids or shutil.which("squeue") is None:
        return {}
    r = subprocess.run(["squeue", "-h", "-j", ",".join(ids), "-o", "%i %T"], capture_output=True, text=True)
    return dict(line.split(None, 1) for line in r.stdout.splitlines() if line.strip())


def run_status(run: Path) -> dict:
    recs = _records(run)
    train = [r for r in recs if r["type"] == "train"]
    val = [r for r in recs if r["type"] == "val"]
    ids = (run / "job_ids.txt").read_text().split() if (run / "job_ids.txt").is_file() else []
    states = _job_states(ids)
    latest = (run / "checkpoints" / "latest")
    return {
        "run": str(run),
        "jobs": [f"{i}:{states.get(i, 'finished/not queued')}" for i in ids],
        "step": train[-1]["step"] if train else None,
        "loss": train[-1]["loss"] if train else None,
        "val_mean_iou": val[-1]["mean_iou"] if val else None,
        "latest_checkpoint": latest.read_text().strip() if latest.is_file() else None,
        "resumes": sum(r["type"] == "resume" for r in recs),
        "finished": (run / "final.json").is_file(),
    }


def status(path: str | Path) -> list[dict]:
    path = Path(path)
    if (path / "metrics.jsonl").is_file() or (path / "job_ids.txt").is_file():
        return [run_status(path)]
    runs = sorted(p for p in path.iterdir() if p.is_dir() and ((p / "metrics.jsonl").is_file()
                                                                or (p / "job_ids.txt").is_file()))
    return [run_status(p) for p in runs]


def print_status(path: str | Path) -> int:
    from rich.console import Console
    from rich.table import Table

    rows = status(path)
    if not rows:
        print(f"hpc-seg status: {path}: no run found (no metrics.jsonl or job_ids.txt)")
        return 2
    table = Table("run", "jobs", "step", "loss", "val mIoU", "latest ckpt", "resumes", "done", title=str(path))
    for r in rows:
        fmt = (lambda v: "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v)))
        table.add_row(Path(r["run"]).name, " ".join(r["jobs"]) or "-", fmt(r["step"]), fmt(r["loss"]),
                      fmt(r["val_mean_iou"]), fmt(r["latest_checkpoint"]), str(r["resumes"]),
                      "yes" if r["finished"] else "no")
    Console(width=160).print(table)
    return 0

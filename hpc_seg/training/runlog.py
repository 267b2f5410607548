"""Run-directory logging on rank 0: metrics JSONL (one object per line, flushed), optional
TensorBoard, and a rich progress bar."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


class RunLog:
    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = False):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:  # tensorboard is an optional extra
                raise RuntimeError("train.tensorboard: true needs the 'tensorboard' package installed") from exc
            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        self.progress = self.task = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as exc:  # e.g. disk full: training goes on; a failed checkpoint stops it clearly
            if not getattr(self, "_warned", False):
                print(f"hpc-seg train: warning: cannot append to {self.path} ({exc}); metrics are not logged",
                      file=sys.stderr, flush=True)
                self._warned = True
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "time", "epoch"):
                    self.tb.add_scalar(f"{record.get('type', 'train')}/{k}", v, record.get("step", 0))

    def start_progress(self, total: int, done: int) -> None:
        if not self.enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), TextColumn("{task.description}"))
        self.progress.start()
        self.task = self.progress.add_task("", total=total, completed=done)

    def advance(self, step: int, text: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step, description=text)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        if self.tb is not None:
            self.tb.close()

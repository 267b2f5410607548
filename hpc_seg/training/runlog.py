"""Run-directory logging on rank 0: metrics JSONL (one object per line, flushed), optional
TensorBoard, optional MLflow tracking (``hpc_seg.training.tracking``), and a rich progress bar."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


class RunLog:
    """Args:
        run_dir: the run directory.
        enabled: this rank writes (rank 0).
        tensorboard: also write TensorBoard events.
        cfg: the config; ``tracking.mlflow: true`` also sends the records to MLflow.
        resume: the trainer was asked to resume (the MLflow run recorded in the run directory goes on).
    """

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = False, cfg=None, resume: bool = False):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:  # tensorboard is an optional extra
                raise RuntimeError("train.tensorboard: true needs the 'tensorboard' package installed") from exc
            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        self.tracker = None
        if cfg is not None and cfg.tracking.mlflow:
            from hpc_seg.training.tracking import Tracker, require_mlflow

            require_mlflow(cfg, import_it=False)  # every rank: the same one-line error; rank 0's tracker imports
            if enabled:
                self.tracker = Tracker(cfg, run_dir, resume)
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
        if self.tracker is not None:
            self.tracker.log_record(record)

    def final(self, summary: dict) -> None:
        """The run's final summary (``final.json``), for the trackers that keep one."""
        if self.tracker is not None:
            self.tracker.log_final(summary)

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
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None

"""The trainers of a run: one, or a cascade's two stages (``cascade.enabled``) one after the other.

A cascade run directory holds the cascade config (``config.yaml``) and one ordinary run directory
per stage (``stage1/``, ``stage2/``). Both stages run in the same processes and process group (on
SLURM: one job). A stage whose ``final.json`` reached its ``train.max_steps`` is skipped; a stage
with a checkpoint resumes from ``latest``, so a requeued job goes on where it stopped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import yaml

from hpc_seg.config import Config, to_dict
from hpc_seg.config.cascade import STAGES, stage_configs
from hpc_seg.distributed.env import detect_env
from hpc_seg.storage.atomic import atomic_write_text
from hpc_seg.training.tracking_uri import public_config
from hpc_seg.training.trainer import Trainer


def stage_done(stage_dir: Path, stage_cfg: Config) -> bool:
    final = Path(stage_dir) / "final.json"
    return final.is_file() and json.loads(final.read_text()).get("step", -1) >= stage_cfg.train.max_steps


def trainers(cfg: Config, run_dir: str | Path, resume: str | None = None) -> Iterator[Trainer]:
    """Set-up trainers, each when the one before has finished; the caller fits each and closes the
    process group once at the end (``hpc_seg.distributed.collectives.destroy``)."""
    run_dir = Path(run_dir)
    if not cfg.cascade.enabled:
        yield Trainer(cfg, run_dir, resume=resume).setup()
        return
    if detect_env().rank == 0:
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(public_config(to_dict(cfg)), sort_keys=False))
    for name, stage_cfg in stage_configs(cfg, str(run_dir / "config.yaml")):
        stage_dir = run_dir / name
        if stage_done(stage_dir, stage_cfg):
            continue
        latest = (stage_dir / "checkpoints" / "latest").is_file()
        yield Trainer(stage_cfg, stage_dir, resume="latest" if latest else None).setup()


def final_path(cfg: Config, run_dir: str | Path) -> Path:
    """The ``final.json`` that says a run is done (a cascade's: its last stage's)."""
    return Path(run_dir) / (STAGES[-1] if cfg.cascade.enabled else "") / "final.json"

"""Running a training run: one trainer, or a cascade's two stages (``cascade.enabled``) one after the other.

A cascade run directory holds the cascade config (``config.yaml``) and one ordinary run directory
per stage (``stage1/``, ``stage2/``). Both stages run in the same processes and process group (on
SLURM: one job). Rank 0 decides, for every rank, what each stage does — skip (its ``final.json``
reached ``train.max_steps``), resume from ``latest``, or start — after checking that a stage already
in the directory was trained with the settings asked for now (a finished stage with other
settings, or any stage whose model or input changed, is refused, naming the keys). Continuing a
cascade directory that has checkpoints needs ``--resume latest`` (a requeued job passes it).

Between stages the first stage's engine, optimiser state and loader workers are released. Every
stage hands a stop signal on to the handler the process had before training (submitit's requeue),
and a signal that arrives while a stage finishes stops the run before the next stage starts.
"""

from __future__ import annotations

import gc
import json
import signal
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from hpc_seg.config import Config, to_dict
from hpc_seg.config.cascade import STAGES, stage_configs
from hpc_seg.errors import HpcSegError
from hpc_seg.storage.atomic import atomic_write_text
from hpc_seg.training.resume_check import compare
from hpc_seg.training.tracking_uri import public_config
from hpc_seg.training.trainer import EXIT_OK, EXIT_PREEMPTED, STOP_SIGNALS, Trainer


@dataclass
class RunResult:
    code: int
    stop_signal: int | None = None
    step: int | None = None
    handlers: dict = field(default_factory=dict)  # the process's own stop handlers (submitit's requeue)


def stage_done(stage_dir: Path, stage_cfg: Config) -> bool:
    final = Path(stage_dir) / "final.json"
    return final.is_file() and json.loads(final.read_text()).get("step", -1) >= stage_cfg.train.max_steps


def _saved_differences(stage_dir: Path, stage_cfg: Config) -> tuple[list[str], list[str]]:
    """(refused, warned) differences between a stage directory's saved config and ``stage_cfg``."""
    saved = stage_dir / "config.yaml"
    if not saved.is_file():
        return [], []
    refused, warned, _ = compare(yaml.safe_load(saved.read_text()) or {}, public_config(to_dict(stage_cfg)))
    return refused, warned


def _action(stage_dir: Path, stage_cfg: Config, resume: str | None) -> str:
    """'skip', 'resume' or 'start' for one stage, or a one-line refusal."""
    latest = (stage_dir / "checkpoints" / "latest").is_file()
    if latest and resume is None:
        raise HpcSegError(f"{stage_dir}: this cascade stage has checkpoints; pass --resume latest to go on, "
                          "or use another run directory")
    refused, warned = _saved_differences(stage_dir, stage_cfg)
    if refused:
        raise HpcSegError(f"{stage_dir}: trained with another model or input ({'; '.join(refused)}); delete it "
                          "or use another run directory")
    if stage_done(stage_dir, stage_cfg):
        if warned:
            raise HpcSegError(f"{stage_dir}: finished with other settings ({'; '.join(warned)}); delete it to "
                              "train it again, or use another run directory")
        return "skip"
    return "resume" if latest else "start"


def _plan(cfg: Config, run_dir: Path, resume: str | None) -> dict[str, str]:
    """Rank 0's decision for every stage, broadcast (ranks never decide from their own view of a
    shared filesystem, whose attribute caches may differ)."""
    from hpc_seg.distributed import collectives as coll
    from hpc_seg.distributed.env import init_distributed

    init_distributed(timeout_s=cfg.deepspeed.comm_timeout_s)
    if resume not in (None, "latest"):
        raise HpcSegError(f"--resume {resume}: a cascade resumes its stages with --resume latest")
    decision: dict[str, str] | str = {}
    if coll.rank() == 0:
        try:
            _check_before_stage1(cfg, run_dir)
            decision = {name: _action(run_dir / name, c, resume) for name, c in stage_configs(cfg, str(run_dir))}
            atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(public_config(to_dict(cfg)), sort_keys=False))
        except HpcSegError as exc:
            decision = str(exc)
    decision = coll.broadcast_object(decision)
    if isinstance(decision, str):
        raise HpcSegError(decision)
    return decision


def _check_before_stage1(cfg: Config, run_dir: Path) -> None:
    """Stage 2's model and crop checked against the store now, not after stage 1's hours."""
    from hpc_seg.errors import PlanError
    from hpc_seg.ingest.catalog import Store
    from hpc_seg.models import check_model_args

    store = Store.open(cfg.data.store)
    for name, c in stage_configs(cfg, str(run_dir)):
        check_model_args(c.model.name, c.model.size, c.model.overrides)
        try:
            store.plan(c.data.split_seed).resolve(c.data, c.loss.kind)
        except PlanError as exc:
            raise HpcSegError(f"{name}: {exc}") from None


def release(trainer: Trainer) -> None:
    """Free a finished stage before the next: loader workers, engine, optimiser state, device cache."""
    loader = getattr(trainer, "loader", None)
    workers = getattr(loader, "_iterator", None)
    if workers is not None and hasattr(workers, "_shutdown_workers"):
        workers._shutdown_workers()
    for name in ("engine", "loader", "sampler", "scheduler", "loss_fn", "store", "previous_handlers"):
        trainer.__dict__.pop(name, None)
    gc.collect()
    torch.cuda.empty_cache()  # a no-op without CUDA


def _fit(trainer: Trainer, handlers: dict) -> RunResult:
    trainer.previous_handlers = handlers  # a stop hands on to the process's own handler, not a stage's
    code = trainer.fit()
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    return RunResult(code, trainer.stop_signal, trainer.step, handlers)


def run(cfg: Config, run_dir: str | Path, resume: str | None = None) -> RunResult:
    """Train a run (one trainer, or both stages of a cascade); the caller closes the process group."""
    run_dir = Path(run_dir)
    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    if not cfg.cascade.enabled:
        return _fit(Trainer(cfg, run_dir, resume=resume).setup(), handlers)
    actions = _plan(cfg, run_dir, resume)
    result = RunResult(EXIT_OK, handlers=handlers)
    for name, stage_cfg in stage_configs(cfg, str(run_dir / "config.yaml")):
        if actions[name] == "skip":
            continue
        trainer = Trainer(stage_cfg, run_dir / name, resume="latest" if actions[name] == "resume" else None).setup()
        result = _fit(trainer, handlers)
        release(trainer)
        del trainer
        if result.code != EXIT_OK or result.stop_signal is not None:  # a signal while a stage finished: stop here
            result.code = result.code if result.code != EXIT_OK else EXIT_PREEMPTED
            break
    return result


def final_path(cfg: Config, run_dir: str | Path) -> Path:
    """The ``final.json`` that says a run is done (a cascade's: its last stage's)."""
    return Path(run_dir) / (STAGES[-1] if cfg.cascade.enabled else "") / "final.json"

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
    """Finished: its ``max_steps`` reached, or its ``max_minutes`` spent (``final.json``)."""
    final = Path(stage_dir) / "final.json"
    if not final.is_file():
        return False
    rec = json.loads(final.read_text())
    if rec.get("step", -1) >= stage_cfg.train.max_steps:
        return True
    budget = stage_cfg.train.max_minutes
    return (rec.get("stopped_by") == "max_minutes" and budget is not None
            and rec.get("train_seconds", 0) >= budget * 60 - 0.05)  # final.json rounds to 0.1 s


PATH_KEYS = (("data", "store"), ("data", "source"), ("data", "cache"), ("model", "pretrained"))


def _normalised(raw: dict) -> dict:
    """A config as both sides of the comparison see it: today's key names, every default filled, local
    paths absolute (``hpc-seg submit`` writes them absolute, ``hpc-seg train`` as given)."""
    import os

    from hpc_seg.config.loader import from_dict, rename_former_keys

    d = public_config(to_dict(from_dict(Config, rename_former_keys(Config, raw, warn=False), source="<saved>")))
    local = (lambda v: isinstance(v, str) and "://" not in v)  # noqa: E731
    for section, key in PATH_KEYS:
        if local(d[section].get(key)):
            d[section][key] = os.path.abspath(d[section][key])
    for src in d["data"].get("extra_sources", []):
        src["path"] = os.path.abspath(src["path"]) if local(src.get("path")) else src.get("path")
    return d


def _saved_differences(stage_dir: Path, stage_cfg: Config) -> tuple[list[str], list[str]]:
    """(refused, warned) differences between a stage directory's saved config and ``stage_cfg``; a
    changed crop is refused (``crop_around``) or warned (margin, jitter) like a changed input."""
    saved = stage_dir / "config.yaml"
    if not saved.is_file():
        return [], []
    refused, warned, other = compare(_normalised(yaml.safe_load(saved.read_text()) or {}),
                                     _normalised(to_dict(stage_cfg)))
    refused += [x for x in other if x.startswith("data.crop_around")]
    warned += [x for x in other if x.startswith(("data.crop_margin", "data.crop_jitter"))]
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
        except Exception as exc:  # noqa: BLE001 - every rank must learn it, or they wait in the broadcast
            decision = str(exc) if isinstance(exc, HpcSegError) else f"{type(exc).__name__}: {exc}"
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


def _restore(handlers: dict) -> None:
    for sig, handler in handlers.items():
        if handler is not None:  # None: installed from C, cannot be set again from Python
            signal.signal(sig, handler)


def run(cfg: Config, run_dir: str | Path, resume: str | None = None) -> RunResult:
    """Train a run (one trainer, or both stages of a cascade); the caller closes the process group."""
    run_dir = Path(run_dir)
    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    if not cfg.cascade.enabled:
        trainer = Trainer(cfg, run_dir, resume=resume).setup()
        return RunResult(trainer.fit(), trainer.stop_signal, trainer.step, handlers)
    try:
        return _run_stages(cfg, run_dir, resume, handlers)
    finally:
        _restore(handlers)


def _keep_signals(caught: list[int]) -> None:
    """The run-level stop handler: it only records the signal."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, frame: caught.append(signum))


def _run_stages(cfg: Config, run_dir: Path, resume: str | None, handlers: dict) -> RunResult:
    """The stages in order. Between them a run-level handler keeps any stop signal (a stage's own
    handler holds it only while that stage is set up); before the next stage all ranks agree on
    whether any of them was signalled, so they stop together."""
    from hpc_seg.distributed import collectives as coll

    caught: list[int] = []
    _keep_signals(caught)
    actions = _plan(cfg, run_dir, resume)
    todo = [(n, c) for n, c in stage_configs(cfg, str(run_dir / "config.yaml")) if actions[n] != "skip"]
    result = RunResult(EXIT_OK, handlers=handlers)
    for i, (name, stage_cfg) in enumerate(todo):
        trainer = Trainer(stage_cfg, run_dir / name, resume="latest" if actions[name] == "resume" else None).setup()
        trainer.previous_handlers = handlers  # a stop hands on to the process's own handler (submitit's requeue)
        if caught and trainer.stop_signal is None:
            trainer._on_signal(caught[-1], None)  # arrived while the stage was set up: it saves at its first step
        result = RunResult(trainer.fit(), trainer.stop_signal, trainer.step, handlers)
        _keep_signals(caught)  # between stages: the run holds the signal, not the finished stage
        release(trainer)
        del trainer
        if result.code != EXIT_OK:
            break
        if i + 1 < len(todo):  # a signal while this stage finished: every rank stops before the next
            stop = int(coll.all_max(float(result.stop_signal or (caught[-1] if caught else 0))))
            if stop:
                return RunResult(EXIT_PREEMPTED, stop, result.step, handlers)
    return result


def final_path(cfg: Config, run_dir: str | Path) -> Path:
    """The ``final.json`` that says a run is done (a cascade's: its last stage's)."""
    return Path(run_dir) / (STAGES[-1] if cfg.cascade.enabled else "") / "final.json"

"""The DeepSpeed trainer: one class with small methods (setup, train_step, validate, state_dict,
load, save, fit, close). See ``hpc_seg/train.py`` for the commands that run it.

Exit codes of ``fit``: 0 finished, 75 stopped by a signal after saving a checkpoint (requeue me),
3 stopped after ``train.max_bad_steps`` consecutive non-finite losses (last good checkpoint kept),
4 a checkpoint could not be written (e.g. disk full: the partial one is removed, ``latest`` and the
previous checkpoints stay intact and loadable).
"""

from __future__ import annotations

import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import yaml

from hpc_seg import __version__
from hpc_seg.config import Config, to_dict
from hpc_seg.preprocessing.plan import PLAN_FILE
from hpc_seg.distributed import env as hdist
from hpc_seg.distributed.checkpoint import CheckpointError, CheckpointManager
from hpc_seg.distributed.ds_config import deepspeed_config
from hpc_seg.training.budget import TimeBudget
from hpc_seg.training.optim import build_optimizer, build_scheduler
from hpc_seg.training.runlog import RunLog
from hpc_seg.training.tracking_uri import absolute_store, public_config
from hpc_seg.training.runtime import (Throughput, buffers_match_params, check_precision_supported, configure_backends,
                                    match_buffer_dtypes, rng_state, set_rng_state)
from hpc_seg.training.validation import validate
from hpc_seg.errors import HpcSegError
from hpc_seg.losses import check_target_range
from hpc_seg.distributed import collectives as coll
from hpc_seg.storage.atomic import atomic_write_json, atomic_write_text

EXIT_OK, EXIT_DIVERGED, EXIT_CHECKPOINT_FAILED, EXIT_PREEMPTED = 0, 3, 4, 75
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
STOP_CHECK_EVERY = 10  # optimizer steps between agreements on a stop signal (when not logging anyway)


class TrainingDiverged(HpcSegError):
    pass


def code_version() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


class Trainer:
    """Args:
        cfg: the resolved config.
        run_dir: where config, metrics, checkpoints go (shared by all ranks).
        resume: None, ``latest`` or a checkpoint path.
    """

    def __init__(self, cfg: Config, run_dir: str | Path, resume: str | None = None):
        self.cfg, self.run_dir, self.resume = cfg, Path(run_dir), resume
        cfg.tracking.uri = absolute_store(cfg.tracking.uri)  # a relative sqlite path: against the start's cwd
        self.step = self.epoch = self.batches_in_epoch = 0
        self.history: list[dict] = []
        self.best: tuple[float, str] | None = None
        self.bad_steps = 0
        self._signal: int | None = None
        self._saved_step: int | None = None
        self.budget = TimeBudget(cfg.train.max_minutes)

    # ------------------------------------------------------------------ setup
    def setup(self) -> "Trainer":
        hdist.select_accelerator()
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed.*")
        cfg, tr = self.cfg, self.cfg.train
        configure_backends(tr)
        self.env = hdist.init_distributed(timeout_s=cfg.deepspeed.comm_timeout_s)
        self.device = hdist.device_for(self.env)
        random.seed(tr.seed)
        np.random.seed(tr.seed)
        torch.manual_seed(tr.seed)
        self._setup_data()
        from hpc_seg.losses import build_loss
        from hpc_seg.models import build_from_config

        model = build_from_config(cfg, self.plan)
        if tr.activation_checkpointing:
            from hpc_seg.distributed.activation_checkpointing import apply_activation_checkpointing

            apply_activation_checkpointing(model)
        check_precision_supported(cfg.deepspeed.precision)
        optimizer = build_optimizer(model, tr, offload=cfg.deepspeed.offload_optimizer)
        self.ds_config = deepspeed_config(cfg, self.env.world_size)
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", self.env.rank, self.env.world_size,
                                      cfg.checkpoint.keep_last, cfg.checkpoint.verify)
        source = self._resume_source() if self.resume else None
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=build_scheduler(optimizer, tr, self.budget),
            config=self.ds_config)
        self._buffers_cast = match_buffer_dtypes(self.engine.module)
        self.loss_fn = build_loss(cfg.loss, check_range=False).to(self.device)  # checked on the CPU batch
        self.log = RunLog(self.run_dir, self.env.is_main, tr.tensorboard, cfg, resume=self.resume is not None)
        self._write_run_files()
        self.log.write(self._startup_record())
        if source is not None:
            self.load(*source)
        self.previous_handlers = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        return self

    def _setup_data(self) -> None:
        """The prepared store's split and preprocessing plan (data preparation is not the
        engine's: ``hpc-seg prepare``, or ``hpc-seg train`` before distributed start-up)."""
        from hpc_seg.ingest.catalog import Store
        from hpc_seg.training.dataset import build_loader

        d = self.cfg.data
        self.store = Store.open(d.store)  # opened once: split, plan and both loaders read it
        self.split = self.store.split(d.split_seed)
        self.plan = self.store.plan(d.split_seed).resolve(d, self.cfg.loss.kind)
        self.class_names = list(self.plan.classes)
        self.loader, self.sampler = build_loader(d, self.split["train"], train=True, rank=self.env.rank,
                                                 world=self.env.world_size, seed=self.cfg.train.seed,
                                                 plan=self.plan, store=self.store)
        if len(self.loader) == 0:
            raise HpcSegError(f"{d.store}: training split gives no full batch of {d.batch_size} on "
                              f"{self.env.world_size} rank(s)")

    def _write_run_files(self) -> None:
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(_written(self.cfg), sort_keys=False))
            atomic_write_json(self.run_dir / "ds_config.json", self.ds_config)
            atomic_write_text(self.run_dir / PLAN_FILE, self.plan.to_json())
        coll.barrier()
        ranks = self.run_dir / "ranks"  # for operators (and tests) who must find or signal a rank
        ranks.mkdir(exist_ok=True)
        atomic_write_json(ranks / f"rank{self.env.rank}.json", {
            "pid": os.getpid(), "host": socket.gethostname(), "rank": self.env.rank,
            "world_size": self.env.world_size, "slurm_node": os.environ.get("SLURMD_NODENAME"),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT")})

    def _startup_record(self) -> dict:
        """What the run started with (the GPU acceptance check reads it)."""
        return {"type": "startup", "time": time.time(), "device": str(self.device), "local_rank": self.env.local_rank,
                "world_size": self.env.world_size, "env_source": self.env.source,
                "precision": self.cfg.deepspeed.precision, "channels_last": self.cfg.train.channels_last,
                "buffers_match_params": buffers_match_params(self.engine.module),
                "buffers_cast": self._buffers_cast,  # > 0: DeepSpeed left them in another dtype
                "loader_workers": self.loader.num_workers}

    def _on_signal(self, signum, frame) -> None:
        self._signal = signum

    @property
    def stop_signal(self) -> int | None:
        return self._signal

    # ------------------------------------------------------------------ steps
    def _to_input(self, images: torch.Tensor) -> torch.Tensor:
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.cfg.deepspeed.precision, torch.float32)
        images = images.to(self.device, dtype=dtype, non_blocking=True)
        if self.cfg.train.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def train_step(self, batch: dict) -> dict:
        """One micro-batch: forward, loss, backward, (boundary) optimizer step. The loss stays on the
        device (read once per logging interval); the only host read is the fp32/bf16 skip decision."""
        label, maps = batch["label"], batch["label_map"]
        check_target_range(label, self.plan.num_classes)  # on the CPU batch: no device sync
        partial = bool((maps != torch.arange(maps.shape[1])).any())  # CPU too
        logits = self.engine(self._to_input(batch["image"]))
        loss = self.loss_fn(logits, label.to(self.device, non_blocking=True),
                            maps.to(self.device, non_blocking=True) if partial else None)
        if self.cfg.deepspeed.precision != "fp16" and self._nonfinite(loss):  # fp16: the loss scaler skips
            self.bad_steps += 1
            if self.bad_steps >= self.cfg.train.max_bad_steps:
                raise TrainingDiverged(f"{self.bad_steps} consecutive non-finite losses at step {self.step}; "
                                       f"last good checkpoint kept in {self.ckpt.root}")
            return {"loss": None, "skipped": True}
        self.bad_steps = 0
        self.engine.backward(loss)
        self.engine.step()
        return {"loss": loss.detach(), "skipped": False}

    @staticmethod
    def _nonfinite(loss: torch.Tensor) -> bool:
        """Is the loss non-finite on any rank? Reduced on the loss's device, then one host read."""
        flag = (~torch.isfinite(loss.detach())).to(torch.float32).reshape(1)
        return bool(coll.all_reduce(flag, "max").item())

    def _broadcast_buffers(self) -> None:
        """Give every rank rank 0's buffers (BN running statistics): each rank's statistics drift
        apart, checkpoints hold rank 0's, and validation must judge the model that is saved.
        Running statistics do not enter the training forward pass, so the weights are unaffected."""
        if self.env.world_size > 1:
            for buf in self.engine.module.buffers():
                if buf is not None and buf.is_floating_point():
                    coll.broadcast(buf, src=0)

    def validate(self) -> dict:
        self._broadcast_buffers()
        self.engine.eval()
        cases = self.split["val"][: self.cfg.train.val_max_cases]

        def forward(x):
            return self.engine(self._to_input(x)).float().cpu()

        res = validate(forward, self.store, self.cfg.data, self.plan, cases, self.env.rank, self.env.world_size,
                       self.cfg.data.batch_size)
        self.engine.train()
        summary = {"type": "val", "step": self.step, "epoch": self.epoch, "mean_iou": res["mean_iou"],
                   "mean_iou_foreground": res["mean_iou_foreground"],
                   **{f"dice_{n}": v for n, v in res["global_dice"].items()},
                   **{f"iou_{n}": res["per_class"][n]["iou"] for n in self.class_names}}
        self.history.append(summary)
        self.log.write(summary)
        return summary

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Client state saved beside DeepSpeed's shards (identical on every rank)."""
        return {"step": self.step, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch,
                "history": self.history, "best": self.best, "config": _written(self.cfg),
                "code_version": code_version(), "world_size": self.env.world_size, "train_seconds": self.budget.agreed_s}

    def save(self) -> str:
        self.budget.sync(coll.all_max)  # every rank saves together: the checkpoint records the clock of now
        meta = {"zero_stage": self.cfg.deepspeed.zero_stage, "precision": self.cfg.deepspeed.precision,
                "model": self.cfg.model.name, "code_version": code_version(), "config": _written(self.cfg)}
        rank_state = {"rng": rng_state(), "rank": self.env.rank}
        tag = self.ckpt.save(self.engine, self.step, self.state_dict(), rank_state, meta)
        self._saved_step = self.step
        self.log.write({"type": "checkpoint", "step": self.step, "tag": tag})
        return tag

    def _resume_source(self) -> tuple[Path, str, int] | None:
        """Find the checkpoint to resume; a ZeRO checkpoint saved at another world size is turned
        into a DeepSpeed *universal* checkpoint (once, by rank 0) and loaded as such."""
        found = self.ckpt.resolve(self.resume)
        if found is None:  # --resume latest on a fresh run directory: start from scratch
            return None
        root, tag = found
        manifest = CheckpointManager.manifest(root, tag)
        self._check_resume_config(root / tag, manifest.get("config"))
        saved_world = int(manifest["world_size"])
        if saved_world == self.env.world_size or int(manifest.get("zero_stage", 0)) == 0:
            return root, tag, saved_world
        from hpc_seg.distributed.reshard import to_universal

        universal = root / "universal"
        if self.env.is_main:
            to_universal(root / tag, universal / tag)
        coll.barrier()
        self.ds_config.setdefault("checkpoint", {})["load_universal"] = True
        return universal, tag, saved_world

    def _check_resume_config(self, where: Path, saved: dict | None) -> None:
        """Refuse configs that change shapes or optimizer state; warn where the course changes."""
        from hpc_seg.training.resume_check import compare

        if saved is None:
            raise HpcSegError(f"{where}: the checkpoint records no config, so this run cannot be checked for a "
                              f"compatible resume; start a new run directory")
        refused, warned, other = compare(public_config(_as_current(saved)), _written(self.cfg))
        if refused:
            raise HpcSegError(f"{where}: cannot resume with this config; these keys change tensor shapes or the "
                              f"optimizer state: " + "; ".join(refused) + ". Restore them or start a new run directory")
        if self.env.is_main:
            for line in warned:
                warnings.warn(f"resuming {where} with a changed config: {line}", stacklevel=2)
        self._config_changes = {"warned": warned, "other": other}

    def load(self, root: Path, tag: str, saved_world: int) -> None:
        """Restore model, optimizer, scheduler, loss scaler (DeepSpeed) and our state."""
        _, client = self.engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
        if client is None:
            raise HpcSegError(f"{root / tag}: DeepSpeed could not load this checkpoint")
        self.step, self.epoch = client["step"], client["epoch"]
        self._saved_step = self.step
        self.history = client["history"]
        self.budget.resume_from(client.get("train_seconds", 0.0))  # the scheduler holds this object
        self.best = tuple(client["best"]) if client["best"] else None
        # the same global sample count, spread over the new number of ranks
        self.batches_in_epoch = client["batches_in_epoch"] * saved_world // self.env.world_size
        rank_state = CheckpointManager.load_rank_state(root, tag, self.env.rank)
        if rank_state is not None and saved_world == self.env.world_size:
            set_rng_state(rank_state["rng"])
        self.log.write({"type": "resume", "step": self.step, "from": str(root / tag),
                        "saved_world_size": saved_world, "world_size": self.env.world_size,
                        "config_changes": getattr(self, "_config_changes", None)})

    # ------------------------------------------------------------------ loop
    def _log_train(self, losses: list[torch.Tensor], speed: "Throughput") -> None:
        rec = {"type": "train", "step": self.step, "epoch": self.epoch,
               "loss": float(torch.stack(losses).float().mean()) if losses else None,  # the interval's one read
               "lr": self.scheduler.get_last_lr()[0], **speed.figures(self.env.world_size),
               "skipped_steps": int(getattr(self.engine, "skipped_steps", 0))}
        if self.cfg.deepspeed.precision == "fp16":
            rec["loss_scale"] = float(self.engine.optimizer.loss_scale)
        if torch.cuda.is_available():
            rec["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1024 ** 3
        self.log.write(rec)
        self.log.advance(self.step, f"loss {rec['loss'] if rec['loss'] is not None else float('nan'):.4f}")
        losses.clear()
        speed.new_window()

    def _after_optimizer_step(self, losses: list[torch.Tensor], speed: "Throughput") -> int | None:
        """Logging, validation, checkpoints and signals at an optimizer-step boundary. The stop flag
        is agreed on (a collective and a host read) at logging, validation and checkpoint steps and
        every ``STOP_CHECK_EVERY`` steps, so a preempted job stops within that many steps."""
        tr, ck = self.cfg.train, self.cfg.checkpoint
        logged = self.step % tr.log_every_steps == 0 or self.step == tr.max_steps
        validating = bool(tr.val_every_steps) and self.step % tr.val_every_steps == 0
        saving = bool(ck.every_steps) and self.step % ck.every_steps == 0
        if not (logged or validating or saving or self.step % STOP_CHECK_EVERY == 0):
            return None
        self.budget.sync(coll.all_max)  # one agreed clock: every rank's LR and stop read the same seconds
        if logged:
            self._log_train(losses, speed)
        saved = self._validate_and_track() if validating else False
        if saving and not saved:
            self.save()
            saved = True
        if validating or saving:
            speed.new_window()  # validation and checkpoint pauses are not training throughput
        if coll.all_max(1.0 if self._signal is not None else 0.0) > 0:
            if not saved:
                self.save()
            self.log.write({"type": "stop", "step": self.step, "reason": "signal"})
            return EXIT_PREEMPTED
        return None

    def _validate_and_track(self) -> bool:
        """Validate; on a new best mean IoU save a checkpoint and mark it best. True if saved."""
        if not self.split["val"]:
            return False
        res = self.validate()
        miou = res["mean_iou"]
        if miou is None or (self.best is not None and miou <= self.best[0]):
            return False
        from hpc_seg.distributed.checkpoint import tag_for

        self.best = (miou, tag_for(self.step))
        tag = self.save()
        self.ckpt.mark_best(tag)
        return True

    def _end_of_epoch(self) -> None:
        self.epoch += 1
        self.batches_in_epoch = 0
        if self.cfg.train.val_every_steps == 0:
            self._validate_and_track()
        elif self.cfg.checkpoint.at_epoch_end:
            self.save()

    def fit(self) -> int:
        """Train until ``train.max_steps``; returns the exit code (see module docstring)."""
        tr = self.cfg.train
        self.engine.train()
        self.log.start_progress(tr.max_steps, self.step)
        speed, losses = Throughput(), []
        self.budget.start()
        try:
            while self.step < tr.max_steps and not self.budget.spent:
                self.sampler.set_epoch(self.epoch)
                self.sampler.skip(self.batches_in_epoch * self.cfg.data.batch_size)
                self.loader.generator = torch.Generator().manual_seed(tr.seed * 1000 + self.epoch)
                if not speed.samples:
                    self.log.write({"type": "loader_start", "time": time.time(), "workers": self.loader.num_workers})
                for batch in self.loader:
                    out = self.train_step(batch)
                    self.batches_in_epoch += 1
                    speed.add(batch["image"].shape[0])
                    if not out["skipped"]:
                        losses.append(out["loss"])
                    if self.engine.global_steps > self.step:
                        self.step = self.engine.global_steps
                        code = self._after_optimizer_step(losses, speed)
                        if code is not None:
                            return code
                        if self.step >= tr.max_steps or self.budget.spent:
                            break
                else:
                    self._end_of_epoch()
                    speed.new_window()  # its validation or checkpoint is not training throughput
            return self._finish()
        except TrainingDiverged as exc:
            self.log.write({"type": "stop", "step": self.step, "reason": str(exc)})
            if self.env.is_main:
                print(f"hpc-seg train: error: {exc}", flush=True)
            return EXIT_DIVERGED
        except CheckpointError as exc:
            if self.env.is_main:
                print(f"hpc-seg train: error: {exc}", file=sys.stderr, flush=True)
            try:
                self.log.write({"type": "stop", "step": self.step, "reason": str(exc)})
            except OSError:
                pass  # the log is on the same full disk
            return EXIT_CHECKPOINT_FAILED
        finally:
            try:
                self.log.close()
            except OSError:
                pass

    def _finish(self) -> int:
        if (self.history[-1]["step"] if self.history else -1) != self.step:
            self._validate_and_track()
        if self._saved_step != self.step:
            self.save()
        if self.env.is_main:
            final = {"step": self.step, "epoch": self.epoch, "best": self.best,
                     "last_validation": self.history[-1] if self.history else None,
                     "world_size": self.env.world_size, "code_version": code_version(),
                     "train_seconds": round(self.budget.agreed_s, 1),
                     "stopped_by": "max_minutes" if self.step < self.cfg.train.max_steps else "max_steps"}
            atomic_write_json(self.run_dir / "final.json", final)
            self.log.final(final)
        return EXIT_OK

    def close(self) -> None:
        coll.destroy()


def _written(cfg: Config) -> dict:
    """The config as the run directory and checkpoints keep it: no tracking URI's user and password."""
    return public_config(to_dict(cfg))


def _as_current(saved: dict) -> dict:
    """A checkpoint's recorded config in today's key names (a renamed key is no change of config)."""
    from hpc_seg.config.loader import rename_former_keys

    return rename_former_keys(Config, saved, warn=False)

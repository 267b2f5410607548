"""The job submitit runs on every task: rendezvous from SLURM, then the DeepSpeed trainer.

Preemption: SLURM (``--signal=USR2@90``) or ``scancel --signal=USR2`` signals the tasks; the
trainer's handler finishes the step and saves a checkpoint on **all** ranks, then rank 0 hands the
signal to submitit's own handler, which calls ``checkpoint()`` (requeue, at most
``max_requeues`` times) and exits; the requeued job resumes from ``latest`` automatically.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import signal
import tempfile
from pathlib import Path

import submitit


def cpu_type() -> str:
    """A short key of this node's CPU type (model name and instruction-set flags)."""
    text = platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        text += "".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags", "Features"))}))
    except OSError:
        text += platform.processor()
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def extensions_dir(environ=None) -> str:
    """Where DeepSpeed JIT-builds its C++ ops (CPU Adam for ZeRO-Offload, with ``-march=native``):
    node-local and per CPU type, so ranks on a shared home do not queue behind one lock and a
    binary built for one CPU never runs on another. An explicit ``TORCH_EXTENSIONS_DIR`` wins."""
    env = os.environ if environ is None else environ
    if env.get("TORCH_EXTENSIONS_DIR"):
        return env["TORCH_EXTENSIONS_DIR"]
    base = env.get("SLURM_TMPDIR") or env.get("TMPDIR") or tempfile.gettempdir()
    return str(Path(base) / f"hpc-seg-torch-extensions-{os.getuid()}" / cpu_type())


RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def clear_inherited_rendezvous(environ=None) -> list[str]:
    """Drop rendezvous variables sbatch passed on from the submitting shell (a shell inside another
    distributed job has them): submitit refuses to export over them, and would take an inherited
    ``MASTER_PORT`` (two jobs then collide on one port) instead of one derived from the job id."""
    env = os.environ if environ is None else environ
    dropped = [k for k in RENDEZVOUS if k in env]
    for k in dropped:
        del env[k]
    return dropped


class TrainJob(submitit.helpers.Checkpointable):
    """Args:
        config: the resolved config as a plain dict (validated again on the node).
        run_dir: the run directory on shared storage.
        max_requeues: how many preemptions/timeouts are survived.
    """

    def __init__(self, config: dict, run_dir: str, max_requeues: int = 3, requeues: int = 0):
        self.config, self.run_dir, self.max_requeues, self.requeues = config, run_dir, max_requeues, requeues

    def __call__(self) -> dict:
        from hpc_seg.config import Config
        from hpc_seg.config.loader import from_dict, rename_former_keys
        from hpc_seg.distributed import collectives as coll
        from hpc_seg.training import stages
        from hpc_seg.training.stages import final_path
        from hpc_seg.training.trainer import EXIT_OK, EXIT_PREEMPTED

        env = submitit.JobEnvironment()
        os.environ["TORCH_EXTENSIONS_DIR"] = extensions_dir()
        if env.num_tasks > 1 or "SLURM_JOB_ID" in os.environ:
            clear_inherited_rendezvous()
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        cfg = from_dict(Config, rename_former_keys(Config, self.config, warn=False),
                        source=f"{self.run_dir}/config (submitted)")
        if env.num_tasks == 1:  # one process: it may prepare its data first (several ranks never do)
            from hpc_seg.ingest.prepare import prepare_for_config

            prepare_for_config(cfg)
        try:
            result = stages.run(cfg, self.run_dir, resume="latest")  # one trainer, or a cascade's stages
        finally:
            coll.destroy()
        if result.code == EXIT_PREEMPTED:
            sig = result.stop_signal or signal.SIGUSR2  # rank 0 may not have been signalled itself
            previous = result.handlers.get(sig)
            if env.global_rank == 0 and callable(previous):
                previous(sig, None)  # submitit: checkpoint() → requeue → exit
            return {"status": "preempted", "step": result.step}
        if result.code != EXIT_OK:
            raise RuntimeError(f"training in {self.run_dir} stopped with exit code {result.code}")
        return json.loads(final_path(cfg, self.run_dir).read_text())

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on rank 0 at preemption/timeout: requeue unless the cap is reached."""
        if self.requeues >= self.max_requeues:
            return None  # submitit then marks the job as not requeued
        return submitit.helpers.DelayedSubmission(
            TrainJob(self.config, self.run_dir, self.max_requeues, self.requeues + 1))

"""Distributed initialisation from the environment: torchrun, SLURM (srun, one task per GPU) or a
single process. CPU uses gloo with ``DS_ACCELERATOR=cpu``; CUDA uses nccl. Collectives are not
here: they are in ``hpc_seg/utils/collectives.py``.

Order of precedence: torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``;
else SLURM's ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID`` with the first host of
``SLURM_JOB_NODELIST`` as master (port from the job id); else rank 0 of 1 on 127.0.0.1.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass

import torch

from hpc_seg.utils import collectives as coll

if not torch.cuda.is_available():  # must be set before deepspeed is imported anywhere
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun", "slurm" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def expand_nodelist(nodelist: str) -> list[str]:
    """``"n[1-2],gpu[01-03,07],login"`` → ``["n1", "n2", "gpu01", …, "login"]`` (SLURM hostlist syntax)."""
    hosts = []
    for m in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist):
        prefix, ranges = m.group(1), m.group(2)
        if ranges is None:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            if "-" in part:
                a, b = part.split("-")
                hosts += [f"{prefix}{i:0{len(a)}d}" for i in range(int(a), int(b) + 1)]
            else:
                hosts.append(prefix + part)
    return hosts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def detect_env(environ=None) -> DistEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "torchrun")
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        hosts = expand_nodelist(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1")))
        port = int(env.get("MASTER_PORT", 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                       env.get("MASTER_ADDR", hosts[0]), port, "slurm")
    return DistEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT", 0)) or _free_port(), "single")


def init_distributed(env: DistEnv | None = None) -> DistEnv:
    """Export the rendezvous variables and initialise torch.distributed through DeepSpeed."""
    import deepspeed
    import torch.distributed as dist

    env = env or detect_env()
    os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
                      MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port))
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=coll.backend_name(), auto_mpi_discovery=False, verbose=False)
    return env


def device_for(env: DistEnv) -> torch.device:
    return torch.device(f"cuda:{env.local_rank}") if torch.cuda.is_available() else torch.device("cpu")


barrier = coll.barrier  # collectives live in hpc_seg/utils/collectives.py (device-correct)
all_max = coll.all_max

"""Distributed initialisation from the environment: torchrun, SLURM (srun, one task per GPU) or a
single process. CPU uses gloo with ``DS_ACCELERATOR=cpu``; CUDA uses nccl. Collectives are not
here: they are in ``hpc_seg/distributed/collectives.py``.

Order of precedence: torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``;
else SLURM's ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID`` with the first host of
``SLURM_JOB_NODELIST`` as master (port from the job id); else rank 0 of 1 on 127.0.0.1.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch

from hpc_seg.errors import HpcSegError
from hpc_seg.distributed import collectives as coll


def select_accelerator() -> str:
    """DeepSpeed picks its accelerator once, when first imported, by probing for libraries: name it
    before ``import deepspeed`` so that a machine without a GPU gets the CPU accelerator by rule, not
    by the probe (an explicit ``DS_ACCELERATOR`` wins)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return os.environ.get("DS_ACCELERATOR", "cuda")


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
    """``"n[1-2],gpu[01-03,07],a[1-2]-ib,login"`` → ``["n1", "n2", "gpu01", …, "a1-ib", "a2-ib", "login"]``
    (SLURM hostlist syntax: a host is text with any number of bracketed range lists, in any place)."""
    hosts: list[str] = []
    for host in _split_top_level(nodelist):
        hosts += _expand_host(host)
    return hosts


def _split_top_level(nodelist: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in nodelist.strip():
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [p for p in parts + [cur] if p]


def _expand_host(host: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", host)
    if m is None:
        return [host]
    head, tail = host[:m.start()], host[m.end():]
    out = []
    for part in m.group(1).split(","):
        a, _, b = part.partition("-")
        values = [f"{i:0{len(a)}d}" for i in range(int(a), int(b) + 1)] if b else [a]
        out += [h for v in values for h in _expand_host(head + v + tail)]
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def detect_env(environ=None) -> DistEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "torchrun")
    if "SLURM_PROCID" in env:  # any srun task, also one of one: its local id picks the GPU
        ntasks, local = int(env.get("SLURM_NTASKS", "1")), int(env.get("SLURM_LOCALID", 0))
        if ntasks == 1:
            return DistEnv(0, 1, local, "127.0.0.1", int(env.get("MASTER_PORT", 0)) or _free_port(), "slurm")
        # the step's nodes: a step on part of the job's nodes has its rank 0 on the first of them
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        hosts = expand_nodelist(nodes or "127.0.0.1")
        step_id = env.get("SLURM_STEP_ID", "0")
        job, step = int(env.get("SLURM_JOB_ID", "0")), int(step_id) if step_id.isdigit() else 0
        port = int(env.get("MASTER_PORT", 20000 + (job + 7919 * step) % 20000))
        return DistEnv(int(env["SLURM_PROCID"]), ntasks, local, env.get("MASTER_ADDR", hosts[0]), port, "slurm")
    return DistEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT", 0)) or _free_port(), "single")


def cuda_index(local_rank: int, visible: int) -> int:
    """The CUDA device of a local rank among the ``visible`` devices: ``local_rank`` where a task
    sees every GPU of its node, 0 where it sees only its own (``--gpus-per-task``, ``--gpu-bind``,
    per-task cgroups) — the local rank modulo the visible count covers both. More ranks than GPUs
    on a node that shows several is a request error (two ranks on one GPU: NCCL refuses)."""
    if visible < 1:
        raise HpcSegError("no CUDA device is visible to this process (CUDA_VISIBLE_DEVICES="
                          f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    if visible > 1 and local_rank >= visible:
        raise HpcSegError(f"local rank {local_rank} but only {visible} GPUs visible: ask for one task per GPU "
                          "(slurm.tasks_per_node = slurm.gpus_per_node)")
    return local_rank % visible


def device_rank(local_rank: int, visible: int) -> int:
    """What ``LOCAL_RANK`` must say for DeepSpeed, which takes it as the CUDA device index
    (``torch.cuda.set_device(LOCAL_RANK)`` in its engine and process-group start): the device of
    :func:`cuda_index` where GPUs are visible, the local rank itself where none are."""
    return cuda_index(local_rank, visible) if visible else local_rank


def init_distributed(env: DistEnv | None = None, timeout_s: float = 1800) -> DistEnv:
    """Export the rendezvous variables and initialise torch.distributed through DeepSpeed; a
    collective that waits longer than ``timeout_s`` (a dead or hung peer) fails: gloo raises, NCCL's
    watchdog aborts the process (srun's ``--kill-on-bad-exit`` then ends the step and the job requeues)."""
    select_accelerator()
    import deepspeed
    import torch.distributed as dist

    env = env or detect_env()
    local = device_rank(env.local_rank, torch.cuda.device_count())
    os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(local),
                      MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port))
    device = device_for(env)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=coll.backend_name(), auto_mpi_discovery=False, verbose=False,
                                   timeout=timedelta(seconds=timeout_s))
    return env


def device_for(env: DistEnv) -> torch.device:
    """``cuda:<local rank modulo the visible devices>`` where CUDA exists, else the CPU."""
    visible = torch.cuda.device_count()
    return torch.device("cuda", cuda_index(env.local_rank, visible)) if visible else torch.device("cpu")

"""The one place for ``torch.distributed`` collectives.

Every collective of hpc-seg (metrics, stop flags, batch counts, buffers, checkpoint tags) goes
through these functions, which put tensors where the process group's backend can use them:

* ``nccl`` reduces CUDA tensors only ("No backend type associated with device type cpu"): a CPU
  tensor is copied to the current CUDA device, reduced there, and copied back in place;
* ``gloo`` (the CPU path, ``DS_ACCELERATOR=cpu``) gets CPU tensors;
* a mixed group (``cpu:gloo,cuda:nccl``) takes either as it is.

Without an initialised process group every function is the identity (one process). With one, even
of world size 1, the collective really runs, so a device mismatch cannot hide on one GPU
(``bench/gpu_check.sh`` exercises each function on CUDA and CPU tensors under NCCL).
``tests/distributed/test_collectives.py`` pins the rule that no ``dist.<collective>`` call lives elsewhere.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def backend_name(cuda: bool | None = None) -> str:
    """The backend to initialise with: ``nccl`` on CUDA (DeepSpeed's own collectives need it; this
    module carries CPU tensors over to the GPU), ``gloo`` on the CPU."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    return "nccl" if cuda else "gloo"


def device_for_backend(device: torch.device, backend: str, cuda_index: int = 0) -> torch.device:
    """Where a tensor on ``device`` must go for ``backend`` (pure: tested without a GPU)."""
    backend = str(backend).lower()
    if backend == "nccl" and device.type != "cuda":
        return torch.device("cuda", cuda_index)
    if backend == "gloo" and device.type == "cuda":
        return torch.device("cpu")
    return device  # a mixed group ("cpu:gloo,cuda:nccl") serves both


def comm_device(t: torch.Tensor) -> torch.device:
    """Where ``t`` must live for the current group's backend."""
    backend = str(dist.get_backend())
    index = torch.cuda.current_device() if backend.lower() == "nccl" else 0
    return device_for_backend(t.device, backend, index)


def _run_in_place(fn, t: torch.Tensor) -> torch.Tensor:
    dev = comm_device(t)
    if dev == t.device:
        fn(t)
        return t
    moved = t.to(dev)
    fn(moved)
    t.copy_(moved.to(t.device))
    return t


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (``sum``, ``max``, ``min``) of ``t`` on any device; returns ``t``."""
    if not active():
        return t
    reduce_op = getattr(dist.ReduceOp, _OPS[op])
    return _run_in_place(lambda x: dist.all_reduce(x, op=reduce_op), t)


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In-place broadcast of rank ``src``'s ``t``; returns ``t``."""
    if not active():
        return t
    return _run_in_place(lambda x: dist.broadcast(x, src=src), t)


def all_max(value: float) -> float:
    """Maximum of a Python number over ranks (stop flags, batch counts, agreement)."""
    return float(all_reduce(torch.tensor([float(value)], dtype=torch.float64), "max").item())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (e.g. the checkpoint tag rank 0 chose)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_object_device())
    return box[0]


def all_gather_object(obj: Any) -> list:
    """Every rank's picklable ``obj``, in rank order."""
    if not active():
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if active():
        if str(dist.get_backend()).lower() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def _object_device() -> torch.device | None:
    backend = str(dist.get_backend()).lower()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else None


def destroy() -> None:
    if active():
        barrier()
        dist.destroy_process_group()

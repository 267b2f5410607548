"""The collectives module: the only place with torch.distributed collectives; device placement
by backend (NCCL takes CUDA tensors only); every function on 2 real gloo ranks and on 1."""

import ast
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hpc_seg.utils import collectives as coll

ROOT = Path(__file__).resolve().parents[2]
COLLECTIVES = {"all_reduce", "broadcast", "barrier", "all_gather", "all_gather_object", "all_gather_into_tensor",
               "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "gather", "scatter",
               "all_to_all", "send", "recv", "gather_object", "scatter_object_list"}


def test_no_collective_outside_the_module():
    offenders = []
    for path in (ROOT / "hpc_seg").rglob("*.py"):
        if path == ROOT / "hpc_seg" / "utils" / "collectives.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES and isinstance(node.value, ast.Name) \
                    and node.value.id in ("dist", "torch_dist", "distributed"):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} dist.{node.attr}")
    assert not offenders, offenders


def test_backend_and_device_rule():
    assert coll.backend_name(cuda=True) == "nccl" and coll.backend_name(cuda=False) == "gloo"
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert coll.device_for_backend(cpu, "nccl", 3) == torch.device("cuda", 3)  # NCCL cannot reduce CPU tensors
    assert coll.device_for_backend(cuda, "nccl") == cuda
    assert coll.device_for_backend(cuda, "gloo") == cpu and coll.device_for_backend(cpu, "gloo") == cpu
    assert coll.device_for_backend(cpu, "cpu:gloo,cuda:nccl") == cpu


def test_without_a_group_everything_is_identity():
    t = torch.arange(3.0)
    assert coll.all_reduce(t) is t and coll.all_max(4.0) == 4.0 and coll.broadcast_object("x") == "x"
    assert coll.all_gather_object({"a": 1}) == [{"a": 1}] and coll.world_size() == 1 and coll.rank() == 0
    coll.barrier()


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = {}
        t = torch.tensor([rank + 1.0, 10.0 * rank], dtype=torch.float64)
        res["sum"] = coll.all_reduce(t.clone(), "sum").tolist()
        res["max"] = coll.all_max(rank * 3.0)
        res["min"] = coll.all_reduce(torch.tensor([rank + 5]), "min").tolist()
        b = torch.full((2,), float(rank))
        res["bcast"] = coll.broadcast(b, src=0).tolist()
        res["obj"] = coll.broadcast_object(["step00000010", rank], src=0)
        res["gather"] = coll.all_gather_object({"r": rank})
        coll.barrier()
        out[rank] = res
    finally:
        dist.destroy_process_group()


def _run(world):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(world, port, out), nprocs=world, join=True)
    return dict(out)


def test_every_function_on_two_gloo_ranks():
    out = _run(2)
    for rank in (0, 1):
        r = out[rank]
        assert r["sum"] == [3.0, 10.0] and r["max"] == 3.0 and r["min"] == [5]
        assert r["bcast"] == [0.0, 0.0] and r["obj"] == ["step00000010", 0]
        assert r["gather"] == [{"r": 0}, {"r": 1}]


def test_world_size_one_still_runs_the_collectives():
    r = _run(1)[0]
    assert r["sum"] == [1.0, 0.0] and r["gather"] == [{"r": 0}] and r["obj"] == ["step00000010", 0]

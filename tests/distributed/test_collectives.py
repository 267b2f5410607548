"""The collectives module: the only place with torch.distributed / deepspeed.comm collectives
(an AST guard that resolves each module's import aliases, itself tested on synthetic sources);
device placement by backend (NCCL takes CUDA tensors only); every function on 2 real gloo ranks,
with inputs chosen so that each result differs from the input of at least one rank."""

import ast
import os
import socket
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hpc_seg.distributed import collectives as coll

ROOT = Path(__file__).resolve().parents[2]
ALLOWED = ROOT / "hpc_seg" / "distributed" / "collectives.py"
COLLECTIVES = {"all_reduce", "broadcast", "barrier", "monitored_barrier", "all_gather", "all_gather_object",
               "all_gather_into_tensor", "all_gather_base", "_all_gather_base", "all_gather_coalesced",
               "all_reduce_coalesced", "inference_all_reduce", "broadcast_object_list", "reduce",
               "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_base", "_reduce_scatter_base",
               "reduce_scatter_fn", "allgather_fn", "gather", "scatter", "all_to_all", "all_to_all_single",
               "send", "recv", "isend", "irecv", "batch_isend_irecv", "gather_object", "scatter_object_list"}
# modules whose attributes of those names are collectives (deepspeed.comm re-exports deepspeed.comm.comm)
NAMESPACES = {"torch.distributed", "torch.distributed.distributed_c10d", "deepspeed.comm", "deepspeed.comm.comm"}
# a bare name that no import binds in the module (e.g. a ``dist`` argument) is still taken for torch.distributed
UNBOUND_DIST_NAMES = {"dist", "torch_dist", "distributed"}


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> dotted path of what it is bound to, from every import of the module (any scope)
    and from plain ``name = <dotted path>`` assignments of an already bound name."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    names[a.asname] = a.name  # import torch.distributed as d -> d: torch.distributed
                else:
                    root = a.name.split(".")[0]  # import torch.distributed -> torch: torch
                    names[root] = root
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    for _ in range(3):  # dist = torch.distributed; c = dist.all_reduce (chains of a few assignments)
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                path = _dotted(node.value, names)
                if path in NAMESPACES or _is_collective(path):
                    names[node.targets[0].id] = path
    return names


def _dotted(node: ast.AST, names: dict[str, str]) -> str | None:
    """The dotted path an expression ``a.b.c`` stands for, with ``a`` resolved through the aliases."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    if node.id in names:
        base = names[node.id]
    elif node.id in UNBOUND_DIST_NAMES:
        base = "torch.distributed"
    else:
        base = node.id
    return ".".join([base, *reversed(parts)])


def _is_collective(path: str | None) -> bool:
    if not path or "." not in path:
        return False
    module, name = path.rsplit(".", 1)
    return module in NAMESPACES and name in COLLECTIVES


def collective_uses(source: str) -> list[tuple[int, str]]:
    """(line, what) of every collective a module's source reaches: ``dist.all_reduce`` under any
    alias, attribute chains (``torch.distributed.all_reduce``, ``deepspeed.comm.barrier``), names
    imported from a collective namespace (``from torch.distributed import all_reduce as ar``), star
    imports of one, and ``getattr(<namespace>, "<collective>")``."""
    tree = ast.parse(source)
    names = _aliases(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in NAMESPACES:
            for a in node.names:
                if a.name == "*" or a.name in COLLECTIVES:
                    found.append((node.lineno, f"from {node.module} import {a.name}"))
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            path = _dotted(node, names)
            if _is_collective(path):
                found.append((node.lineno, path))
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id in names:
            if _is_collective(names[node.id]):
                found.append((node.lineno, f"{node.id} = {names[node.id]}"))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr" \
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) \
                and isinstance(node.args[1].value, str):
            base = _dotted(node.args[0], names)
            if base and _is_collective(f"{base}.{node.args[1].value}"):
                found.append((node.lineno, f"getattr({base}, {node.args[1].value!r})"))
    return sorted(set(found))


FLAGGED = {
    "import_as_dist": "import torch.distributed as dist\ndist.all_reduce(t)",
    "import_as_other_name": "import torch.distributed as whatever\nwhatever.broadcast(t, 0)",
    "attribute_chain": "import torch\ntorch.distributed.all_reduce(t)",
    "attribute_chain_of_submodule_import": "import torch.distributed\ntorch.distributed.barrier()",
    "from_torch_import_distributed": "from torch import distributed as td\ntd.all_gather_object(out, x)",
    "from_distributed_import_function": "from torch.distributed import all_reduce\nall_reduce(t)",
    "from_distributed_import_renamed": "from torch.distributed import all_reduce as ar\nar(t)",
    "from_distributed_star": "from torch.distributed import *\n",
    "c10d_module": "from torch.distributed import distributed_c10d as c\nc.broadcast(t, 0)",
    "deepspeed_comm_chain": "import deepspeed\ndeepspeed.comm.all_reduce(t)",
    "from_deepspeed_import_comm": "from deepspeed import comm as dist\ndist.barrier()",
    "import_deepspeed_comm_as": "import deepspeed.comm as dc\ndc.all_gather(out, t)",
    "from_deepspeed_comm_import": "from deepspeed.comm import broadcast\nbroadcast(t, 0)",
    "inside_a_function": "def f(t):\n    import torch.distributed as d\n    return d.all_reduce(t)",
    "assigned_alias": "import torch\nd = torch.distributed\nd.all_reduce(t)",
    "function_reference": "import torch.distributed as dist\nfn = dist.all_reduce",
    "getattr_of_namespace": "import torch.distributed as dist\ngetattr(dist, 'broadcast')(t, 0)",
    "unbound_dist_argument": "def f(dist, t):\n    dist.all_reduce(t)",
}
HARMLESS = {
    "queries": "import torch.distributed as dist\ndist.is_initialized() and dist.get_rank() + dist.get_world_size()",
    "deepspeed_queries": "from deepspeed import comm as dist\ndist.get_rank()\n"
                         "import deepspeed\ndeepspeed.comm.is_initialized()",
    "init_and_reduce_op": "import torch.distributed as dist\ndist.init_process_group('gloo')\nop = dist.ReduceOp.SUM",
    "the_wrappers": "from hpc_seg.distributed import collectives as coll\ncoll.all_reduce(t)\ncoll.barrier()",
    "wrapper_imported_by_name": "from hpc_seg.distributed.collectives import all_reduce, barrier\nall_reduce(t)\nbarrier()",
    "other_module_named_like_a_collective": "import numpy as np\nnp.broadcast(a, b)\nx.all_reduce(t)",
    "a_local_package_called_distributed": "from hpc_seg.distributed import env as hdist\nhdist.detect_env()",
}


@pytest.mark.parametrize("name", sorted(FLAGGED))
def test_guard_flags_every_form_of_collective(name):
    found = collective_uses(FLAGGED[name])
    assert found, f"{name}: not flagged:\n{FLAGGED[name]}"


@pytest.mark.parametrize("name", sorted(HARMLESS))
def test_guard_leaves_non_collectives_alone(name):
    assert collective_uses(HARMLESS[name]) == [], name


def test_guard_reports_the_line_of_each_call():
    src = textwrap.dedent("""\
        import torch.distributed as dist
        from deepspeed import comm
        dist.get_rank()
        dist.all_reduce(t)
        comm.barrier()
    """)
    assert [line for line, _ in collective_uses(src)] == [4, 5]


def test_no_collective_outside_the_module():
    files = sorted((ROOT / "hpc_seg").rglob("*.py"))
    assert ALLOWED in files and len(files) > 20
    assert collective_uses(ALLOWED.read_text()), "the guard sees no collective in the one allowed module"
    offenders = [f"{path.relative_to(ROOT)}:{line} {what}" for path in files if path != ALLOWED
                 for line, what in collective_uses(path.read_text())]
    assert not offenders, offenders


def test_backend_and_device_rule():
    assert coll.backend_name(cuda=True) == "nccl" and coll.backend_name(cuda=False) == "gloo"
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert coll.device_for_backend(cpu, "nccl", 3) == torch.device("cuda", 3)  # NCCL cannot reduce CPU tensors
    assert coll.device_for_backend(cuda, "nccl") == cuda
    assert coll.device_for_backend(cuda, "gloo") == cpu and coll.device_for_backend(cpu, "gloo") == cpu
    assert coll.device_for_backend(cpu, "cpu:gloo,cuda:nccl") == cpu


def test_without_a_process_group_the_functions_run_in_this_process():
    """No group initialised (a plain one-process run): nothing raises, nothing is sent; tensors come
    back as the same objects (in place) and the world is one rank."""
    assert not dist.is_initialized()
    t = torch.arange(3.0)
    assert coll.all_reduce(t) is t and coll.broadcast(t) is t
    assert coll.world_size() == 1 and coll.rank() == 0 and not coll.active()
    coll.barrier()
    coll.destroy()


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = {}
        t = torch.tensor([rank + 1.0, 10.0 * rank + 5.0], dtype=torch.float64)  # rank 0 [1, 5], rank 1 [2, 15]
        s = coll.all_reduce(t, "sum")
        res["sum"], res["sum_in_place"] = s.tolist(), s is t and t.tolist() == s.tolist()
        res["max"] = coll.all_max(rank * 3.0 - 1.0)  # -1, 2
        res["min"] = coll.all_reduce(torch.tensor([5 - rank * 2, 7 + rank]), "min").tolist()  # [5, 7], [3, 8]
        res["bcast0"] = coll.broadcast(torch.full((2,), rank + 1.0), src=0).tolist()
        last = world - 1  # src 1 on two ranks (a group of one has rank 0 only)
        res["bcast1"] = coll.broadcast(torch.full((2,), rank + 1.0), src=last).tolist()
        res["obj0"] = coll.broadcast_object(["step00000010", rank], src=0)
        res["obj1"] = coll.broadcast_object({"tag": f"step{rank}"}, src=last)
        res["gather"] = coll.all_gather_object({"r": rank})
        res["world"], res["rank"] = coll.world_size(), coll.rank()
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
    """Every result differs from the input of at least one rank (a no-op would fail), and every
    rank holds the same result."""
    out = _run(2)
    assert sorted(out) == [0, 1]
    for rank in (0, 1):
        r = out[rank]
        assert r["sum"] == [3.0, 20.0] and r["sum_in_place"]   # inputs [1, 5] / [2, 15]
        assert r["max"] == 2.0                                # inputs -1 / 2
        assert r["min"] == [3, 7]                             # inputs [5, 7] / [3, 8]: elementwise
        assert r["bcast0"] == [1.0, 1.0] and r["bcast1"] == [2.0, 2.0]  # inputs 1 / 2: src is honoured
        assert r["obj0"] == ["step00000010", 0] and r["obj1"] == {"tag": "step1"}
        assert r["gather"] == [{"r": 0}, {"r": 1}]
        assert r["world"] == 2 and r["rank"] == rank


def test_a_group_of_one_runs_every_function_without_error():
    """World size 1 with a real gloo group (one GPU, one CPU process): every function, src=0
    included, completes without error. Only that: one rank's results equal its inputs by
    definition, so no value is checked here (the 2-rank test does), and whether a collective is
    skipped rather than run at world size 1 cannot be told from here."""
    out = _run(1)
    assert sorted(out) == [0]
    assert set(out[0]) == {"sum", "sum_in_place", "max", "min", "bcast0", "bcast1", "obj0", "obj1", "gather",
                           "world", "rank"}
    assert out[0]["world"] == 1

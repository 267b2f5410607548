"""The collectives, data and scale parts of bench/gpu_check.py (the training parts: gpu_check_train.py)."""

from __future__ import annotations

import json
import os
import socket
import sys
import time

from gpu_check_core import ROOT, Run, hpc, sh


# ---------------------------------------------------------------------------- collectives
def collectives_part() -> dict:
    """In-process (own process): a real group of one rank; each function on each device."""
    import torch
    import torch.distributed as dist

    from hpc_seg.distributed import collectives as coll

    cuda = torch.cuda.is_available()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    if cuda:
        torch.cuda.set_device(0)
    dist.init_process_group(coll.backend_name(), rank=0, world_size=1)
    devices = ["cpu"] + (["cuda"] if cuda else [])
    out = {"backend": str(dist.get_backend()), "devices": devices, "results": {}}
    for name, fn in _collective_checks().items():
        for d in devices:
            try:
                out["results"][f"{name}[{d}]"] = "ok" if fn(d) else "wrong value"
            except Exception as exc:  # recorded, not raised: this is what the check is for
                out["results"][f"{name}[{d}]"] = f"{type(exc).__name__}: {exc}"[:300]
    dist.destroy_process_group()
    return out


def _collective_checks() -> dict:
    """name: device -> whether the function returned the expected value in the group of one."""
    import torch

    from hpc_seg.distributed import collectives as coll

    return {
        # a group of one cannot show a reduction (tests/distributed: 2 gloo ranks do); it shows the device
        # routing: a CPU tensor goes to the GPU for NCCL and its result comes back into it, in place
        "all_reduce_sum": lambda d: _round_trip(coll.all_reduce, d, "sum"),
        "all_reduce_max": lambda d: _round_trip(coll.all_reduce, d, "max"),
        "broadcast": lambda d: _round_trip(coll.broadcast, d),
        "all_max": lambda d: coll.all_max(5.0) == 5.0,
        "broadcast_object": lambda d: coll.broadcast_object({"tag": "step00000010"}) == {"tag": "step00000010"},
        "all_gather_object": lambda d: coll.all_gather_object([1, 2]) == [[1, 2]],
        "barrier": lambda d: coll.barrier() is None,
        "metrics_all_reduce": lambda d: _metrics_ok(d),
    }


def _round_trip(fn, device: str, *args) -> bool:
    """The same tensor object comes back holding its own (distinct, non-trivial) values."""
    import torch

    t = torch.tensor([0.5, -3.25, 7.0, 1e-3], device=device)
    want = t.tolist()
    out = fn(t, *args)
    return out is t and t.device.type == device and t.tolist() == want


def _metrics_ok(device: str) -> bool:
    import torch

    from hpc_seg.metrics import SegmentationMetrics

    m = SegmentationMetrics(3, ["background", "liver", "tumour"])
    m.add_probs(torch.randn(2, 3, 8, 8, device=device).softmax(1), torch.randint(0, 3, (2, 8, 8), device=device),
                case_ids=["a", "b"])
    before = m.confusion.clone()
    m.all_reduce()  # CPU counts over the group's backend (NCCL on the GPU)
    return bool((m.confusion == before).all())


def run_collectives(run: Run, budget: float) -> dict:
    title = "collectives"
    sh(run, title, [sys.executable, ROOT / "bench" / "gpu_check.py", "--out", run.work, "--part", "collectives"],
       budget, run.work)
    text = (run.work / "logs" / f"{title}.log").read_text(errors="replace")
    lines = [line for line in text.splitlines() if line.startswith("{")]
    if not lines:
        run.decide("collectives", False, "no result line (see gpu_check.log)")
        return {}
    res = json.loads(lines[-1])
    bad = {k: v for k, v in res["results"].items() if v != "ok"}
    expect = ["cpu", "cuda"] if not run.toy else ["cpu"]
    ok = not bad and res["devices"] == expect
    run.decide("collectives", ok, {"backend": res["backend"], "devices": res["devices"],
                                   "passed": len(res["results"]) - len(bad), "failed": bad or None})
    return res


# ---------------------------------------------------------------------------- data
def prepare_data(run: Run, budget: float) -> dict:
    t_end = time.time() + budget
    shape = ["64", "64", "12"] if run.toy else ["512", "512", "24"]
    r = sh(run, "phantom", hpc("phantom", run.work / "phantom", "--cases", "4", "--shape", *shape), budget, run.work)
    if r["rc"] == 0:
        r = sh(run, "prepare", hpc("prepare", "phantom", run.work / "phantom", run.work / "store.zarr", "--val", "0.25",
                                   "--test", "0.25", "--workers", "2" if run.toy else "4", "--quiet"),
               t_end - time.time(), run.work)
    return r


# ---------------------------------------------------------------------------- scale
def scale_part(run: Run, budget: float) -> dict:
    out_json = run.out / "gpu_scale.json"
    cmd = [sys.executable, ROOT / "bench" / "gpu_scale.py", "--out", out_json, "--work", run.work / "scale",
           "--budget-s", f"{max(budget - (25 if run.toy else 15), 5):.0f}"] + (["--toy"] if run.toy else [])
    r = sh(run, "scale", cmd, budget, run.work)
    if not out_json.is_file():
        run.decide("scale_rows", False, f"no gpu_scale.json (rc {r['rc']})")
        return r
    doc = json.loads(out_json.read_text())
    counts: dict[str, int] = {}
    for row in doc.get("rows", []):
        counts[row["status"].split(" ")[0]] = counts.get(row["status"].split(" ")[0], 0) + 1
    errors = [f"{row['name']}/b{row['batch']}: {row.get('error_type')}" for row in doc.get("rows", [])
              if row["status"] == "error"]
    run.decide("scale_rows", counts.get("ok", 0) >= 1 and not errors,
               {"rows": counts, "errors": errors or None, "rc": r["rc"]})
    return {**r, "rows": counts}

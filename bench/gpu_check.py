"""One-call GPU acceptance of the path users run (see ``bench/gpu_check.sh`` for the device command).

Parts, each in its own process with its own time budget; ``OUT/gpu_check.json`` is rewritten after
every part, so a part cut short still leaves the others' results:

1. ``collectives`` — every function of ``hpc_seg.utils.collectives`` on CUDA and CPU tensors in a
   real process group (NCCL on the GPU, gloo on the CPU), world size 1.
2. ``fp16`` — the shipped ``transunet_12l.yaml`` recipe (TransUNet-12L, 512², batch 16, fp16,
   ZeRO-2, activation checkpointing) on a prepared phantom store: training steps with validation
   and a checkpoint, ``--resume latest`` for two more steps, ``export``, ``evaluate`` (autocast),
   ``predict`` on a source NIfTI.
3. ``bf16`` — a shorter pass of the same recipe in bf16.
4. ``scale`` — ``bench/gpu_scale.py`` within its own budget (measured memory and samples/s beside
   the planner's predictions; model FLOPs utilisation).

``--toy`` runs the same on the CPU at toy size (tiny TransUNet, 64², bf16 standing in for fp16,
which this CPU lacks); ``tests/bench/test_bench_scripts.py`` runs it so the script cannot rot.

    python bench/gpu_check.py --out /tmp/gc --toy
    bash bench/gpu_check.sh            # on the GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGETS_S = {"collectives": 30, "fp16": 140, "bf16": 60, "scale": 50}  # ≤ 5 minutes in all on a GPU


def hpc(*args) -> list[str]:
    return [sys.executable, "-m", "hpc_seg", *map(str, args)]


def sh(cmd, timeout: float, log: Path) -> dict:
    """Run one command; its output appended to ``log``; wall time and exit code returned."""
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(map(str, cmd))}\n")
        f.flush()
        try:
            rc = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, timeout=max(timeout, 1),
                                cwd=ROOT).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    return {"rc": rc, "seconds": round(time.perf_counter() - t0, 2)}


# ---------------------------------------------------------------------------- part 1
def collectives_part() -> dict:
    """In-process: a real group of one rank; each function on each device."""
    import torch
    import torch.distributed as dist

    from hpc_seg.utils import collectives as coll

    cuda = torch.cuda.is_available()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29631")
    if cuda:
        torch.cuda.set_device(0)
    dist.init_process_group(coll.backend_name(), rank=0, world_size=1)
    devices = ["cpu"] + (["cuda"] if cuda else [])
    checks = {
        "all_reduce_sum": lambda d: coll.all_reduce(torch.ones(3, device=d), "sum").tolist() == [1.0] * 3,
        "all_reduce_max": lambda d: coll.all_reduce(torch.tensor([2.0], device=d), "max").item() == 2.0,
        "broadcast": lambda d: coll.broadcast(torch.arange(4, device=d)).tolist() == [0, 1, 2, 3],
        "all_max": lambda d: coll.all_max(5.0) == 5.0,
        "broadcast_object": lambda d: coll.broadcast_object({"tag": "step00000010"}) == {"tag": "step00000010"},
        "all_gather_object": lambda d: coll.all_gather_object([1, 2]) == [[1, 2]],
        "barrier": lambda d: coll.barrier() is None,
        "metrics_all_reduce": lambda d: _metrics_ok(d),
    }
    out = {"backend": str(dist.get_backend()), "results": {}}
    for name, fn in checks.items():
        for d in devices:
            try:
                out["results"][f"{name}[{d}]"] = "ok" if fn(d) else "wrong value"
            except Exception as exc:  # recorded, not raised: this is what the check is for
                out["results"][f"{name}[{d}]"] = f"{type(exc).__name__}: {exc}"[:300]
    dist.destroy_process_group()
    out["ok"] = all(v == "ok" for v in out["results"].values())
    return out


def _metrics_ok(device: str) -> bool:
    import torch

    from hpc_seg.metrics import SegmentationMetrics

    m = SegmentationMetrics(3, ["background", "liver", "tumour"])
    m.update(torch.randn(2, 3, 8, 8, device=device), torch.randint(0, 3, (2, 8, 8), device=device), case_ids=["a", "b"])
    before = m.confusion.clone()
    m.all_reduce()  # CPU counts over the group's backend (NCCL on the GPU)
    return bool((m.confusion == before).all())


# ---------------------------------------------------------------------------- parts 2, 3
def recipe_sets(store: Path, toy: bool, precision: str, steps: int) -> list[str]:
    sets = [f"data.store={store}", f"train.max_steps={steps}", f"train.val_every_steps={steps}",
            f"checkpoint.every_steps={steps}", "train.val_max_cases=1", "train.log_every_steps=1",
            "train.warmup_steps=1", f"deepspeed.precision={precision}", "data.num_workers=2"]
    if toy:
        sets += ["model.size=tiny", "model.overrides={depth: 2}", "data.size=[64,64]", "data.batch_size=4",
                 "data.num_workers=0"]
    return [a for s in sets for a in ("--set", s)]


def train_part(work: Path, toy: bool, name: str, precision: str, budget: float, resume: bool) -> dict:
    """Train, validate, checkpoint (, resume, export, evaluate, predict) with the 12-layer recipe."""
    log, t_end = work / f"{name}.log", time.time() + budget
    store, run = work / "store.zarr", work / f"run-{name}"
    out: dict = {"log": log.name, "precision": precision}
    steps = 4 if toy else 6

    def left() -> float:
        return t_end - time.time()

    out["train"] = sh(hpc("train", "--config", "transunet_12l.yaml", "--run-dir", run,
                          *recipe_sets(store, toy, precision, steps)), left(), log)
    out["metrics"] = _run_figures(run)
    if not resume or out["train"]["rc"] != 0:
        return out
    out["resume"] = sh(hpc("train", "--config", "transunet_12l.yaml", "--run-dir", run, "--resume", "latest",
                           *recipe_sets(store, toy, precision, steps + 2)), left(), log)
    out["resumed_from_step"] = next((r["step"] for r in _records(run) if r["type"] == "resume"), None)
    model = work / f"model-{name}.safetensors"
    out["export"] = sh(hpc("export", run, "--out", model, "--tag", "latest"), left(), log)
    ev = work / f"eval-{name}"
    out["evaluate"] = sh(hpc("evaluate", model, "--data", store, "--split", "all", "--limit", "2", "--out", ev,
                             "--save-predictions"), left(), log)
    if (ev / "metrics.json").is_file():
        m = json.loads((ev / "metrics.json").read_text())
        out["evaluate"].update({"device": m["device"], "volumes_per_s": m["volumes_per_s"], "mean_iou": m["mean_iou"]})
    out["predict"] = sh(hpc("predict", model, work / "phantom" / "volume-0.nii.gz", "--out", work / "pred.nii.gz"),
                        left(), log)
    return out


def _records(run: Path) -> list[dict]:
    p = run / "metrics.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.is_file() else []


def _run_figures(run: Path) -> dict:
    recs = _records(run)
    train = [r for r in recs if r["type"] == "train"]
    val = [r for r in recs if r["type"] == "val"]
    return {"steps": train[-1]["step"] if train else 0,
            "samples_per_s": train[-1].get("samples_per_s") if train else None,
            "peak_mem_gb": max((r.get("peak_mem_gb") or 0 for r in train), default=None),
            "loss_first_last": [train[0]["loss"], train[-1]["loss"]] if train else None,
            "loss_scale": train[-1].get("loss_scale") if train else None,
            "val_mean_iou": val[-1]["mean_iou"] if val else None}


# ---------------------------------------------------------------------------- driver
def prepare_data(work: Path, toy: bool) -> dict:
    shape = ["64", "64", "12"] if toy else ["512", "512", "16"]
    log = work / "prepare.log"
    r = sh(hpc("phantom", work / "phantom", "--cases", "4", "--shape", *shape), 120, log)
    if r["rc"] == 0:
        r = sh(hpc("prepare", "phantom", work / "phantom", work / "store.zarr", "--val", "0.25", "--test", "0.25",
                   "--workers", "4", "--quiet"), 180, log)
    return r


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for gpu_check.json, logs and gpu_scale.json")
    ap.add_argument("--toy", action="store_true", help="CPU rehearsal at toy size")
    ap.add_argument("--part", default=None, help=argparse.SUPPRESS)  # internal: run one part in-process
    ap.add_argument("--parts", default="collectives,fp16,bf16,scale")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.part == "collectives":
        print(json.dumps(collectives_part()))
        return {}
    import torch

    toy = args.toy
    report = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "toy": toy, "budgets_s": BUDGETS_S, "parts": {}}
    save = (lambda: (out / "gpu_check.json").write_text(json.dumps(report, indent=1)))
    save()
    for part in args.parts.split(","):
        t0 = time.perf_counter()
        try:
            report["parts"][part] = run_part(part, out, toy)
        except Exception as exc:  # one part's failure must not cost the others' results
            report["parts"][part] = {"error": f"{type(exc).__name__}: {exc}"}
        report["parts"][part]["wall_s"] = round(time.perf_counter() - t0, 1)
        save()
    return report


def run_part(part: str, out: Path, toy: bool) -> dict:
    budget = BUDGETS_S[part] * (4 if toy else 1)  # the CPU is slower; the toy model smaller
    if part == "collectives":
        r = subprocess.run([sys.executable, __file__, "--out", str(out), "--part", "collectives"],
                           capture_output=True, text=True, timeout=budget, cwd=ROOT)
        lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
        return json.loads(lines[-1]) if lines else {"error": r.stderr[-1500:]}
    if part in ("fp16", "bf16"):
        if not (out / "store.zarr" / "zarr.json").is_file():
            prep = prepare_data(out, toy)
            if prep["rc"] != 0:
                return {"error": "data preparation failed", **prep}
        precision = "bf16" if (part == "bf16" or toy) else "fp16"  # bf16 stands in for fp16 on the CPU
        return train_part(out, toy, part, precision, budget, resume=part == "fp16")
    if part == "scale":
        r = sh([sys.executable, ROOT / "bench" / "gpu_scale.py", "--out", out / "gpu_scale.json",
                "--budget-s", str(budget * 0.8)] + (["--toy"] if toy else []), budget, out / "scale.log")
        if (out / "gpu_scale.json").is_file():
            rows = json.loads((out / "gpu_scale.json").read_text())["rows"]
            r["rows_ok"] = sum(row["status"] == "ok" for row in rows)
        return r
    raise ValueError(f"unknown part {part}")


if __name__ == "__main__":
    main()

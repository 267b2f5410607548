"""GPU scaling benchmark: TransUNet depths 6/12/24 × batches 1…64 at 512², peak memory and
samples/s with DeepSpeed fp16 ZeRO-2/3 ± activation checkpointing vs plain PyTorch fp32 (the
paper's setting). One GPU, one process; a configuration that runs out of memory is recorded as
``oom`` and larger batches of it are skipped. Writes JSON and a PNG.

Beside each measurement: the memory planner's prediction (``hpc-seg plan``'s model, profile from
``bench/results/planner_profile_transunet_512.json``) and the ratio measured / predicted, and the
model FLOPs utilisation (3 × forward FLOPs per sample × samples/s ÷ peak) against the datasheet
dense fp16/bf16 peak of the card and against the bf16 matmul rate measured on it in the same run.

    python bench/gpu_scale.py                          # H100/H200, budget ≤ 8 minutes
    python bench/gpu_scale.py --toy                    # CPU, tiny model: proves the script runs

On the CPU (``--toy``) fp16 becomes bf16 (DeepSpeed's CPU accelerator) and peak memory is not
recorded (``torch.cuda.max_memory_allocated`` exists only on the GPU); it only proves the script runs.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import torch

from hpc_seg.utils.atomic import atomic_write_json

MODES = ["pytorch_fp32", "ds_fp16_z2", "ds_fp16_z3", "ds_fp16_z2_ckpt", "ds_fp16_z3_ckpt"]


def build(depth: int, toy: bool, ckpt: bool):
    from hpc_seg.engine.activation_checkpointing import apply_activation_checkpointing
    from hpc_seg.models import build_model

    kw = dict(size="tiny") if toy else dict(size="r50-vit-b16", img_size=512)
    m = build_model("transunet", in_channels=3, num_classes=3, depth=depth, **kw)
    if ckpt:
        apply_activation_checkpointing(m)
    return m


def run_one(mode: str, depth: int, batch: int, res: int, steps: int, toy: bool) -> dict:
    import deepspeed

    from hpc_seg.losses import DiceCELoss

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    half = torch.float16 if cuda else torch.bfloat16
    model = build(depth, toy, ckpt=mode.endswith("ckpt"))
    loss_fn = DiceCELoss()
    x = torch.randn(batch, 3, res, res, device=dev)
    y = torch.randint(0, 3, (batch, res, res), device=dev)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if mode == "pytorch_fp32":
        model = model.to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()
    else:
        stage = 3 if "_z3" in mode else 2
        cfg = {"train_micro_batch_size_per_gpu": batch, "zero_optimization": {"stage": stage},
               "zero_allow_untested_optimizer": True, "gradient_clipping": 1.0}
        cfg["fp16" if cuda else "bf16"] = {"enabled": True}
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4),
                                               config=cfg)
        if not cuda:
            from hpc_seg.engine.trainer import match_buffer_dtypes

            match_buffer_dtypes(engine.module)
        xin = x.to(half)

        def step():
            engine.backward(loss_fn(engine(xin), y))
            engine.step()
    step()  # warm-up (allocations, kernels)
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    sps = batch * steps / (time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if cuda else None
    return {"samples_per_s": sps, "peak_bytes": peak}


DATASHEET_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0}  # dense fp16/bf16


def datasheet_peak(device: str) -> float | None:
    for key, tflops in DATASHEET_TFLOPS.items():
        if key in device:
            return tflops * 1e12
    return None


def matmul_rate(n: int = 8192, reps: int = 20) -> float | None:
    """Measured bf16 matmul FLOP/s of this GPU (None on the CPU)."""
    if not torch.cuda.is_available():
        return None
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def forward_flops(depth: int, toy: bool, res: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    model = build(depth, toy, ckpt=False).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(torch.zeros(1, 3, res, res))
    return float(fc.get_total_flops())


def planner_profile(toy: bool, res: int):
    """The planner's profile: measured here for the toy model, from the CPU measurement for 512²."""
    from hpc_seg.config import load_config
    from hpc_seg.engine.planner import Profile, profile_model

    if toy:
        cfg = load_config(None, ["model.name=transunet", "model.size=tiny", f"data.size=[{res},{res}]"])
        return profile_model(cfg, io=(3, 3))
    path = ROOT / "bench" / "results" / "planner_profile_transunet_512.json"
    return Profile.from_dict(json.loads(path.read_text())["profile"])


def predicted(prof, mode: str, depth: int, batch: int) -> dict:
    from hpc_seg.engine.planner import OVERHEAD_BYTES, per_gpu_bytes

    if mode == "pytorch_fp32":
        m = per_gpu_bytes(prof, depth, batch, 0, 1, "fp32", False)
    else:
        m = per_gpu_bytes(prof, depth, batch, 3 if "_z3" in mode else 2, 1, "fp16", mode.endswith("ckpt"))
    return {"predicted_bytes": m["total"] - OVERHEAD_BYTES, "predicted_total_bytes": m["total"]}


def annotate(row: dict, prof, fwd: float, peaks: dict) -> dict:
    row.update(predicted(prof, row["mode"], row["depth"], row["batch"]))
    if row.get("peak_bytes"):
        row["ratio_measured_vs_predicted"] = row["peak_bytes"] / row["predicted_bytes"]
    row["train_flops_per_sample"] = 3 * fwd
    for name, peak in peaks.items():
        if peak:
            row[f"mfu_vs_{name}"] = 3 * fwd * row["samples_per_s"] / peak
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--toy", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_scale.json"))
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop starting new runs after this long")
    args = ap.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    from hpc_seg.engine.distributed import init_distributed

    init_distributed()
    depths, batches, res, steps = ((1, 2), (1, 2), 32, 1) if args.toy else ((6, 12, 24), (1, 4, 16, 32, 64), 512, 3)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    peaks = {"datasheet": datasheet_peak(device), "measured_bf16_matmul": matmul_rate()}
    prof = planner_profile(args.toy, res)
    fwd = {d: forward_flops(d, args.toy, res) for d in depths}
    start, rows = time.time(), []
    for depth in depths:
        for mode in MODES:
            for batch in batches:
                if time.time() - start > args.budget_s:
                    rows.append({"depth": depth, "mode": mode, "batch": batch, "status": "skipped (budget)"})
                    continue
                try:
                    r = run_one(mode, depth, batch, res, steps, args.toy)
                    rows.append(annotate({"depth": depth, "mode": mode, "batch": batch, "status": "ok", **r},
                                         prof, fwd[depth], peaks))
                except torch.OutOfMemoryError:
                    rows.append({"depth": depth, "mode": mode, "batch": batch, "status": "oom"})
                    torch.cuda.empty_cache()
                    break
                print(json.dumps(rows[-1]), flush=True)
    atomic_write_json(args.out, {"device": device, "resolution": res, "peak_flops": peaks,
                                 "forward_flops_per_sample": fwd, "rows": rows})
    plot(rows, Path(args.out).with_suffix(".png"), device)
    return rows


def plot(rows, path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = sorted({r["depth"] for r in rows})
    fig, axes = plt.subplots(1, len(depths), figsize=(4.5 * len(depths), 3.6), squeeze=False)
    for ax, d in zip(axes[0], depths):
        for mode in MODES:
            pts = [(r["batch"], r["samples_per_s"]) for r in rows if r["depth"] == d and r["mode"] == mode
                   and r["status"] == "ok"]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=mode)
        ax.set(xscale="log", xlabel="batch per GPU", ylabel="samples/s", title=f"depth {d} ({device})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()

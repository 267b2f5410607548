"""GPU scaling benchmark: TransUNet depths 6/12/24 × batches 1…64 at 512², peak memory and
samples/s with DeepSpeed fp16 ZeRO-2/3 ± activation checkpointing vs plain PyTorch fp32 (the
paper's setting). One GPU, one process; a configuration that runs out of memory is recorded as
``oom`` and larger batches of it are skipped. Writes JSON and a PNG.

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
    start, rows = time.time(), []
    for depth in depths:
        for mode in MODES:
            for batch in batches:
                if time.time() - start > args.budget_s:
                    rows.append({"depth": depth, "mode": mode, "batch": batch, "status": "skipped (budget)"})
                    continue
                try:
                    r = run_one(mode, depth, batch, res, steps, args.toy)
                    rows.append({"depth": depth, "mode": mode, "batch": batch, "status": "ok", **r})
                except torch.OutOfMemoryError:
                    rows.append({"depth": depth, "mode": mode, "batch": batch, "status": "oom"})
                    torch.cuda.empty_cache()
                    break
                print(json.dumps(rows[-1]), flush=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    atomic_write_json(args.out, {"device": device, "resolution": res, "rows": rows})
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

"""``hpc-seg plan``: print the memory plan of a config (see ``memory_plan/planner.py``)."""

from __future__ import annotations

from hpc_seg.memory_plan.planner import (GIB, GPU_SIZES_GB, largest_batch, parse_mem, per_gpu_bytes, profile_model,
                                    recommend)


def run_plan(cfg, gpus: int | None, gpu_mem: str | None, io: tuple[int, int] | None = None) -> dict:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=150)
    world = gpus or cfg.slurm.world_size
    prec, batch = cfg.deepspeed.precision, cfg.data.batch_size
    with console.status("measuring activations (forward/backward of the real model on the CPU)…"):
        prof = profile_model(cfg, io)
    depth = prof.depth
    gb = (lambda v: f"{v / GIB:.2f}")
    t = Table("ZeRO", "act. ckpt", "offload", "params", "grads", "optimizer", "activations", "total / GPU", *[f"{s} GB" for s in GPU_SIZES_GB],
              title=f"{cfg.name}: {cfg.model.name}/{cfg.model.size} depth {depth or '-'}, Ψ={prof.params(depth) / 1e6:.1f} M, "
                    f"batch {batch}/GPU at {cfg.data.size[0]}×{cfg.data.size[1]}, {prec}, {world} GPUs (GiB)")
    rows = []
    for ckpt in (False, True):
        for stage, offload in ((0, False), (1, False), (2, False), (3, False), (2, True), (3, True)):
            m = per_gpu_bytes(prof, depth, batch, stage, world, prec, ckpt, offload)
            rows.append({"zero_stage": stage, "checkpointing": ckpt, "offload_optimizer": offload, **m})
            t.add_row(str(stage), "on" if ckpt else "off", "optimizer" if offload else "-", gb(m["params"]), gb(m["grads"]), gb(m["optimizer"]),
                      gb(m["activations"]), gb(m["total"]),
                      *["yes" if m["total"] <= s * GIB else "no" for s in GPU_SIZES_GB])
    console.print(t)
    depths = (6, 12, 24) if cfg.model.name == "transunet" else (depth,)
    t2 = Table("depth", "params (M)", *[f"{s} GB: max batch (ZeRO-3 + ckpt / ZeRO-2)" for s in GPU_SIZES_GB],
               title=f"largest batch per GPU that fits, {prec}, {world} GPUs")
    fits = {}
    for d in depths:
        cells = []
        for s in GPU_SIZES_GB:
            hi = largest_batch(prof, d, s * GIB, stage=3, world=world, precision=prec, checkpointing=True)
            lo = largest_batch(prof, d, s * GIB, stage=2, world=world, precision=prec, checkpointing=False)
            fits[f"depth{d}_{s}GB"] = {"zero3_ckpt": hi, "zero2": lo}
            cells.append(f"{hi} / {lo}")
        t2.add_row(str(d), f"{prof.params(d) / 1e6:.1f}", *cells)
    console.print(t2)
    result = {"rows": rows, "largest_batch": fits}
    if gpu_mem:
        rec = recommend(prof, depth, batch, world, prec, parse_mem(gpu_mem))
        result["recommendation"] = rec
        console.print(f"recommendation for {gpu_mem} per GPU: " + (
            f"ZeRO-{rec['zero_stage']}, activation checkpointing {'on' if rec['activation_checkpointing'] else 'off'}"
            f" ({rec['bytes'] / GIB:.1f} GiB)" if rec else "does not fit: lower the batch or the input size"))
    return result

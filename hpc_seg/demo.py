"""The embedded default end-to-end run (``make demo`` / ``hpc-seg demo``).

1. Data (``hpc_seg.ingest.prepare``): if the configured store is absent, prepare ``data.source``
   into it, or — with no source — write a synthetic LiTS-layout phantom next to it and prepare
   that: convert, split by case (seeded, checked for leakage), preprocessing plan.
2. The training split and its plan, read back from the store.
3. One streamed epoch of the training loader (2.5D stacks, oversampling, augmentation),
   with a rich progress bar and a summary table.
4. The main job: DeepSpeed training of a tiny UNet_ASPP, launched through submitit
   (``hpc-seg submit --local``: submitit's local executor, no SLURM needed), with validation
   and checkpoints in ``<store's folder>/runs/demo`` (default ``outputs/demo/runs/demo``).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from hpc_seg.config import load_config
from hpc_seg.training.dataset import build_loader
from hpc_seg.preprocessing.plan import read_plan
from hpc_seg.ingest.prepare import prepare_for_config
from hpc_seg.ingest.split import read_split


def run_demo(config: str, overrides: list[str]) -> int:
    from rich.console import Console
    from rich.progress import track
    from rich.table import Table

    console = Console()
    cfg = load_config(config, overrides)
    prepare_for_config(cfg, log=console.print)
    d = cfg.data
    split = read_split(d.store, d.split_seed)
    plan = read_plan(d.store, d.split_seed).resolve(d, cfg.loss.kind)
    loader, _ = build_loader(d, split["train"], train=True, seed=d.split_seed, plan=plan)
    k = plan.num_classes
    t0, n, fg = time.perf_counter(), 0, torch.zeros(k)
    for batch in track(loader, description="streaming one epoch", console=console):
        n += batch["image"].shape[0]
        fg += torch.bincount(batch["label"].flatten(), minlength=k)[:k]
    dt = time.perf_counter() - t0
    table = Table("what", "value", title=f"hpc-seg demo: {cfg.name}")
    table.add_row("store", str(d.store))
    table.add_row("cases train/val/test", "/".join(str(len(split[k])) for k in ("train", "val", "test")))
    table.add_row("samples streamed", f"{n} ({n / dt:.0f}/s, {d.num_workers} workers)")
    table.add_row("batch", f"image {tuple(batch['image'].shape)}, label {tuple(batch['label'].shape)}")
    table.add_row("label fractions", ", ".join(f"{c} {v:.3f}" for c, v in zip(plan.classes, (fg / fg.sum()).tolist())))
    table.add_row("preprocessing plan", f"window {list(plan.window or [])}, {plan.normalize}, {plan.mode}, "
                  f"{plan.in_channels} input channel(s), {plan.size[0]}×{plan.size[1]}")
    console.print(table)
    return launch_training(config, overrides, console)


def launch_training(config: str, overrides: list[str], console) -> int:
    """Run the demo's training job through submitit's local executor and show its result."""
    import json
    import subprocess
    import sys

    cfg = load_config(config, overrides)
    runs = Path(cfg.data.store).parent / "runs"
    cmd = [sys.executable, "-m", "hpc_seg", "submit", "--config", config, "--local", "--wait",
           "--run-root", str(runs)]
    for o in overrides:
        cmd += ["--set", o]
    console.print("[bold]training[/] (DeepSpeed via submitit's local executor): hpc-seg " + " ".join(cmd[3:]))
    r = subprocess.run(cmd)
    if r.returncode != 0:
        return r.returncode
    final = json.loads((runs / cfg.name / "final.json").read_text())
    val = final.get("last_validation") or {}
    fmt = (lambda v: "-" if v is None else f"{v:.3f}")
    dice = ", ".join(f"{k[5:]} Dice {fmt(v)}" for k, v in val.items() if k.startswith("dice_"))
    best = final.get("best")
    best_txt = f"best mean IoU {best[0]:.3f} at {best[1]}" if best else "no best checkpoint"
    console.print(f"done: step {final['step']}, last validation mean IoU {fmt(val.get('mean_iou'))}, {dice}; "
                  f"{best_txt} → {runs / cfg.name} (hpc-seg status {runs / cfg.name})")
    return 0

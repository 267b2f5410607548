"""The embedded default end-to-end run (``make demo`` / ``hpc-seg demo``).

1. Data: if the configured store is absent, convert ``data.source`` into it, or — with no
   source — write a synthetic LiTS-layout phantom next to it and convert that.
2. Split by case (seeded, checked for leakage).
3. One streamed epoch of the training loader (2.5D stacks, oversampling, augmentation),
   with a rich progress bar and a summary table.
4. The main job: DeepSpeed training of a tiny UNet_ASPP, launched through submitit
   (``launch/submit.py --local``: submitit's local executor, no SLURM needed), with validation
   and checkpoints in ``<store's folder>/runs/demo`` (default ``outputs/demo/runs/demo``).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from hpc_seg.config import load_config
from hpc_seg.data.convert import convert
from hpc_seg.data.dataset import build_loader
from hpc_seg.data.phantom import write_lits_phantom
from hpc_seg.data.split import ensure_split
from hpc_seg.errors import StoreError


def prepare_data(cfg, workers: int = 2, log=print) -> None:
    """Make sure ``cfg.data.store`` exists: convert the source, or a generated phantom."""
    store = Path(cfg.data.store)
    if (store / "index.json").is_file():
        return
    source, dataset = cfg.data.source, cfg.data.dataset
    if source is None:
        if dataset != "phantom":
            raise StoreError(f"{store}: no store and no data.source to convert (run 'hpc-seg convert')")
        source = store.parent / "phantom-nifti"
        log(f"generating a synthetic CT phantom in {source}")
        write_lits_phantom(source, cases=8, shape=(128, 128, 32), seed=cfg.data.split_seed)
    log(f"converting {source} → {store}")
    report = convert(dataset, source, store, workers=workers)
    if report.failed:
        raise StoreError(f"{source}: conversion failed for {sorted(report.failed)}: " +
                         "; ".join(report.failed.values()))


def run_demo(config: str, overrides: list[str]) -> int:
    from rich.console import Console
    from rich.progress import track
    from rich.table import Table

    console = Console()
    cfg = load_config(config, overrides)
    prepare_data(cfg, log=console.print)
    d = cfg.data
    split = ensure_split(d.store, d.split_file, d.val_fraction, d.test_fraction, d.split_seed)
    loader, _ = build_loader(d, split["train"], train=True, seed=d.split_seed)
    t0, n, fg = time.perf_counter(), 0, torch.zeros(d.num_classes)
    for batch in track(loader, description="streaming one epoch", console=console):
        n += batch["image"].shape[0]
        fg += torch.bincount(batch["label"].flatten(), minlength=d.num_classes)[: d.num_classes]
    dt = time.perf_counter() - t0
    table = Table("what", "value", title=f"hpc-seg demo: {cfg.name}")
    table.add_row("store", str(d.store))
    table.add_row("cases train/val/test", "/".join(str(len(split[k])) for k in ("train", "val", "test")))
    table.add_row("samples streamed", f"{n} ({n / dt:.0f}/s, {d.num_workers} workers)")
    table.add_row("batch", f"image {tuple(batch['image'].shape)}, label {tuple(batch['label'].shape)}")
    table.add_row("label fractions", ", ".join(f"{v:.3f}" for v in (fg / fg.sum()).tolist()))
    console.print(table)
    return launch_training(config, overrides, console)


def launch_training(config: str, overrides: list[str], console) -> int:
    """Run the demo's training job through submitit's local executor and show its result."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(config, overrides)
    runs = Path(cfg.data.store).parent / "runs"
    cmd = [sys.executable, str(root / "launch" / "submit.py"), "--config", config, "--local", "--wait",
           "--run-root", str(runs)]
    for o in overrides:
        cmd += ["--set", o]
    console.print("[bold]training[/] (DeepSpeed via submitit's local executor): " + " ".join(cmd[1:]))
    r = subprocess.run(cmd)
    if r.returncode != 0:
        return r.returncode
    final = json.loads((runs / cfg.name / "final.json").read_text())
    val = final.get("last_validation") or {}
    console.print(f"done: step {final['step']}, validation mean IoU {val.get('mean_iou')}, "
                  f"liver Dice {val.get('dice_liver')} → {runs / cfg.name} (hpc-seg status {runs / cfg.name})")
    return 0

"""Parameters and forward GFLOPs of the reference model sizes at 224² and 512² (CPU, no timing).

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmul/conv; 1 multiply-add =
2 FLOPs), batch 1, one input channel, 3 classes (TransUNet also in the paper's Synapse setting,
3 channels / 9 classes, where its published count is 105.28 M parameters).

    python bench/model_stats.py                      # → bench/results/model_stats.json
    python bench/model_stats.py --sizes tiny --res 64 --out /tmp/m.json   # quick
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]

from hpc_seg.models import build_model, count_parameters
from hpc_seg.storage.atomic import atomic_write_json

REFERENCE = [
    ("unetpp", "base", {}),
    ("unet_aspp", "base", {}),
    ("transunet", "r50-vit-b16", {"depth": 6}),
    ("transunet", "r50-vit-b16", {}),
    ("transunet", "r50-vit-b16", {"attention": True}),
    ("transunet", "r50-vit-l16", {}),
]
TINY = [("unetpp", "tiny", {}), ("unet_aspp", "tiny", {}), ("transunet", "tiny", {}),
        ("transunet", "tiny", {"attention": True})]


def gflops(model, res: int, cin: int) -> float:
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(torch.zeros(1, cin, res, res))
    return fc.get_total_flops() / 1e9


def label(name, size, kw) -> str:
    extra = ",".join(f"{k}={v}" for k, v in kw.items())
    return f"{name}/{size}" + (f"({extra})" if extra else "")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", choices=["reference", "tiny"], default="reference")
    ap.add_argument("--res", type=int, nargs="+", default=[224, 512])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "model_stats.json"))
    args = ap.parse_args(argv)
    rows = []
    for name, size, kw in (REFERENCE if args.sizes == "reference" else TINY):
        m = build_model(name, size, in_channels=1, num_classes=3, **kw)
        row = {"model": label(name, size, kw), "params": count_parameters(m)}
        for r in args.res:
            row[f"gflops_{r}"] = gflops(m, r, 1)
        if name == "transunet" and size != "tiny" and not kw:
            row["params_synapse_3ch_9cls"] = count_parameters(build_model(name, size, in_channels=3, num_classes=9))
        rows.append(row)
        print(row, flush=True)
    atomic_write_json(args.out, {"rows": rows, "note": "batch 1, 1 input channel, 3 classes; FLOPs = 2 x MACs"})
    return rows


if __name__ == "__main__":
    main()

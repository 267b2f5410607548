"""How long a TransUNet-12L checkpoint takes to write, against the preemption warning.

SLURM sends USR2 ``slurm.signal_delay_s`` (90 s in the shipped site profile) before the time limit;
the run must finish its step and write a verified checkpoint inside that window. Measured here on
the CPU, one rank (every byte of the ZeRO-2 state through one process: the worst case), with the
real ``CheckpointManager`` (DeepSpeed's ``save_checkpoint`` + our per-rank state + share-wise sha256
+ manifest), bf16 (this CPU has no fp16; the bytes are the same).

    python bench/checkpoint_time.py                 # → bench/results/checkpoint_time.json
    python bench/checkpoint_time.py --toy           # tiny model (the test)
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--toy", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "checkpoint_time.json"))
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = ap.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    from hpc_seg.config import load_config
    from hpc_seg.distributed.checkpoint import CheckpointManager, sha256
    from hpc_seg.distributed.env import init_distributed
    from hpc_seg.training.runtime import match_buffer_dtypes
    from hpc_seg.losses import DiceCELoss
    from hpc_seg.models import build_model
    from hpc_seg.storage.atomic import atomic_write_json

    init_distributed()
    kw = dict(size="tiny") if args.toy else dict(size="r50-vit-b16", img_size=512, depth=12)
    res = 32 if args.toy else 512
    model = build_model("transunet", in_channels=3, num_classes=3, **kw)
    params = sum(p.numel() for p in model.parameters())
    cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2}, "bf16": {"enabled": True},
           "zero_allow_untested_optimizer": True}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4),
                                           config=cfg)
    match_buffer_dtypes(engine.module)
    x, y = torch.randn(1, 3, res, res).bfloat16(), torch.randint(0, 3, (1, res, res))
    engine.backward(DiceCELoss()(engine(x), y))
    engine.step()  # optimizer states exist
    site = load_config("transunet_12l.yaml").slurm
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        mgr = CheckpointManager(Path(tmp) / "checkpoints", 0, 1, keep_last=1)
        t0 = time.perf_counter()
        tag = mgr.save(engine, 1, {"step": 1}, {"rng": torch.get_rng_state()}, {"zero_stage": 2})
        total = time.perf_counter() - t0
        files = [p for p in (Path(tmp) / "checkpoints" / tag).rglob("*") if p.is_file()]
        nbytes = sum(p.stat().st_size for p in files)
        t1 = time.perf_counter()
        for p in files:
            sha256(p)
        hashing = time.perf_counter() - t1
    result = {"model": "transunet/tiny" if args.toy else "transunet/r50-vit-b16 depth 12 (TransUNet-12L), 512²",
              "params": params, "bytes": nbytes, "files": len(files), "save_seconds": total,
              "of_which_sha256_seconds": hashing, "write_MB_per_s": nbytes / 1e6 / total,
              "signal_delay_s": site.signal_delay_s, "margin_s": site.signal_delay_s - total,
              "note": "1 CPU rank writes the whole ZeRO-2 state (worst case); with N ranks each writes and hashes "
                      "about 1/N of the optimizer state"}
    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()

"""Planner figures for docs/scale.md "Scaling past the paper": predicted per-GPU memory of the paper's
TransUNet setting and of hpc-seg's scaled configs, and the largest batch per GPU size.

    python bench/plan_scaling.py      # → bench/results/plan_scaling.json (+ Markdown on stdout)
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from hpc_seg.config import load_config
from hpc_seg.memory_plan.planner import GIB, GPU_SIZES_GB, largest_batch, per_gpu_bytes, profile_model
from hpc_seg.storage.atomic import atomic_write_json

PROFILE_FILE = ROOT / "bench" / "results" / "planner_profile_transunet_512.json"
SETTINGS = [  # (label, config, depth, batch, zero stage, precision, checkpointing, GPUs)
    ("paper: depth 6, batch 1, fp32, no ZeRO", "transunet_6l.yaml", 6, 1, 0, "fp32", False, 1),
    ("paper model at batch 16, fp32, no ZeRO", "transunet_6l.yaml", 6, 16, 0, "fp32", False, 1),
    ("transunet_12l: batch 16, fp16, ZeRO-2, ckpt, 8 GPUs", "transunet_12l.yaml", 12, 16, 2, "fp16", True, 8),
    ("transunet_24l: batch 16, fp16, ZeRO-3, ckpt, 8 GPUs", "transunet_24l.yaml", 24, 16, 3, "fp16", True, 8),
]


def main() -> dict:
    profiles, rows = {}, []
    for label, config, depth, batch, stage, prec, ckpt, gpus in SETTINGS:
        cfg = load_config(config)
        key = (cfg.model.size, tuple(cfg.data.size))
        if key not in profiles:
            profiles[key] = profile_model(cfg)
        prof = profiles[key]
        m = per_gpu_bytes(prof, depth, batch, stage, gpus, prec, ckpt)
        fits = {f"{s}GB": largest_batch(prof, depth, s * GIB, stage=stage, world=gpus, precision=prec,
                                        checkpointing=ckpt) for s in GPU_SIZES_GB}
        rows.append({"setting": label, "params_M": prof.params(depth) / 1e6, "per_gpu_GiB": m["total"] / GIB,
                     "activations_GiB": m["activations"] / GIB, "model_states_GiB": (m["params"] + m["grads"] + m["optimizer"]) / GIB,
                     "largest_batch": fits})
    atomic_write_json(ROOT / "bench" / "results" / "plan_scaling.json", {"rows": rows, "resolution": 512,
                                                                          "note": "predicted by hpc-seg plan"})
    b16 = next(p for (size, _), p in profiles.items() if size == "r50-vit-b16")
    atomic_write_json(PROFILE_FILE, {"model": "transunet/r50-vit-b16", "resolution": 512, "in_channels": 3,
                                     "num_classes": 3, "profile": b16.to_dict(),
                                     "note": "measured on the CPU by bench/plan_scaling.py; bench/gpu_scale.py "
                                             "puts its predictions beside GPU measurements"})
    print("| setting | params | per-GPU memory | of which activations | max batch 16/24/40/80 GB |")
    print("|---|---:|---:|---:|---|")
    for r in rows:
        fb = " / ".join(str(v) for v in r["largest_batch"].values())
        print(f"| {r['setting']} | {r['params_M']:.1f} M | {r['per_gpu_GiB']:.1f} GiB | {r['activations_GiB']:.1f} GiB | {fb} |")
    return {"rows": rows}


if __name__ == "__main__":
    main()

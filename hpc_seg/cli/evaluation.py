"""Evaluation commands: ``export``, ``evaluate``, ``predict``, ``compare``."""

from __future__ import annotations

import argparse


def add_commands(sub) -> None:
    p = sub.add_parser("export", help="consolidate sharded checkpoints into one fp32 .safetensors or .onnx file")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, help="MODEL.safetensors, or MODEL.onnx (the graph, plan in its metadata)")
    p.add_argument("--tag", default="best", help="best (default, else latest), latest or stepNNNNNNNN")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("evaluate", help="whole-case evaluation on a store split (1 GPU or CPU)")
    p.add_argument("model", help="RUN_DIR or model.safetensors")
    p.add_argument("--data", required=True, help="Zarr store")
    p.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    p.add_argument("--out", required=True)
    p.add_argument("--tag", default="best")
    _inference_flags(p)
    p.add_argument("--limit", type=int, default=None, help="first N cases only")
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--save-predictions", action="store_true",
                   help="write OUT/predictions/<case>.nii.gz on the original grid (RGB: <case>.png)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="segment a raw NIfTI CT; output keeps the input's affine/header")
    p.add_argument("model", help="an export (.safetensors or .onnx) or a run directory")
    p.add_argument("image")
    p.add_argument("--out", required=True)
    p.add_argument("--probs", default=None, help="also write probabilities to this .zarr")
    _inference_flags(p)
    p.add_argument("--cpu", action="store_true")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("compare", help="side-by-side report of several evaluations (Markdown + PNG)")
    p.add_argument("evals", nargs="+")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_compare)


def _inference_flags(p: argparse.ArgumentParser) -> None:
    """--tta/--no-tta, --postprocess/--no-postprocess; unset: the model config's ``inference`` section."""
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="average over all in-plane mirrorings (default: the model's inference.tta)")
    p.add_argument("--postprocess", action=argparse.BooleanOptionalAction, default=None,
                   help="largest liver component, tumour inside it (default: the model's inference.postprocess)")


def cmd_export(args) -> int:
    from hpc_seg.evaluation.model_io import export

    print(f"wrote {export(args.run_dir, args.out, args.tag)}")
    return 0


def cmd_evaluate(args) -> int:
    from hpc_seg.evaluation.evaluate import evaluate, print_summary

    res = evaluate(args.model, args.data, args.split, args.out, args.tag, args.tta, args.postprocess,
                   args.limit, args.cpu, save_predictions=args.save_predictions)
    print_summary(res)
    print(f"wrote {args.out}/metrics.json, per_case.csv and figures")
    return 0


def cmd_predict(args) -> int:
    from hpc_seg.evaluation.predict import predict_file

    path = predict_file(args.model, args.image, args.out, args.tta, args.postprocess, args.probs, args.cpu)
    print(f"wrote {path}")
    return 0


def cmd_compare(args) -> int:
    from hpc_seg.evaluation.report import compare

    print(f"wrote {compare(args.evals, args.out)}")
    return 0

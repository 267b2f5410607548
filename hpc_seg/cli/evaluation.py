"""Evaluation commands: ``export``, ``evaluate``, ``predict``, ``compare``."""

from __future__ import annotations

import argparse
import sys


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

    p = sub.add_parser("predict", help="segment a CT (NIfTI file, DICOM series folder, or a folder of them)")
    p.add_argument("model", help="an export (.safetensors or .onnx) or a run directory")
    p.add_argument("input", help="CT.nii.gz, a DICOM series folder (DICOM files in it), or a folder of cases")
    p.add_argument("--out", required=True, help="OUT.nii.gz or OUT.dcm (DICOM-SEG); a folder for a folder of cases")
    p.add_argument("--format", choices=["nifti", "dicom-seg"], default=None,
                   help="default: from --out (.dcm: dicom-seg), nifti for folders")
    p.add_argument("--series", default=None, metavar="UID", help="the SeriesInstanceUID to segment in a folder "
                   "holding several series")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (folders: redo done cases)")
    p.add_argument("--probs", default=None, help="also write probabilities to this .zarr (one CT only)")
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
    from hpc_seg.evaluation import cascade
    from hpc_seg.evaluation.model_io import export

    write = cascade.export if cascade.is_cascade_dir(args.run_dir) else export
    print(f"wrote {write(args.run_dir, args.out, args.tag)}")
    return 0


def cmd_evaluate(args) -> int:
    from hpc_seg.evaluation.evaluate import evaluate, print_summary

    res = evaluate(args.model, args.data, args.split, args.out, args.tag, args.tta, args.postprocess,
                   args.limit, args.cpu, save_predictions=args.save_predictions)
    print_summary(res)
    print(f"wrote {args.out}/metrics.json, per_case.csv and figures")
    return 0


def cmd_predict(args) -> int:
    from pathlib import Path

    from hpc_seg.errors import HpcSegError
    from hpc_seg.ingest.dicom_io import is_series_folder

    src = Path(args.input)
    if not src.exists():
        raise HpcSegError(f"{src}: no such file or folder")
    if src.is_dir() and not is_series_folder(src):
        if args.series or args.probs:
            raise HpcSegError(f"{src}: a folder of cases takes neither --series nor --probs (they are for one CT)")
        return _predict_folder(args)
    from hpc_seg.evaluation.predict import predict_file

    path, info = predict_file(args.model, src, args.out, args.tta, args.postprocess, args.probs, args.cpu,
                              args.format, args.series, args.overwrite)
    for line in info["left_out"]:
        print(f"left out {line}", file=sys.stderr)
    print(f"wrote {path}: {volumes_line(info)}")
    return 0


def volumes_line(info: dict) -> str:
    burden = "" if info.get("tumour_burden") is None else f", burden {100 * info['tumour_burden']:.2f} %"
    if not info.get("spacing_plausible", True):
        counted = f", {info['lesions']} lesion(s)" if "lesions" in info else ""
        return (f"no volumes: the spacing {info['spacing_mm']} mm gives a field of view of {info['field_of_view_mm']} mm, "
                f"no CT's{burden}{counted}")
    if "tumour_ml" in info:
        return (f"liver {info['liver_ml']:.1f} ml, tumour {info['tumour_ml']:.1f} ml{burden}, "
                f"{info['lesions']} lesion{'s' if info['lesions'] != 1 else ''}")
    return ", ".join(f"{k} {v:.1f} ml" for k, v in info["volumes_ml"].items())


def _predict_folder(args) -> int:
    from hpc_seg.evaluation.batch import predict_folder

    r = predict_folder(args.model, args.input, args.out, args.format, args.overwrite, args.tta, args.postprocess,
                       args.cpu, progress=sys.stderr.isatty())
    print(f"{len(r.done)} predicted, {len(r.skipped)} already done (--overwrite redoes them), {len(r.failed)} failed "
          f"→ {r.out_dir}/volumes.csv")
    for name, note in r.notes.items():
        print(f"  {name}: {note}", file=sys.stderr)
    if r.ignored:
        print(f"  ignored (not a NIfTI file or a folder): {', '.join(r.ignored)}", file=sys.stderr)
    if r.failed:
        print("failed cases (fix them and rerun; finished cases are kept):", file=sys.stderr)
        for name, err in r.failed.items():
            print(f"  {name}: {err}", file=sys.stderr)
        return 1
    return 0


def cmd_compare(args) -> int:
    from hpc_seg.evaluation.report import compare

    print(f"wrote {compare(args.evals, args.out)}")
    return 0

"""``hpc-seg`` command line: one sub-command per user action.

::

    hpc-seg demo                                     # phantom → Zarr → split → loader pass → training
    hpc-seg phantom OUT_DIR --cases 6 --shape 128 128 32
    hpc-seg prepare lits   /data/LiTS17       /scratch/lits.zarr --workers 8 --val 0.2 --test 0.2 --seed 0
    hpc-seg convert lits   /data/LiTS17       /scratch/lits.zarr --workers 8   # conversion alone
    hpc-seg convert msd    /data/Task03_Liver /scratch/msd.zarr
    hpc-seg convert kvasir /data/Kvasir-SEG   /scratch/kvasir.zarr
    hpc-seg convert ircadb /data/3Dircadb1    /scratch/ircadb.zarr     # DICOM, folders or .zip
    hpc-seg convert chaos  /data/CHAOS/Train_Sets/CT /scratch/chaos.zarr
    hpc-seg split   /scratch/lits.zarr --val 0.2 --test 0.2 --seed 0    # split + its preprocessing plan
    hpc-seg inspect /scratch/lits.zarr [--plan 0]
    hpc-seg config  --config configs/demo.yaml --set data.size=[128,128]   # print resolved config
    hpc-seg train   --config configs/tiny_cpu.yaml --run-dir runs/demo --resume latest
    hpc-seg submit  --config transunet_12l.yaml [--dry-run|--local|--wait]
    hpc-seg status  runs/demo
    hpc-seg export  runs/demo --out model.safetensors
    hpc-seg evaluate runs/demo --data outputs/phantom/phantom.zarr --split test --out eval/demo [--save-predictions]
    hpc-seg predict model.safetensors ct.nii.gz --out pred.nii.gz
    hpc-seg compare eval/a eval/b --out report/
    hpc-seg plan    --config configs/transunet_12l.yaml --gpus 8 --gpu-mem 40GB

Errors in the input (bad files, bad config) print one line naming the file and exit with 2;
a conversion that had to skip bad cases exits with 1 after converting all good ones.
"""

from __future__ import annotations

import argparse
import json
import sys

from hpc_seg.errors import HpcSegError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config (path or name inside configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), value parsed as YAML")


def cmd_convert(args) -> int:
    from hpc_seg.ingest.convert import convert

    report = convert(args.dataset, args.src, args.out, workers=args.workers, show_progress=not args.quiet)
    return _print_report(report)


def _print_report(report) -> int:
    from rich.console import Console

    Console(stderr=True).print(f"[green]{len(report.converted)} converted[/], {len(report.skipped)} already "
                               f"complete, [red]{len(report.failed)} failed[/] → {report.store}")
    for cid, note in sorted(report.notes.items()):
        print(f"  {cid}: {note}", file=sys.stderr)
    if report.failed:  # plain lines (no wrapping), so paths can be copied and grepped
        print("skipped cases (fix the file and rerun; converted cases are kept):", file=sys.stderr)
        for cid, err in sorted(report.failed.items()):
            print(f"  {cid}: {err}", file=sys.stderr)
        return 1
    return 0


def _kind_path(text: str) -> tuple[str, str]:
    from hpc_seg.ingest.kinds import kind_names

    kind, sep, path = text.partition(":")
    if not sep or kind not in kind_names() or not path:
        raise argparse.ArgumentTypeError(f"'{text}': expected KIND:PATH with KIND one of {', '.join(kind_names())}")
    return kind, path


def cmd_prepare(args) -> int:
    from hpc_seg.ingest.prepare import prepare

    if args.slurm:
        return _prepare_on_slurm(args)
    done = prepare(args.dataset, args.src, args.out, workers=args.workers, val=args.val, test=args.test,
                   seed=args.seed, show_progress=not args.quiet, resplit=args.resplit, extra=args.add)
    code = _print_report(done.report)
    if code:
        print("no split or plan written: rerun 'hpc-seg prepare' once the bad cases are fixed or removed",
              file=sys.stderr)
        return code
    p = done.plan
    print(f"{args.out}: split seed {args.seed}: " + ", ".join(f"{k} {len(v)}" for k, v in done.split.items()))
    print(f"preprocessing plan: {_plan_line(p)}")
    return 0


def _prepare_on_slurm(args) -> int:
    from hpc_seg.jobs.prepare_array import state_dir, submit_prepare

    if args.tasks < 1:
        raise HpcSegError(f"--tasks must be >= 1, got {args.tasks}")
    jobs, final = submit_prepare([(args.dataset, args.src), *args.add], args.out, args.tasks, args.site,
                                 args.val, args.test, args.seed, args.resplit)
    print(f"queued: array job {str(jobs[0].job_id).split('_')[0]} ({len(jobs)} tasks), finalizer job "
          f"{final.job_id} (afterany); reports in {state_dir(args.out)}")
    if not args.wait:
        return 0
    try:
        summary = final.result()
    except Exception:  # submitit re-raises the job's error with its traceback: report from the summary
        path = state_dir(args.out) / "summary.json"
        rep = json.loads(path.read_text()) if path.is_file() else {}
        print(f"hpc-seg prepare: error: {len(rep.get('failed', {}))} case(s) failed, array tasks "
              f"{rep.get('tasks_without_report', '?')} left no report; no split written (logs: "
              f"{state_dir(args.out) / 'logs'})", file=sys.stderr)
        for cid, err in sorted(rep.get("failed", {}).items()):
            print(f"  {cid}: {err}", file=sys.stderr)
        print("fix the sources and run the same command again (converted cases are kept)", file=sys.stderr)
        return 1
    print(f"{args.out}: {summary['cases']} cases; split seed {args.seed}: " +
          ", ".join(f"{k} {v}" for k, v in summary["split"].items()))
    return 0


def _plan_line(p) -> str:
    norm = (f"window [{p.window[0]:.0f}, {p.window[1]:.0f}] HU, " if p.window else "") + p.normalize
    if p.normalize == "zscore":
        norm += f" (mean {p.offset[0]:.1f}, std {p.scale[0]:.1f} HU, from {p.train_cases} training cases)"
    return f"{p.kind} {p.modality}, classes {list(p.classes)}, {p.channels} channel(s)/slice, {norm}"


def cmd_phantom(args) -> int:
    from hpc_seg.ingest.phantom import write_lits_phantom

    paths = write_lits_phantom(args.out, cases=args.cases, shape=tuple(args.shape), seed=args.seed,
                               compress=not args.uncompressed)
    print(f"wrote {len(paths)} phantom cases to {args.out}")
    return 0


def cmd_split(args) -> int:
    from hpc_seg.preprocessing.plan import read_plan
    from hpc_seg.ingest.split import write_split

    split = write_split(args.store, args.val, args.test, args.seed, from_file=args.from_file)
    print(f"{args.store}: split seed {args.seed}: " + ", ".join(f"{k} {len(v)}" for k, v in split.items()))
    print(f"preprocessing plan: {_plan_line(read_plan(args.store, args.seed))}")
    return 0


def cmd_inspect(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from hpc_seg.ingest.index import read_index
    from hpc_seg.storage.store import open_store

    open_store(args.store)
    index = read_index(args.store)
    classes = index["classes"]
    table = Table("case", "shape (z,y,x)", "spacing", *[f"{c} vox" for c in classes[1:]], "p0.5/p50/p99.5",
                  title=f"{args.store}: {index['dataset']}, {index['num_cases']} cases")
    for cid, entry in list(index["cases"].items())[: args.limit]:
        s = entry["stats"]
        pct = s["intensity_percentiles"]
        table.add_row(cid, "×".join(map(str, s["shape"])), "×".join(f"{v:.2f}" for v in s["spacing"]),
                      *[str(n) for n in s["label_counts"][1:]],
                      f"{pct['0.5'][0]:.0f}/{pct['50'][0]:.0f}/{pct['99.5'][0]:.0f}")
    Console().print(table)
    if args.plan is not None:
        import json

        from hpc_seg.preprocessing.plan import read_plan

        print(json.dumps(read_plan(args.store, args.plan).to_dict(), indent=1))
    return 0


def cmd_config(args) -> int:
    import yaml

    from hpc_seg.config import load_config, to_dict

    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def cmd_demo(args) -> int:
    from hpc_seg.demo import run_demo

    return run_demo(args.config, args.overrides)


def cmd_train(args) -> int:
    from hpc_seg.train import run

    return run(args)


def cmd_status(args) -> int:
    from hpc_seg.jobs.status import print_status

    return print_status(args.run_dir)


def cmd_export(args) -> int:
    from hpc_seg.evaluation.model_io import export

    path = export(args.run_dir, args.out, args.tag, plan_from_store=args.plan_from_store)
    print(f"wrote {path}")
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


def cmd_plan(args) -> int:
    from hpc_seg.config import load_config
    from hpc_seg.memory_plan.report import run_plan

    cfg = load_config(args.config, args.overrides)
    run_plan(cfg, args.gpus, args.gpu_mem, io=_model_io(cfg))
    return 0


def _model_io(cfg) -> tuple[int, int]:
    """(input, output) channels: from the store's preprocessing plan when prepared, else the kind's facts."""
    from hpc_seg.ingest.kinds import get_kind
    from hpc_seg.preprocessing.plan import read_plan
    from hpc_seg.ingest.prepare import is_prepared

    d = cfg.data
    if is_prepared(d.store, d.split_seed):
        p = read_plan(d.store, d.split_seed).resolve(d, cfg.loss.kind)
        return p.in_channels, p.out_channels
    kind = get_kind(d.dataset)
    k = d.slices if d.mode == "2.5d" else 1
    classes = len(kind.classes) if kind.classes else 3
    return kind.channels * k, 1 if cfg.loss.kind == "bce_dice" else classes


def cmd_submit(args) -> int:
    from hpc_seg.jobs.cli import run

    return run(args)


def _inference_flags(p: argparse.ArgumentParser) -> None:
    """--tta/--no-tta, --postprocess/--no-postprocess; unset: the model config's ``inference`` section."""
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="average over all in-plane mirrorings (default: the model's inference.tta)")
    p.add_argument("--postprocess", action=argparse.BooleanOptionalAction, default=None,
                   help="largest liver component, tumour inside it (default: the model's inference.postprocess)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpc-seg", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    from hpc_seg.ingest.kinds import kind_names

    p = sub.add_parser("prepare", help="convert + index + split + preprocessing plan, in one command")
    p.add_argument("dataset", choices=kind_names(), help="dataset kind of SRC")
    p.add_argument("src")
    p.add_argument("out", help="the Zarr store to write (or complete)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--val", type=float, default=0.2)
    p.add_argument("--test", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resplit", action="store_true", help="replace an existing split (and plan) of this seed")
    p.add_argument("--add", action="append", default=[], type=_kind_path, metavar="KIND:PATH",
                   help="another source of the same task into the same store (its classes a subset of the "
                        "store's, e.g. totalseg:/data/TotalSegmentator for liver-only CTs); repeatable")
    p.add_argument("--slurm", action="store_true", help="convert as a SLURM job array + a finalizer job "
                   "(index, split, plan) that depends on it (hpc_seg/jobs/prepare_array.py)")
    p.add_argument("--tasks", type=int, default=8, help="array tasks with --slurm (each converts cases i::N)")
    p.add_argument("--site", default=None, help="site profile for --slurm (default: $HPC_SEG_SITE, "
                   "~/.config/hpc-seg/site.yaml, the shipped one)")
    p.add_argument("--wait", action="store_true", help="with --slurm: wait for the finalizer and report")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("convert", help="convert a source of a dataset kind into a Zarr store (no split)")
    p.add_argument("dataset", choices=kind_names())
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("phantom", help="write synthetic abdominal CT cases in the LiTS layout")
    p.add_argument("out")
    p.add_argument("--cases", type=int, default=6)
    p.add_argument("--shape", type=int, nargs=3, default=[128, 128, 32], metavar=("X", "Y", "Z"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--uncompressed", action="store_true", help="write .nii instead of .nii.gz")
    p.set_defaults(func=cmd_phantom)

    p = sub.add_parser("split", help="write a seeded train/val/test split by case")
    p.add_argument("store")
    p.add_argument("--val", type=float, default=0.2)
    p.add_argument("--test", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--from", dest="from_file", default=None, help="use this JSON split ({train, val, test} "
                   "case lists) instead of drawing one; kept in the store under --seed")
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("inspect", help="show the case index of a store")
    p.add_argument("store")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--plan", type=int, default=None, metavar="SEED", help="also print the plan of this split seed")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("config", help="print the resolved config")
    _add_config_args(p)
    p.set_defaults(func=cmd_config)

    from hpc_seg.train import build_parser as train_parser

    p = train_parser(sub.add_parser("train", help="train with DeepSpeed (see hpc_seg/train.py)"))
    p.set_defaults(func=cmd_train)

    from hpc_seg.jobs.cli import build_parser as submit_parser

    p = submit_parser(sub.add_parser("submit", help="submit training to SLURM via submitit (or --local)"))
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("export", help="consolidate sharded checkpoints into one fp32 .safetensors")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True)
    p.add_argument("--tag", default="best", help="best (default, else latest), latest or stepNNNNNNNN")
    p.add_argument("--plan-from-store", default=None, metavar="STORE",
                   help="a run made before preprocessing plans: take the plan of STORE's split (the run's seed)")
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
    p.add_argument("model")
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

    p = sub.add_parser("plan", help="predict per-GPU memory under ZeRO 0-3 / precision / checkpointing")
    _add_config_args(p)
    p.add_argument("--gpus", type=int, default=None, help="data-parallel GPUs (default: the slurm request)")
    p.add_argument("--gpu-mem", default=None, help="memory per GPU for a recommendation, e.g. 40GB")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("status", help="jobs, steps, last checkpoint and metrics of a run directory")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("demo", help="end-to-end demo on the embedded default (phantom data)")
    _add_config_args(p)
    p.set_defaults(func=cmd_demo, config="demo.yaml")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except HpcSegError as exc:
        print(f"hpc-seg {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

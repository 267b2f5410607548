"""Data commands: ``prepare``, ``convert``, ``phantom``, ``split``, ``inspect``."""

from __future__ import annotations

import argparse
import json
import sys

from hpc_seg.errors import HpcSegError


def add_commands(sub) -> None:
    from hpc_seg.ingest.kinds import kind_names

    kinds = kind_names()
    _add_prepare(sub, kinds)
    p = sub.add_parser("convert", help="convert a source of a dataset kind into a Zarr store (no split)")
    _add_kind(p, kinds)
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--workers", type=int, default=1)
    _add_segment(p)
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
    _add_split_fractions(p)
    p.add_argument("--from", dest="from_file", default=None, help="use this JSON split ({train, val, test} "
                   "case lists) instead of drawing one; kept in the store under --seed")
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("inspect", help="show the case index of a store")
    p.add_argument("store")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--preprocessing-plan", type=int, default=None, metavar="SEED",
                   help="also print the preprocessing plan of this split seed")
    p.add_argument("--plan", dest="old_plan", type=int, default=None, help=argparse.SUPPRESS)  # the former name, until 0.4
    p.set_defaults(func=cmd_inspect)


def _add_kind(p: argparse.ArgumentParser, kinds: list[str]) -> None:
    p.add_argument("kind", choices=kinds, metavar="KIND", help=f"dataset kind of SRC (one of: {', '.join(kinds)})")


def _add_segment(p: argparse.ArgumentParser) -> None:
    p.add_argument("--segment", action="append", default=[], type=_label_class, metavar="LABEL=CLASS",
                   help="dicomseg: segments with this SegmentLabel (any case) are CLASS (liver, tumour; background "
                        "leaves them out), whatever their label's words say; repeatable")


def _label_class(text: str) -> tuple[str, str]:
    label, sep, cls = text.rpartition("=")
    if not sep or not label.strip() or not cls.strip():
        raise argparse.ArgumentTypeError(f"'{text}': expected LABEL=CLASS, e.g. 'Lesion 1=tumour'")
    return label.strip(), cls.strip()


def _kind_options(args) -> dict:
    """The kind-specific options of convert/prepare: ``--segment`` pairs, their classes checked."""
    if not args.segment:
        return {}
    from hpc_seg.ingest.kinds import KINDS, get_kind

    kind = get_kind(args.kind)
    if "segment" not in kind.options:
        takers = sorted(k for k, spec in KINDS.items() if "segment" in spec.options)
        raise HpcSegError(f"--segment applies to the kinds reading segment labels ({', '.join(takers)}), "
                          f"not to '{args.kind}'")
    bad = sorted({c for _, c in args.segment if c not in kind.classes})
    if bad:
        raise HpcSegError(f"--segment: unknown class {', '.join(bad)} (classes of {args.kind}: "
                          f"{', '.join(kind.classes[1:])}; background leaves the segment out)")
    return {"segment": dict(args.segment)}


def _add_split_fractions(p: argparse.ArgumentParser) -> None:
    p.add_argument("--val", type=float, default=0.2)
    p.add_argument("--test", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)


def _add_prepare(sub, kinds: list[str]) -> None:
    p = sub.add_parser("prepare", help="convert + index + split + preprocessing plan, in one command")
    _add_kind(p, kinds)
    p.add_argument("src")
    p.add_argument("out", help="the Zarr store to write (or complete)")
    p.add_argument("--workers", type=int, default=1)
    _add_split_fractions(p)
    p.add_argument("--resplit", action="store_true", help="replace an existing split (and plan) of this seed")
    p.add_argument("--add", action="append", default=[], type=_kind_path, metavar="KIND:PATH",
                   help="another source of the same task into the same store (its classes a subset of the "
                        "store's, e.g. totalseg:/data/TotalSegmentator for liver-only CTs); repeatable")
    _add_segment(p)
    p.add_argument("--slurm", action="store_true", help="convert as a SLURM job array + a finalizer job "
                   "(index, split, plan) that depends on it (hpc_seg/jobs/prepare_array.py)")
    p.add_argument("--tasks", type=int, default=8, help="array tasks with --slurm (each converts cases i::N)")
    p.add_argument("--site", default=None, help="site profile for --slurm (default: $HPC_SEG_SITE, "
                   "~/.config/hpc-seg/site.yaml, the shipped one)")
    p.add_argument("--wait", action="store_true", help="with --slurm: wait for the finalizer and report")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_prepare)


def _kind_path(text: str) -> tuple[str, str]:
    from hpc_seg.ingest.kinds import kind_names

    kind, sep, path = text.partition(":")
    if not sep or kind not in kind_names() or not path:
        raise argparse.ArgumentTypeError(f"'{text}': expected KIND:PATH with KIND one of {', '.join(kind_names())}")
    return kind, path


def cmd_convert(args) -> int:
    from hpc_seg.ingest.convert import convert

    report = convert(args.kind, args.src, args.out, workers=args.workers, show_progress=not args.quiet,
                     options=_kind_options(args))
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


def cmd_prepare(args) -> int:
    from hpc_seg.ingest.prepare import prepare

    options = _kind_options(args)
    if args.slurm:
        if options:  # the array tasks convert with each kind's defaults: refused rather than ignored
            raise HpcSegError("--segment does not reach the array tasks of --slurm: prepare without --slurm")
        return _prepare_on_slurm(args)
    done = prepare(args.kind, args.src, args.out, workers=args.workers, val=args.val, test=args.test,
                   seed=args.seed, show_progress=not args.quiet, resplit=args.resplit, extra=args.add,
                   options=options)
    code = _print_report(done.report)
    if code:
        print("no split or plan written: rerun 'hpc-seg prepare' once the bad cases are fixed or removed",
              file=sys.stderr)
        return code
    print(f"{args.out}: split seed {args.seed}: " + ", ".join(f"{k} {len(v)}" for k, v in done.split.items()))
    print(f"preprocessing plan: {_plan_line(done.plan)}")
    return 0


def _prepare_on_slurm(args) -> int:
    from hpc_seg.jobs.prepare_array import state_dir, submit_prepare

    if args.tasks < 1:
        raise HpcSegError(f"--tasks must be >= 1, got {args.tasks}")
    jobs, final = submit_prepare([(args.kind, args.src), *args.add], args.out, args.tasks, args.site,
                                 args.val, args.test, args.seed, args.resplit)
    print(f"queued: array job {str(jobs[0].job_id).split('_')[0]} ({len(jobs)} tasks), finalizer job "
          f"{final.job_id} (afterany); reports in {state_dir(args.out)}")
    if not args.wait:
        return 0
    try:
        summary = final.result()
    except Exception:  # submitit re-raises the job's error with its traceback: report from the summary
        _print_slurm_failure(state_dir(args.out))
        return 1
    print(f"{args.out}: {summary['cases']} cases; split seed {args.seed}: " +
          ", ".join(f"{k} {v}" for k, v in summary["split"].items()))
    return 0


def _print_slurm_failure(state) -> None:
    path = state / "summary.json"
    rep = json.loads(path.read_text()) if path.is_file() else {}
    print(f"hpc-seg prepare: error: {len(rep.get('failed', {}))} case(s) failed, array tasks "
          f"{rep.get('tasks_without_report', '?')} left no report; no split written (logs: "
          f"{state / 'logs'})", file=sys.stderr)
    for cid, err in sorted(rep.get("failed", {}).items()):
        print(f"  {cid}: {err}", file=sys.stderr)
    print("fix the sources and run the same command again (converted cases are kept)", file=sys.stderr)


def _plan_line(p) -> str:
    """One line for people: the preprocessing plan of a split."""
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
    from hpc_seg.ingest.split import write_split
    from hpc_seg.preprocessing.plan import read_plan

    split = write_split(args.store, args.val, args.test, args.seed, from_file=args.from_file)
    print(f"{args.store}: split seed {args.seed}: " + ", ".join(f"{k} {len(v)}" for k, v in split.items()))
    print(f"preprocessing plan: {_plan_line(read_plan(args.store, args.seed))}")
    return 0


def cmd_inspect(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from hpc_seg.ingest.index import read_index
    from hpc_seg.storage.store import open_store

    seed = args.preprocessing_plan
    if args.old_plan is not None:
        print("hpc-seg inspect: warning: --plan is deprecated, use --preprocessing-plan SEED (--plan goes in the "
              "next version)", file=sys.stderr)
        seed = args.old_plan if seed is None else seed
    open_store(args.store)
    index = read_index(args.store)
    classes = index["classes"]
    kind = index["kind"]  # read_index gives it under "kind" whatever name the store used
    table = Table("case", "shape (z,y,x)", "spacing", *[f"{c} vox" for c in classes[1:]], "p0.5/p50/p99.5",
                  title=f"{args.store}: {kind}, {index['num_cases']} cases")
    for cid, entry in list(index["cases"].items())[: args.limit]:
        s = entry["stats"]
        pct = s["intensity_percentiles"]
        table.add_row(cid, "×".join(map(str, s["shape"])), "×".join(f"{v:.2f}" for v in s["spacing"]),
                      *[str(n) for n in s["label_counts"][1:]],
                      f"{pct['0.5'][0]:.0f}/{pct['50'][0]:.0f}/{pct['99.5'][0]:.0f}")
    Console().print(table)
    if seed is not None:
        from hpc_seg.preprocessing.plan import read_plan

        print(json.dumps(read_plan(args.store, seed).to_dict(), indent=1))
    return 0

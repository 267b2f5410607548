"""Data preparation as one step: convert + index + split + preprocessing plan.

Commands::

    hpc-seg prepare lits   /data/LiTS17       /scratch/lits.zarr   --workers 8 --val 0.2 --test 0.2 --seed 0
    hpc-seg prepare msd    /data/Task09_Spleen /scratch/spleen.zarr
    hpc-seg prepare kvasir /data/Kvasir-SEG   /scratch/kvasir.zarr --val 0.1 --test 0.1
    hpc-seg prepare lits   /data/LiTS17       /scratch/liver.zarr --add totalseg:/data/TotalSegmentator \
                                                                  --add chaos:/data/CHAOS/Train_Sets/CT

Idempotent: complete cases are skipped, an existing split of the same seed is kept (with its
plan), so a rerun after a crash or after fixing a bad file finishes the job. The training engine
never imports this module: ``hpc-seg train`` calls :func:`prepare_for_config` in one process,
before any distributed start-up, and a distributed launch without a prepared store is an error
naming the command to run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hpc_seg.ingest.convert import ConversionReport, convert
from hpc_seg.storage import location as loc
from hpc_seg.storage.lock import store_lock
from hpc_seg.preprocessing.plan import PreprocessingPlan, read_plan
from hpc_seg.ingest.split import has_split, read_split, write_split
from hpc_seg.storage.store import has_meta
from hpc_seg.errors import StoreError


@dataclass
class Prepared:
    report: ConversionReport
    split: dict
    plan: PreprocessingPlan


def prepare(kind: str, src, store, workers: int = 1, val: float = 0.2, test: float = 0.2, seed: int = 0,
            show_progress: bool = True, resplit: bool = False, extra: list[tuple[str, str]] = (),
            options: dict | None = None) -> Prepared:
    """Convert ``src`` (and each ``(kind, path)`` of ``extra``: sources of the same task that may
    annotate fewer classes) into ``store``, then make the split of ``seed`` and its plan (kept when
    they exist, unless ``resplit``). A split is made only from conversions without failures.
    ``options``: kind-specific options of ``src``'s kind (``convert``), not of the extra sources.
    The store's lock is held throughout: a second preparation of it at the same time is refused."""
    with store_lock(store, f"hpc-seg prepare {kind} {src}") as token:
        report = convert(kind, src, store, workers=workers, show_progress=show_progress, lock_token=token,
                         options=options)
        for extra_kind, extra_src in extra:
            add_report(report, convert(extra_kind, extra_src, store, workers=workers,
                                          show_progress=show_progress, lock_token=token))
        if report.failed:
            return Prepared(report, {}, None)
        return Prepared(report, *split_and_plan(store, val, test, seed, resplit))


def add_report(report: ConversionReport, more: ConversionReport) -> ConversionReport:
    report.converted += more.converted
    report.skipped += more.skipped
    report.failed.update(more.failed)
    report.notes.update(more.notes)
    return report


def split_and_plan(store, val: float, test: float, seed: int, resplit: bool = False) -> tuple[dict, PreprocessingPlan]:
    """The split of ``seed`` (made, or kept when it exists unless ``resplit``) and its plan."""
    if resplit or not has_split(store, seed):
        split = write_split(store, val, test, seed)
    else:
        split = read_split(store, seed)
    return split, read_plan(store, seed)


def is_prepared(store, seed: int) -> bool:
    return loc.is_file(loc.join(store, "zarr.json")) and has_meta(store, "index") and has_split(store, seed)


def prepare_command(cfg) -> str:
    d = cfg.data
    adds = "".join(f" --add {e.kind}:{e.path}" for e in d.extra_sources)
    return (f"hpc-seg prepare {d.kind} {d.source or 'SRC'} {d.store}{adds} --val {d.val_fraction} "
            f"--test {d.test_fraction} --seed {d.split_seed}")


def prepare_for_config(cfg, workers: int = 2, log=print) -> None:
    """Make ``cfg.data.store`` ready for training (one process): convert ``data.source`` — or, for
    the ``phantom`` kind without a source, a generated phantom — then split and plan."""
    d = cfg.data
    store = loc.normalize(d.store)
    if is_prepared(store, d.split_seed):
        return
    if loc.is_file(loc.join(store, "zarr.json")) and has_meta(store, "index"):
        log(f"splitting {store} (seed {d.split_seed}) and computing its preprocessing plan")
        write_split(store, d.val_fraction, d.test_fraction, d.split_seed)
        return
    source = d.source
    if source is None:
        if d.kind != "phantom":
            raise StoreError(f"{store}: no store and no data.source to prepare it from; run: {prepare_command(cfg)}")
        from hpc_seg.ingest.phantom import write_lits_phantom

        if loc.is_remote(store):
            raise StoreError(f"{store}: the generated phantom is written to local stores only; "
                             "prepare it locally, or set data.source")
        source = Path(store).parent / "phantom-nifti"
        log(f"generating a synthetic CT phantom in {source}")
        write_lits_phantom(source, cases=8, shape=(128, 128, 32), seed=d.split_seed)
    log(f"preparing {source} → {store}")
    done = prepare(d.kind, source, store, workers=workers, val=d.val_fraction, test=d.test_fraction,
                   seed=d.split_seed, extra=[(e.kind, e.path) for e in d.extra_sources])
    if done.report.failed:
        raise StoreError(f"{source}: conversion failed for {sorted(done.report.failed)}: " +
                         "; ".join(done.report.failed.values()))

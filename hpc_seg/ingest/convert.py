"""Convert a source of any registered dataset kind (``hpc_seg.ingest.kinds``) into the Zarr store.

Commands (``hpc-seg prepare`` does this plus split and preprocessing plan)::

    hpc-seg convert lits   /data/LiTS17        /scratch/lits.zarr   --workers 8
    hpc-seg convert msd    /data/Task03_Liver  /scratch/msd.zarr     # any single-channel CT MSD task
    hpc-seg convert kvasir /data/Kvasir-SEG    /scratch/kvasir.zarr

Idempotent: complete cases are skipped; half-written ones are rewritten. A bad case (corrupt
file, mismatched volume/segmentation, labels out of range, NaN voxels, missing segmentation,
unreadable JPEG, mask size mismatch) is skipped and reported with its file and problem; the
command then exits with status 1, leaving every good case converted.
"""

from __future__ import annotations

import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from hpc_seg.storage import store as zstore
from hpc_seg.ingest.index import case_stats, write_index
from hpc_seg.ingest.kinds import CaseSource, get_kind
from hpc_seg.storage.lock import store_lock
from hpc_seg.errors import HpcSegError, InputDataError

@dataclass
class ConversionReport:
    store: str  # a local path or an object-store URL (hpc_seg.storage.location)
    converted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already complete
    failed: dict[str, str] = field(default_factory=dict)  # case_id -> "file: problem"
    notes: dict[str, str] = field(default_factory=dict)  # case_id -> what the reader left out (IRCADb structures)

    @property
    def ok(self) -> bool:
        return not self.failed


def convert_case(kind: str, src: CaseSource, store_path: str, classes: list[str],
                 store_classes: list[str] | None = None) -> tuple[str, str, dict | None]:
    """Worker: convert one case. Returns (case_id, 'ok'|'skipped'|'failed', stats|error).
    ``store_classes``: the store's, when the source marks only some of them (labels renumbered by
    class name; the case records the classes it annotates)."""
    if zstore.case_complete(store_path, src.case_id):
        return src.case_id, "skipped", None
    try:
        image, label, spacing, meta = get_kind(kind).load(src, classes)
    except InputDataError as exc:
        return src.case_id, "failed", {"error": str(exc)}
    if store_classes is not None and list(store_classes) != list(classes):
        label = np.array([store_classes.index(c) for c in classes], np.uint8)[label]
        meta["annotated"], meta["kind"] = list(classes), kind
        classes = store_classes
    stats = case_stats(image, label, len(classes), spacing)
    unit = meta.pop("spacing_unit")
    note = meta.pop("notes", "")
    zstore.write_case(store_path, src.case_id, image, label, {**meta, "case_id": src.case_id,
                      "stats": stats}, spacing, unit)
    return src.case_id, "ok", {"note": note} if note else None


def _single_threaded_worker() -> None:
    """One core per worker process: the pool, not threads inside each worker, gives parallelism."""
    import numcodecs
    import zarr

    numcodecs.blosc.set_nthreads(1)
    zarr.config.set({"threading.max_workers": 1})


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]convert"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("{task.description}"), transient=False)


def convert(kind: str, src: str | Path, out: str | Path, workers: int = 1, show_progress: bool = True,
            layout: str = zstore.FORMAT, part: tuple[int, int] | None = None, index: bool = True,
            lock_token: str | None = None, options: dict | None = None) -> ConversionReport:
    """Convert every case of ``src`` into the store ``out``; returns a report (see module doc).

    ``layout``: of a new store (an existing one keeps its own); ``hpc-seg/zarr-v2`` = unsharded.
    ``part=(i, n)``: only cases ``i::n`` of the source (one array task of ``prepare --slurm``), and
    ``index=False`` leaves the index to the finalizer. The store's lock (``hpc_seg.storage.lock``) is
    held throughout, or checked to be ``lock_token``'s (a shared preparation's). ``options``: the
    kind-specific options its ``load`` reads (``DatasetKind.options`` names them; others refused)."""
    spec = get_kind(kind)
    unknown = sorted(set(options or {}) - set(spec.options))
    if unknown:
        raise HpcSegError(f"dataset kind '{kind}' takes no option {', '.join(unknown)}"
                          + (f" (its options: {', '.join(spec.options)})" if spec.options else ""))
    found = spec.discover(Path(src))
    sources, classes = found.cases, found.classes
    if options:
        sources = [replace(s, options=dict(options)) for s in sources]
    if part is not None:
        sources = sources[part[0]::part[1]]
    with store_lock(out, f"hpc-seg convert {kind} {src}", lock_token):
        root = zstore.create_or_open_store(out, kind, spec.store_info(classes), layout=layout)
        store_classes = list(root.attrs["hpc_seg"]["classes"])
        report = _convert_cases(kind, sources, out, classes, store_classes, workers, show_progress)
        if index:
            rebuild_index(out, root)
    return report


def _convert_cases(kind, sources, out, classes, store_classes, workers, show_progress) -> ConversionReport:
    report = ConversionReport(zstore.loc.normalize(out))
    pool = None
    if workers > 1:
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                   initializer=_single_threaded_worker)
    try:
        with _progress() if show_progress else _NullProgress() as progress:
            task = progress.add_task("", total=len(sources))
            if pool is None:
                results = (convert_case(kind, s, str(out), classes, store_classes) for s in sources)
            else:
                futures = [pool.submit(convert_case, kind, s, str(out), classes, store_classes)
                           for s in sources]
                results = (f.result() for f in as_completed(futures))
            for case_id, status, info in results:
                if status == "failed":
                    report.failed[case_id] = info["error"]
                else:
                    if info and info.get("note"):
                        report.notes[case_id] = info["note"]
                    (report.converted if status == "ok" else report.skipped).append(case_id)
                progress.update(task, advance=1, description=case_id)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return report


def rebuild_index(out: str | Path, root=None) -> str:
    """Gather the stats of every complete case into the store's index."""
    root = root if root is not None else zstore.open_store(out, mode="r")
    meta = zstore.root_info(root)
    cases = {}
    for cid in zstore.list_cases(root):
        attrs = root["cases"][cid].attrs["hpc_seg"]
        cases[cid] = {"stats": attrs["stats"], "source": attrs.get("source")}
        if attrs.get("annotated") is not None:  # a source that marks only some of the store's classes
            cases[cid]["annotated"] = attrs["annotated"]
    return write_index(out, meta["kind"], meta["classes"], cases)


class _NullProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *a, **k):
        return 0

    def update(self, *a, **k):
        pass

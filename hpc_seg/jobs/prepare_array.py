"""Data preparation as a SLURM job array (``hpc-seg prepare … --slurm``).

    hpc-seg prepare lits /lustre/LiTS17 /lustre/lits.zarr --slurm --tasks 16 --site site.yaml --wait
    hpc-seg prepare lits /lustre/LiTS17 /lustre/liver.zarr --add totalseg:/lustre/TotalSeg --slurm --tasks 64

1. At submission (login node): the store's lock is taken for the whole preparation (shared by its
   jobs, ``hpc_seg.storage.lock``), the store is created or opened (every source checked to fit), and
   ``--tasks`` array tasks are queued: task i converts cases ``i::N`` of every source. Each is
   idempotent — complete cases are skipped, half-written ones redone — so a requeued or rerun task
   is safe; a task that skipped a bad case writes its report and exits non-zero.
2. A finalizer job, ``afterany`` on the whole array, writes the index, the split and the
   preprocessing plan (the same functions as a one-process ``prepare``: the same arrays, index,
   split and plan), reports every failed case and every task that left no report, and releases the
   lock. With failures it writes no split and exits non-zero; fix the files and run the same
   command again (converted cases are kept).

Job resources come from the site profile's ``slurm:`` section (partition, account, qos, setup
lines, time); tasks use no GPU and ``cpus_per_task`` conversion workers each. Reports and submitit
logs live beside the store in ``STORE.zarr.prepare/``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import submitit

from hpc_seg.storage import lock
from hpc_seg.ingest.convert import ConversionReport, convert, rebuild_index
from hpc_seg.ingest.kinds import get_kind
from hpc_seg.storage.location import is_remote
from hpc_seg.ingest.prepare import add_report, split_and_plan
from hpc_seg.storage.store import FORMAT, create_or_open_store
from hpc_seg.errors import HpcSegError
from hpc_seg.storage.atomic import atomic_write_json


def state_dir(store) -> Path:
    store = Path(store)
    return store.with_name(store.name + ".prepare")


def convert_part(sources: list[tuple[str, str]], store: str, part: int, parts: int, token: str,
                 workers: int = 1) -> dict:
    """Array task ``part``: cases ``part::parts`` of every source; report written before any error."""
    report = ConversionReport(store)
    for kind, src in sources:
        add_report(report, convert(kind, src, store, workers=workers, show_progress=False,
                                      part=(part, parts), index=False, lock_token=token))
    summary = {"part": part, "parts": parts, "converted": report.converted, "skipped": report.skipped,
               "failed": report.failed, "notes": report.notes}
    atomic_write_json(state_dir(store) / f"part-{part:05d}.json", summary)
    if report.failed:
        raise RuntimeError(f"{len(report.failed)} case(s) failed: " + "; ".join(report.failed.values()))
    return summary


def finalize(store: str, parts: int, token: str, val: float, test: float, seed: int, resplit: bool) -> dict:
    """After every array task (whatever its fate): index, then split and plan if nothing failed."""
    try:
        lock.check(store, token)
        rebuild_index(store)
        failed, notes, missing, converted = {}, {}, [], 0
        for i in range(parts):
            path = state_dir(store) / f"part-{i:05d}.json"
            if not path.is_file():
                missing.append(i)
                continue
            rep = json.loads(path.read_text())
            failed.update(rep["failed"])
            notes.update(rep["notes"])
            converted += len(rep["converted"]) + len(rep["skipped"])
        summary = {"store": store, "parts": parts, "cases": converted, "failed": failed, "notes": notes,
                   "tasks_without_report": missing}
        if not failed and not missing:
            split, plan = split_and_plan(store, val, test, seed, resplit)
            summary["split"] = {k: len(v) for k, v in split.items()}
            summary["plan"] = plan.to_dict()
        atomic_write_json(state_dir(store) / "summary.json", summary)
    finally:
        lock.release(store, token)
    if failed or missing:
        raise RuntimeError(f"{store}: {len(failed)} case(s) failed, array tasks {missing} left no report; no split "
                           "written — fix the sources and run the same prepare command again: "
                           + "; ".join(f"{c}: {e}" for c, e in sorted(failed.items())))
    return summary


def _executor(folder: Path, site, name: str, tasks: int, dependency: str | None = None) -> submitit.AutoExecutor:
    s = site
    if shutil.which("sbatch") is None:
        raise HpcSegError("prepare --slurm needs SLURM (sbatch not found); without a cluster run "
                          "'hpc-seg prepare' with --workers N")
    ex = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
    params = {"name": name, "nodes": 1, "tasks_per_node": 1, "cpus_per_task": s.cpus_per_task,
              "timeout_min": s.timeout_min, "slurm_array_parallelism": min(s.array_parallelism, tasks),
              "slurm_setup": list(s.setup), "slurm_additional_parameters": dict(s.extra)}
    if dependency:
        params["slurm_additional_parameters"]["dependency"] = dependency
    for key in ("partition", "mem", "account", "qos", "constraint"):
        if getattr(s, key):
            params[f"slurm_{key}"] = getattr(s, key)
    ex.update_parameters(**params)
    return ex


def submit_prepare(sources: list[tuple[str, str]], store: str, tasks: int, site_file=None, val: float = 0.2,
                   test: float = 0.2, seed: int = 0, resplit: bool = False) -> tuple[list, submitit.Job]:
    """Queue the array and its finalizer; returns (array jobs, finalizer job)."""
    from hpc_seg.jobs.submit import load_site

    site = load_site(site_file)
    if is_remote(store):
        raise HpcSegError(f"{store}: 'prepare --slurm' keeps its task reports and logs beside the store on a "
                          "shared filesystem; prepare an object-store URL without --slurm (--workers N), or "
                          "prepare on the parallel filesystem and copy the store")
    store = str(Path(store).resolve())
    sources = [(k, str(Path(p).resolve())) for k, p in sources]
    token = lock.acquire(store, f"hpc-seg prepare --slurm ({tasks} tasks)", shared=True)
    try:
        for kind, src in sources:  # every source must fit the store before anything is queued
            k = get_kind(kind)
            create_or_open_store(store, kind, k.store_info(k.discover(Path(src)).classes), layout=FORMAT)
        folder = state_dir(store)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        name = f"prepare-{Path(store).stem}"
        ex = _executor(folder / "logs", site, name, tasks)
        workers = site.cpus_per_task
        jobs = ex.map_array(convert_part, [sources] * tasks, [store] * tasks, list(range(tasks)), [tasks] * tasks,
                            [token] * tasks, [workers] * tasks)
        array_id = str(jobs[0].job_id).split("_")[0]
        fin = _executor(folder / "logs", site, name + "-finalize", 1, dependency=f"afterany:{array_id}")
        final = fin.submit(finalize, store, tasks, token, val, test, seed, resplit)
    except BaseException:
        lock.release(store, token)
        raise
    return jobs, final

"""Data preparation as a SLURM job array on the real local cluster: the array + afterany finalizer
gives what a one-process prepare gives; a bad case fails the preparation with a report, no split,
and the lock released."""

import json
from pathlib import Path
import shutil
import subprocess
import sys

import numpy as np
import zarr

from hpc_seg.ingest.index import read_index
from hpc_seg.storage.lock import lock_path
from hpc_seg.ingest.prepare import prepare
from hpc_seg.ingest.split import has_split, read_split
from tests.jobs.conftest import ROOT, SITE


def run_prepare(src, store, *more):
    cmd = [sys.executable, "-m", "hpc_seg", "prepare", "lits", str(src), str(store), "--slurm", "--tasks", "3",
           "--site", str(SITE), "--wait", "--quiet", *more]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def _without_sources(index):
    return {c: {k: v for k, v in e.items() if k != "source"} for c, e in index["cases"].items()}


def test_array_prepare_equals_single_process(slurm_cluster, phantom_dir, tmp_path):
    store = tmp_path / "array.zarr"
    r = run_prepare(phantom_dir, store)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 tasks" in r.stdout and "train" in r.stdout
    ref = tmp_path / "single.zarr"
    assert prepare("lits", phantom_dir, ref, show_progress=False).report.ok
    assert read_split(store, 0) == read_split(ref, 0)
    assert _without_sources(read_index(store)) == _without_sources(read_index(ref))
    a, b = zarr.open_group(str(store), mode="r"), zarr.open_group(str(ref), mode="r")
    for cid in read_index(ref)["cases"]:
        for arr in ("image", "label"):
            assert np.array_equal(a["cases"][cid][arr][...], b["cases"][cid][arr][...])
    summary = json.loads((tmp_path / "array.zarr.prepare" / "summary.json").read_text())
    assert summary["cases"] == 6 and not summary["failed"] and not Path(lock_path(store)).exists()


def test_bad_case_fails_the_array_with_a_report_and_no_split(slurm_cluster, phantom_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(phantom_dir, src)
    (src / "volume-4.nii.gz").write_bytes(b"not a nifti at all")
    store = tmp_path / "bad.zarr"
    r = run_prepare(src, store)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "lits_0004" in r.stderr and "volume-4.nii.gz" in r.stderr and "no split" in r.stderr
    assert not has_split(store, 0) and not Path(lock_path(store)).exists()
    assert len(read_index(store)["cases"]) == 5  # the good cases are converted and indexed
    (src / "volume-4.nii.gz").write_bytes((phantom_dir / "volume-4.nii.gz").read_bytes())
    r = run_prepare(src, store)  # fixed: the same command finishes the job
    assert r.returncode == 0, r.stdout + r.stderr
    assert has_split(store, 0) and len(read_index(store)["cases"]) == 6

"""Benchmark: random 2.5D samples/s from the Zarr store vs NIfTI access patterns, bytes on disk,
and conversion speed-up with 2 workers vs 1.

A sample is 3 adjacent 512×512 int16 slices + the centre label slice, read into memory (numpy).
Compared, on the same random (case, slice) list, page cache warm, one process:

  zarr        hpc-seg's dataset read path (``ZarrSliceDataset.read``) on the sharded store
              (``hpc-seg/zarr-v3``: one shard file per array per case, crc32c-checked chunks)
  zarr_unsharded  the same on an unsharded copy (``hpc-seg/zarr-v2``: one file per chunk)
  (a) whole   load the whole volume + segmentation per sample (``.nii.gz`` and ``.nii``), then slice
  (b) proxy   nibabel ArrayProxy slicing of ``.nii.gz`` (image objects kept open)
  (c) mmap    nibabel mmap slicing of uncompressed ``.nii`` (image objects kept open), copied out

Run::

    python bench/data_loading.py                       # → bench/results/data_loading.json
    python bench/data_loading.py --cases 2 --depth 32 --samples 50 --out /tmp/x.json   # quick

Figures are ratios measured in one run (machines are noisy); see bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# torch-importing modules are imported inside functions: conversion workers are spawned and
# re-import this script, so heavy top-level imports would be charged to the conversion speed-up.
from hpc_seg.ingest.convert import convert
from hpc_seg.ingest.phantom import generate_case
from hpc_seg.storage.atomic import atomic_write_json


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def make_sources(work: Path, cases: int, shape) -> tuple[Path, Path]:
    gz, raw = work / "nii-gz", work / "nii"
    gz.mkdir(parents=True, exist_ok=True)
    raw.mkdir(parents=True, exist_ok=True)
    for i in range(cases):
        c = generate_case(shape, seed=1000 + i)
        for kind, arr in (("volume", c.volume), ("segmentation", c.label)):
            img = nib.Nifti1Image(arr, c.affine)
            nib.save(img, gz / f"{kind}-{i}.nii.gz")
            nib.save(img, raw / f"{kind}-{i}.nii")
    return gz, raw


def time_per_sample(fn, samples) -> float:
    t0 = time.perf_counter()
    for ci, z in samples:
        fn(ci, z)
    return (time.perf_counter() - t0) / len(samples)


def files_in(path: Path) -> int:
    return sum(1 for f in Path(path).rglob("*") if f.is_file())


def _dataset(store: Path, cases: int, train: bool = False):
    from hpc_seg.config import load_config
    from hpc_seg.training.dataset import ZarrSliceDataset
    from hpc_seg.ingest.split import has_split, write_split

    if not has_split(store, 0):
        write_split(store, 0.0, 0.0, 0)  # the plan that the dataset's preprocessing reads
    cfg = load_config(None, [f"data.store={store}", "data.mode=2.5d", "data.slices=3", "data.size=[512,512]"]).data
    return ZarrSliceDataset(store, [f"lits_{i:04d}" for i in range(cases)], cfg, train=train)


def readers(store: Path, gz: Path, raw: Path, cases: int, unsharded: Path):
    ds, ds_v2, ds_train = _dataset(store, cases), _dataset(unsharded, cases), _dataset(store, cases, train=True)
    index_of = {(ci, z): i for i, (ci, z) in enumerate(ds_train.items.tolist())}
    # the store is RAS-canonical (Z, Y, X); NIfTI slices are taken in file order (X, Y, Z)
    gz_imgs = [(nib.load(gz / f"volume-{i}.nii.gz"), nib.load(gz / f"segmentation-{i}.nii.gz"))
               for i in range(cases)]
    mm_imgs = [(nib.load(raw / f"volume-{i}.nii", mmap=True), nib.load(raw / f"segmentation-{i}.nii", mmap=True))
               for i in range(cases)]

    def whole(folder, ext):  # mmap=False: really read the whole file, as a naive loader does
        def read(ci, z):
            v = np.asanyarray(nib.load(folder / f"volume-{ci}{ext}", mmap=False).dataobj)
            s = np.asanyarray(nib.load(folder / f"segmentation-{ci}{ext}", mmap=False).dataobj)
            return v[:, :, z - 1:z + 2].copy(), s[:, :, z].copy()
        return read

    def sliced(imgs):
        def read(ci, z):
            v, s = imgs[ci]
            return np.array(v.dataobj[:, :, z - 1:z + 2]), np.array(s.dataobj[:, :, z])
        return read

    return {
        "zarr": lambda ci, z: ds.read(ci, z),
        "zarr_unsharded": lambda ci, z: ds_v2.read(ci, z),
        # the whole training item on one core: read + window/normalise at 512² + augmentation
        "zarr_train_item": lambda ci, z: ds_train[(index_of[(ci, z)], 0)],
        "a_whole_nii_gz": whole(gz, ".nii.gz"),
        "a_whole_nii": whole(raw, ".nii"),
        "b_proxy_nii_gz": sliced(gz_imgs),
        "c_mmap_nii": sliced(mm_imgs),
    }


def conversion_speedup(gz: Path, work: Path) -> dict:
    """1 worker vs 2, with the same threading: the 1-worker run converts in this process with
    Blosc and zarr single-threaded, as each of the 2 spawned workers is (one core per worker)."""
    from hpc_seg.ingest.convert import _single_threaded_worker

    _single_threaded_worker()
    times = {}
    for workers in (1, 2):
        out = work / f"convert-w{workers}.zarr"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        convert("lits", gz, out, workers=workers, show_progress=False)
        times[workers] = time.perf_counter() - t0
    return {"seconds_1_worker": times[1], "seconds_2_workers": times[2], "speedup_2_vs_1": times[1] / times[2]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--depth", type=int, default=96)
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--whole-samples", type=int, default=12, help="samples for the slow (a) methods")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", default="/tmp/hpc-seg-bench-data")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "data_loading.json"))
    args = ap.parse_args(argv)

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    gz, raw = make_sources(work, args.cases, (args.size, args.size, args.depth))
    conv = conversion_speedup(gz, work)
    store, unsharded = work / "convert-w2.zarr", work / "unsharded.zarr"
    from hpc_seg.storage.store import UNSHARDED

    convert("lits", gz, unsharded, workers=2, show_progress=False, layout=UNSHARDED)
    import torch

    torch.set_num_threads(1)  # per-core figures: a DataLoader worker is one core
    fns = readers(store, gz, raw, args.cases, unsharded)
    rng = np.random.default_rng(0)
    samples = [(int(rng.integers(args.cases)), int(rng.integers(1, args.depth - 1))) for _ in range(args.samples)]
    for name, fn in fns.items():  # warm the page cache and lazy opens
        time_per_sample(fn, samples[:3])
    per_round = {name: [] for name in fns}
    for _ in range(args.rounds):  # interleave methods so that machine noise hits them alike
        for name, fn in fns.items():
            n = args.whole_samples if name.startswith("a_") else len(samples) // (4 if name.endswith("item") else 1)
            per_round[name].append(time_per_sample(fn, samples[:n]))
    sec = {k: statistics.median(v) for k, v in per_round.items()}
    sps = {k: 1.0 / v for k, v in sec.items()}
    nbytes = {"zarr": dir_bytes(store), "zarr_unsharded": dir_bytes(unsharded), "nii": dir_bytes(raw),
              "nii_gz": dir_bytes(gz)}
    files = {"zarr": files_in(store), "zarr_unsharded": files_in(unsharded),
             "zarr_per_case": files_in(store / "cases" / "lits_0000"),
             "zarr_unsharded_per_case": files_in(unsharded / "cases" / "lits_0000")}
    result = {
        "setup": {"cases": args.cases, "shape_xyz": [args.size, args.size, args.depth], "samples": args.samples,
                  "sample": "3 slices int16 + centre label slice", "cpu_count": os.cpu_count()},
        "samples_per_s": sps,
        "ratios": {
            "zarr_vs_a_whole_nii_gz": sps["zarr"] / sps["a_whole_nii_gz"],
            "zarr_vs_a_whole_nii": sps["zarr"] / sps["a_whole_nii"],
            "zarr_vs_b_proxy_nii_gz": sps["zarr"] / sps["b_proxy_nii_gz"],
            "zarr_vs_c_mmap_nii": sps["zarr"] / sps["c_mmap_nii"],
            "zarr_unsharded_vs_c_mmap_nii": sps["zarr_unsharded"] / sps["c_mmap_nii"],
            "zarr_vs_zarr_unsharded": sps["zarr"] / sps["zarr_unsharded"],
            "bytes_zarr_vs_nii": nbytes["zarr"] / nbytes["nii"],
            "bytes_zarr_vs_nii_gz": nbytes["zarr"] / nbytes["nii_gz"],
        },
        "bytes": nbytes,
        "files": files,
        "conversion": conv,
        "targets": {"zarr_vs_a >=": 200, "zarr_vs_c >=": 0.7, "bytes_zarr_vs_nii <=": 0.45, "files_per_case <=": 5},
    }
    atomic_write_json(args.out, result)
    from rich.console import Console
    from rich.table import Table

    t = Table("measure", "value", title=f"data loading benchmark → {args.out}")
    for k, v in sps.items():
        t.add_row(f"samples/s {k}", f"{v:,.1f}")
    for k, v in {**result["ratios"], "conversion speed-up 2 vs 1 workers": conv["speedup_2_vs_1"]}.items():
        t.add_row(k, f"{v:.3f}")
    for k, v in files.items():
        t.add_row(f"files {k}", str(v))
    Console().print(t)
    return result


if __name__ == "__main__":
    main()

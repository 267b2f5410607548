"""Benchmark: reading training samples from an object store (S3) — requests and bytes per sample,
with and without a local read cache — against the same store on local disk.

A real S3-compatible server runs on 127.0.0.1 (``bench/local_s3.py``: moto's server). Its speed
says little about real S3 (no network, no per-request latency of 10–50 ms), so the figures that
carry over are **counts**: HTTP requests per sample (as the server logged them) and bytes per
sample, which with a site's request latency and bandwidth give the loader's cost there. Samples are
the dataset's 2.5D read path (``ZarrSliceDataset.read``: 3 adjacent slices + the centre label
slice) on random (case, slice) pairs of realistic 512² CT cases.

Measured per mode with a fresh dataset (what a new DataLoader worker sees): the requests and bytes
to open it and touch each case once, then per sample in the steady state:

  local        the store on local disk (``pread`` of byte ranges)
  s3           ``s3://`` without cache: one suffix-range GET per shard for its index (once per
               process), then one ranged GET per chunk (k image slices + 1 label slice)
  s3_cache     ``data.cache``: each shard fetched whole once (HEAD for its ETag + one GET) into a
               local cache, then ``pread``; ``cold`` = first pass, ``warm`` = a new process
               (new reader) over the same samples with the cache filled

Run::

    python bench/object_store.py                      # → bench/results/object_store.json
    python bench/object_store.py --cases 2 --size 64 --depth 16 --samples 40 --out /tmp/o.json   # quick
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.data_loading import dir_bytes, make_sources  # noqa: E402
from bench.local_s3 import local_s3  # noqa: E402
from hpc_seg.storage.atomic import atomic_write_json  # noqa: E402


def _dataset(store: str, cases: int, cache: str | None = None):
    from hpc_seg.config import load_config
    from hpc_seg.training.dataset import ZarrSliceDataset

    sets = [f"data.store={store}", "data.mode=2.5d", "data.slices=3", "data.size=[512,512]"]
    cfg = load_config(None, sets + ([f"data.cache={cache}"] if cache else [])).data
    return ZarrSliceDataset(store, [f"lits_{i:04d}" for i in range(cases)], cfg, train=False)


def _counted(ds) -> tuple[int, int]:
    """Requests and bytes the dataset's readers have made so far (client side)."""
    req = byt = 0
    for image, label in ds._arrays.values():
        for r in (image, label):
            files = getattr(r, "files", None)
            req += getattr(files, "requests", 0)
            byt += getattr(files, "bytes", 0)
    return req, byt


def _pass(server, ds, samples) -> dict:
    before = server.requests() if server else {}
    r0, b0 = _counted(ds)
    t0 = time.perf_counter()
    for ci, z in samples:
        ds.read(ci, z)
    dt = time.perf_counter() - t0
    r1, b1 = _counted(ds)
    after = server.requests() if server else {}
    logged = {m: after.get(m, 0) - before.get(m, 0) for m in ("GET", "HEAD")}
    return {"seconds": dt, "requests": sum(logged.values()), "by_method": logged,
            "client_requests": r1 - r0, "bytes": b1 - b0}


def measure(server, make, cases: int, depth: int, samples) -> dict:
    """A fresh dataset (a new process's view): opening it and touching each case once (store and
    case metadata, shard indexes or whole shards into the cache), then the steady state per sample."""
    before = server.requests() if server else {}
    ds = make()
    opened = _pass(server, ds, [(ci, depth // 2) for ci in range(cases)])
    if server:
        opened["requests"] = sum(server.requests().values()) - sum(before.values())  # all methods, with the init
    steady = _pass(server, ds, samples)
    n = len(samples)
    return {"open_requests": opened["requests"], "open_bytes": opened["bytes"],
            "requests_per_sample": steady["requests"] / n, "requests_by_method": steady["by_method"],
            "client_requests_per_sample": steady["client_requests"] / n, "bytes_per_sample": steady["bytes"] / n,
            "samples_per_s": n / steady["seconds"]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=6)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--depth", type=int, default=64)
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--work", default="/tmp/hpc-seg-bench-s3")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "object_store.json"))
    args = ap.parse_args(argv)

    import torch

    from hpc_seg.ingest.prepare import prepare

    torch.set_num_threads(1)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    gz, _ = make_sources(work, args.cases, (args.size, args.size, args.depth))
    rng = np.random.default_rng(0)
    samples = [(int(rng.integers(args.cases)), int(rng.integers(1, args.depth - 1))) for _ in range(args.samples)]
    with local_s3(work / "s3.log") as server:
        url, local = "s3://hpc-seg/bench.zarr", str(work / "bench.zarr")
        t0 = time.perf_counter()
        prepare("lits", gz, url, val=0.0, test=0.0, seed=0, show_progress=False)
        prep_s3 = time.perf_counter() - t0
        t0 = time.perf_counter()
        prepare("lits", gz, local, val=0.0, test=0.0, seed=0, show_progress=False)
        prep_local = time.perf_counter() - t0
        cache = str(work / "cache")
        res = {}
        for name, store, server_, cached in (("local", local, None, None), ("s3", url, server, None),
                                             ("s3_cache_cold", url, server, cache), ("s3_cache_warm", url, server, cache)):
            res[name] = measure(server_, lambda: _dataset(store, args.cases, cached), args.cases, args.depth, samples)
    nbytes_sample = 2 * 3 * args.size * args.size + args.size * args.size  # raw int16 ×3 + uint8 label
    result = {
        "setup": {"cases": args.cases, "shape_xyz": [args.size, args.size, args.depth], "samples": args.samples,
                  "sample": "2.5D: 3 int16 slices + centre label slice", "server": "moto.server on 127.0.0.1",
                  "raw_bytes_per_sample": nbytes_sample, "store_bytes": dir_bytes(Path(local)),
                  "prepare_seconds": {"s3": prep_s3, "local": prep_local}},
        "modes": res,
        "ratios": {"s3_bytes_vs_raw": res["s3"]["bytes_per_sample"] / nbytes_sample,
                   "s3_vs_local_samples_per_s": res["s3"]["samples_per_s"] / res["local"]["samples_per_s"],
                   "s3_cache_warm_vs_local_samples_per_s":
                       res["s3_cache_warm"]["samples_per_s"] / res["local"]["samples_per_s"]},
        "note": "counts carry over to real S3; the local server's speed does not (no network latency)",
    }
    atomic_write_json(args.out, result)
    _table(result, args.out)
    return result


def _table(result: dict, out) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table("mode", "requests to open", "bytes to open", "requests/sample", "bytes/sample",
              "samples/s (local server)", title=f"object store benchmark → {out}")
    for name, m in result["modes"].items():
        t.add_row(name, str(m["open_requests"]), f"{m['open_bytes']:,}", f"{m['requests_per_sample']:.2f}",
                  f"{m['bytes_per_sample']:,.0f}", f"{m['samples_per_s']:,.1f}")
    Console().print(t)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()

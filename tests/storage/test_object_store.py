"""Stores on object storage (``s3://``), against a real S3-compatible server on 127.0.0.1 (moto's
server from PyPI, started by the ``s3_server`` fixture; endpoint and credentials through the
standard AWS environment variables): prepare, read, lock, damage, train a few steps and evaluate —
the same arrays, index, split, plan and metrics as a local copy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import numpy as np
import pytest
import torch

from hpc_seg.cli import main
from hpc_seg.config.schema import DataConfig
from hpc_seg.storage import location as loc
from hpc_seg.storage import lock
from hpc_seg.storage import store as zstore
from hpc_seg.storage.chunks import ChunkReader
from hpc_seg.training.dataset import build_loader
from hpc_seg.ingest.index import read_index
from hpc_seg.preprocessing.plan import read_plan
from hpc_seg.ingest.prepare import prepare
from hpc_seg.ingest.split import read_split
from hpc_seg.errors import StoreError
from tests.runs import ROOT, records, run_train

SETS = ["train.max_steps=4", "train.val_every_steps=2", "checkpoint.every_steps=0", "deepspeed.zero_stage=1",
        "data.oversample=0.0"]


def _url(name: str) -> str:
    return f"s3://hpc-seg/{name}-{uuid.uuid4().hex[:6]}.zarr"


@pytest.fixture(scope="module")
def stores(s3_server, phantom_dir, tmp_path_factory):
    """The same phantom prepared into a local store and into the S3 server (2 conversion workers)."""
    local = tmp_path_factory.mktemp("s3cmp") / "phantom.zarr"
    url = _url("phantom")
    for out in (local, url):
        done = prepare("lits", phantom_dir, out, workers=2, val=0.2, test=0.2, seed=0, show_progress=False)
        assert done.report.ok and len(done.report.converted) == 6
    return str(local), url


def test_prepared_s3_store_equals_local_copy(stores):
    local, url = stores
    assert not loc.is_file(lock.lock_path(url))  # the preparation's lock was released
    assert read_index(url) == read_index(local)
    assert read_split(url, 0) == read_split(local, 0)
    assert read_plan(url, 0).to_dict() == read_plan(local, 0).to_dict()
    a, b = zstore.open_store(local), zstore.open_store(url)
    assert zstore.list_cases(a) == zstore.list_cases(b)
    for cid in zstore.list_cases(a):
        for arr in ("image", "label"):
            np.testing.assert_array_equal(a["cases"][cid][arr][...], b["cases"][cid][arr][...])


def test_chunk_reader_reads_ranges_and_counts_requests(stores, tmp_path):
    _, url = stores
    g = zstore.open_store(url)["cases"]["lits_0001"]
    reader = ChunkReader(g["image"])
    assert reader.fast and reader.files.remote
    np.testing.assert_array_equal(reader[:, 4:7], g["image"][:, 4:7])
    assert reader.files.requests == 1 + 1  # the shard's index once (a suffix range), then 3 adjacent slices in one range
    np.testing.assert_array_equal(reader[0, 9], g["image"][0, 9])
    assert reader.files.requests == 3  # the index is kept
    cached = ChunkReader(g["image"], cache=str(tmp_path / "cache"))
    np.testing.assert_array_equal(cached[:, 2:12], g["image"][:, 2:12])
    assert cached.files.requests == 2  # HEAD (its ETag) + the whole shard once
    again = ChunkReader(g["image"], cache=str(tmp_path / "cache"))  # another process, same node
    np.testing.assert_array_equal(again[0, 5], g["image"][0, 5])
    assert again.files.requests == 1 and again.files.bytes == 0  # only the HEAD: the shard is cached


def test_missing_or_damaged_shard_on_s3_names_case_and_slice(s3_server, phantom_dir):
    url = _url("damaged")
    prepare("lits", phantom_dir, url, val=0.2, test=0.2, seed=0, show_progress=False)
    fs = loc.filesystem(url)
    key = url.split("://")[1]
    shard = f"{key}/cases/lits_0002/image/c/0/0/0/0"
    raw = bytearray(fs.cat_file(shard))
    raw[40] ^= 0xFF  # inside the first chunk
    fs.pipe_file(shard, bytes(raw))
    image = ChunkReader(zstore.open_store(url)["cases"]["lits_0002"]["image"])
    with pytest.raises(StoreError, match=r"case lits_0002, image slice z=0: chunk truncated or failing its crc32c"):
        image[:, 0]
    fs.rm_file(f"{key}/cases/lits_0003/label/c/0/0/0")
    label = ChunkReader(zstore.open_store(url)["cases"]["lits_0003"]["label"])
    with pytest.raises(StoreError, match=r"case lits_0003, label slice z=5: shard file .* is missing"):
        label[5]


def test_second_preparation_on_s3_is_refused_by_conditional_write(s3_server, phantom_dir):
    url = _url("locked")
    token = lock.acquire(url, "first preparation")
    assert json.loads(loc.read_bytes(lock.lock_path(url)))["token"] == token
    assert not loc.create_exclusive(lock.lock_path(url), b"{}")  # If-None-Match: * → 412
    with pytest.raises(StoreError, match="another preparation holds this store's lock .first preparation"):
        prepare("lits", phantom_dir, url, show_progress=False)
    assert loc.state(url) == "absent"  # nothing written
    lock.release(url, token)
    assert prepare("lits", phantom_dir, url, val=0.2, test=0.2, seed=0, show_progress=False).report.ok


def test_object_fs_operations(s3_server):
    """The object-store side of the one filesystem interface (the local side: test_location.py)."""
    url = _url("fs")
    fs = loc.fs_for(url)
    assert isinstance(fs, loc.ObjectFS) and fs is loc.fs_for(url + "/")
    assert loc.state(url) == "absent" and loc.read_bytes(loc.join(url, "x")) is None and not loc.exists(url)
    path = loc.join(url, "meta", "index", "zarr.json")
    assert loc.write_json(path, {"a": 1}) == path and loc.read_json(path) == {"a": 1}
    assert loc.is_file(path) and loc.exists(loc.join(url, "meta")) and not loc.is_file(loc.join(url, "meta"))
    assert loc.subdirs(url) == ["meta"] and loc.subdirs(loc.join(url, "absent")) == []
    assert loc.state(url) == "other"
    shard = loc.join(url, "shard")
    loc.write_bytes(shard, bytes(range(100)))
    handle = fs.open(shard)
    assert fs.tail(handle, 4) == bytes([96, 97, 98, 99]) and fs.pread(handle, 3, 10) == bytes([10, 11, 12])
    assert fs.version(shard) == fs.version(shard)
    assert loc.create_exclusive(url + ".lock", b"first") and not loc.create_exclusive(url + ".lock", b"second")
    assert loc.read_bytes(url + ".lock") == b"first"
    loc.remove_file(url + ".lock")
    loc.remove_file(url + ".lock")
    loc.remove_tree(url)
    assert loc.state(url) == "absent" and not loc.exists(url + ".lock")


def test_a_forked_child_makes_its_own_filesystem(stores):
    _, url = stores
    parent = loc.filesystem(url)
    assert loc.filesystem(url) is parent  # one per process
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 when it reads through a filesystem of its own
        try:
            ok = loc.filesystem(url) is not parent and loc.is_file(loc.join(url, "zarr.json"))
        except BaseException:
            ok = False
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and loc.filesystem(url) is parent


def test_loader_workers_read_s3_like_local(stores):
    """Two DataLoader workers (forkserver for object stores: no inherited HTTP session) read the
    same batches from S3 as from the local copy."""
    local, url = stores
    batches = []
    for store in (local, url):
        cfg = DataConfig(store=store, kind="lits", size=[32, 32], batch_size=4, num_workers=2, oversample=0.5)
        cases = read_split(store, 0)["train"]
        loader, sampler = build_loader(cfg, cases, train=True, seed=1)
        assert (loader.multiprocessing_context is not None) == store.startswith("s3://")
        batches.append([b["image"] for _, b in zip(range(3), loader)])
    for x, y in zip(*batches):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_train_and_evaluate_from_s3_equal_local(stores, tmp_path):
    local, url = stores
    results = []
    for name, store in (("local", local), ("s3", url)):
        run = tmp_path / name
        r = run_train(run, store, SETS, nproc=1)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        assert [x["loss"] for x in records(run, "train")]
        out = tmp_path / f"eval-{name}"
        assert main(["evaluate", str(run), "--data", store, "--split", "test", "--out", str(out),
                     "--tag", "latest", "--cpu"]) == 0
        results.append((records(run, "train"), json.loads((out / "metrics.json").read_text())))
    (train_a, eval_a), (train_b, eval_b) = results
    assert [x["loss"] for x in train_a] == [x["loss"] for x in train_b]  # same samples, same steps
    assert eval_a["per_class"] == eval_b["per_class"] and eval_a["per_case"] == eval_b["per_case"]
    assert eval_b["store"] == url


def test_cli_inspect_and_bad_url(stores):
    _, url = stores
    r = subprocess.run([sys.executable, "-m", "hpc_seg.cli", "inspect", url], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "6 cases" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-m", "hpc_seg.cli", "inspect", "s3://hpc-seg/nothing-here.zarr"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "not a Zarr store" in r.stdout + r.stderr and "Traceback" not in r.stderr
    unreachable = {**os.environ, "AWS_ENDPOINT_URL": "http://127.0.0.1:1"}  # nothing listens there
    r = subprocess.run([sys.executable, "-m", "hpc_seg.cli", "inspect", url], cwd=ROOT, capture_output=True,
                       text=True, env=unreachable, timeout=120)
    assert r.returncode != 0 and "object store request failed" in r.stdout + r.stderr, r.stdout + r.stderr
    assert "AWS_ENDPOINT_URL" in r.stdout + r.stderr and "Traceback" not in r.stderr

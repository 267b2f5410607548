"""One filesystem interface for store paths: the local implementation, and which one a path gets.
The object-store implementation runs against a real S3 server in test_object_store.py."""

from __future__ import annotations

import os
import pickle

import pytest

from hpc_seg.errors import StoreError
from hpc_seg.storage import location as loc


def test_one_filesystem_per_path_kind():
    assert loc.fs_for("/data/a.zarr") is loc.LOCAL and loc.fs_for("file:///data/a.zarr") is loc.LOCAL
    s3 = loc.fs_for("s3://bucket/a.zarr")
    assert isinstance(s3, loc.ObjectFS) and s3.remote and s3 is loc.fs_for("s3://other/b.zarr")
    # it holds no fsspec instance, so no copy of it (fork, pickle) carries a session into another process
    assert vars(s3) == {"protocol": "s3"} and vars(pickle.loads(pickle.dumps(s3))) == {"protocol": "s3"}
    assert loc.normalize("file:///data/a.zarr/") == "/data/a.zarr"
    assert loc.normalize("s3://b/a.zarr/") == "s3://b/a.zarr"
    assert loc.join("s3://b/a.zarr/", "meta", "index/") == "s3://b/a.zarr/meta/index"
    assert loc.join("/data/a.zarr", "cases", "c1") == os.path.join("/data/a.zarr", "cases", "c1")


def test_local_operations(tmp_path):
    store = tmp_path / "s.zarr"
    assert loc.state(store) == "absent" and loc.read_bytes(store / "x") is None and not loc.exists(store)
    store.mkdir()
    assert loc.state(store) == "empty"
    path = loc.join(store, "meta", "index", "zarr.json")
    assert loc.write_json(path, {"a": 1}) == path and loc.read_json(path) == {"a": 1}
    assert [p.name for p in (store / "meta" / "index").iterdir()] == ["zarr.json"]  # temporary file renamed
    assert loc.is_file(path) and loc.exists(loc.join(store, "meta")) and not loc.is_file(loc.join(store, "meta"))
    assert loc.subdirs(store) == ["meta"] and loc.subdirs(store / "absent") == []
    assert loc.state(store) == "other"
    loc.write_bytes(loc.join(store, "zarr.json"), b"{")
    assert loc.state(store) == "store"
    with pytest.raises(StoreError, match="damaged JSON"):
        loc.read_json(loc.join(store, "zarr.json"))
    lock = f"file://{store}.lock"
    assert loc.create_exclusive(lock, b"first") and not loc.create_exclusive(lock, b"second")
    assert loc.read_bytes(lock) == b"first"
    loc.remove_file(lock)
    loc.remove_file(lock)  # absent: nothing to do
    assert not loc.exists(lock)
    loc.remove_tree(store)
    loc.remove_tree(store)
    assert loc.state(store) == "absent"


def test_local_byte_ranges(tmp_path):
    p = tmp_path / "shard"
    p.write_bytes(bytes(range(100)))
    fs = loc.fs_for(p)
    fd = fs.open(p)
    try:
        assert fs.tail(fd, 4) == bytes([96, 97, 98, 99]) and fs.tail(fd, 101) == b""
        assert fs.pread(fd, 3, 10) == bytes([10, 11, 12])
    finally:
        fs.close(fd)
    assert fs.version(p) == fs.version(p) and fs.zarr_store(f"file://{tmp_path}") == str(tmp_path)


def test_unknown_protocol_names_the_path():
    with pytest.raises(StoreError, match=r"nosuch://b/a.zarr: no filesystem for protocol 'nosuch'"):
        loc.is_file("nosuch://b/a.zarr")

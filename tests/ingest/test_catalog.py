"""A store opened once (``hpc_seg.ingest.catalog.Store``), and the dataset kind under ``kind`` with
stores that name it ``dataset`` still read."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import numpy as np
import pytest

from hpc_seg.errors import SplitError, StoreError
from hpc_seg.ingest.catalog import Store
from hpc_seg.ingest.index import read_index
from hpc_seg.ingest.split import has_split, read_split, write_split
from hpc_seg.preprocessing.plan import read_plan
from hpc_seg.storage import store as zstore
from tests.conftest import case_arrays


@pytest.fixture()
def counted(monkeypatch):
    """How often the store's root is opened and each metadata document read."""
    calls = {"open": 0}
    open_store, read_meta = zstore.open_store, zstore.read_meta

    def opening(*a, **k):
        calls["open"] += 1
        return open_store(*a, **k)

    def reading(path, key):
        calls[key] = calls.get(key, 0) + 1
        return read_meta(path, key)

    monkeypatch.setattr(zstore, "open_store", opening)
    monkeypatch.setattr(zstore, "read_meta", reading)
    return calls


def test_store_opens_once_and_reads_the_index_once(phantom_store, counted):
    s = Store.open(f"file://{phantom_store}/")
    assert s.path == str(phantom_store) and str(s) == s.path and not s.remote
    assert counted == {"open": 1}
    index = s.index
    assert s.index is index and read_index(s) is index and s.case_ids == sorted(index["cases"])
    assert s.info["kind"] == index["kind"] == "lits" and s.info["classes"] == index["classes"]
    assert s.has_split(0) and not s.has_split(999)
    split = s.split(0)
    assert sorted(split["train"] + split["val"] + split["test"]) == s.case_ids
    assert s.plan(0).to_dict() == read_plan(phantom_store, 0).to_dict()
    image, label = s.case("lits_0001")
    ref_image, ref_label = case_arrays(phantom_store, "lits_0001")
    assert np.array_equal(image[...], ref_image) and np.array_equal(label[...], ref_label)
    assert counted["open"] == 1 and counted["index"] == 1
    assert Store.of(s) is s and read_split(s, 0) == split and counted["open"] == 1 and counted["index"] == 1
    assert read_plan(s, 0).to_dict() == s.plan(0).to_dict() and has_split(s, 0)  # path functions take a Store
    with pytest.raises(SplitError, match="no split for seed 999"):
        s.split(999)


def test_a_path_function_opens_a_store_for_one_question(phantom_store, counted):
    assert read_split(phantom_store, 0) == Store.open(phantom_store).split(0)
    assert counted["open"] == 2 and counted["index"] == 2


def test_store_pickles_its_path_only_and_reopens(phantom_store):
    s = Store.open(phantom_store)
    assert s.index and s.case("lits_0000")  # caches filled
    copy = pickle.loads(pickle.dumps(s))
    assert vars(copy)["_root"] is None and vars(copy)["_index"] is None and copy.path == s.path
    assert np.array_equal(copy.case("lits_0002")[1][...], s.case("lits_0002")[1][...])


def test_a_forked_child_drops_the_parents_root_and_zarr_store(phantom_store):
    s = Store.open(phantom_store)
    s.case("lits_0000")
    parent_root, parent_zarr = s._root, s._zarr
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 when it opened its own
        try:
            label = s.case("lits_0001")[1][...]
            ok = s._zarr is not parent_zarr and s._root is None and label.shape[0] == 16
            ok = ok and s.root is not parent_root
        except BaseException:
            ok = False
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert s._root is parent_root and s._zarr is parent_zarr  # the parent keeps its own


def test_missing_or_foreign_store_fails_at_open(tmp_path):
    with pytest.raises(StoreError, match="not a Zarr store"):
        Store.open(tmp_path / "nothing.zarr")


def _rename_kind_to_dataset(store) -> None:
    """Make ``store`` look as stores written before the rename: ``dataset`` in root attrs and index."""
    root_json = store / "zarr.json"
    doc = json.loads(root_json.read_text())
    attrs = doc["attributes"]["hpc_seg"]
    attrs["dataset"] = attrs.pop("kind")
    root_json.write_text(json.dumps(doc))
    index_json = store / "meta" / "index" / "zarr.json"
    doc = json.loads(index_json.read_text())
    meta = doc["attributes"][zstore.META_KEY]
    meta["dataset"] = meta.pop("kind")
    index_json.write_text(json.dumps(doc))


def test_new_stores_write_kind(phantom_store):
    root = json.loads((phantom_store / "zarr.json").read_text())["attributes"]["hpc_seg"]
    index = json.loads((phantom_store / "meta" / "index" / "zarr.json").read_text())["attributes"][zstore.META_KEY]
    assert root["kind"] == index["kind"] == "lits"
    assert root["dataset"] == index["dataset"] == "lits"  # for hpc-seg 0.2 sharing the store, one version


def test_stores_naming_the_kind_dataset_still_read(phantom_store, phantom_dir, tmp_path):
    from hpc_seg.ingest.convert import convert

    old = tmp_path / "old.zarr"
    shutil.copytree(phantom_store, old)
    _rename_kind_to_dataset(old)
    s = Store.open(old)
    assert s.info["kind"] == s.index["kind"] == "lits"
    assert zstore.store_info(old)["kind"] == "lits" and read_index(old)["kind"] == "lits"
    assert write_split(s, 0.2, 0.2, 7) == read_split(old, 7)  # its plan takes the kind from the root attrs
    assert read_plan(old, 7).kind == "lits"
    report = convert("lits", phantom_dir, old, show_progress=False)  # joins: same kind, cases complete
    assert report.ok and len(report.skipped) == 6 and read_index(old)["kind"] == "lits"
    index = json.loads((old / "meta" / "index" / "zarr.json").read_text())["attributes"][zstore.META_KEY]
    assert index["kind"] == index["dataset"] == "lits"  # the rebuilt index records both names


def test_joining_another_kind_is_refused_naming_kinds(phantom_store):
    with pytest.raises(StoreError, match="store holds kind 'lits', refusing to add kind 'kvasir'"):
        zstore.create_or_open_store(phantom_store, "kvasir")

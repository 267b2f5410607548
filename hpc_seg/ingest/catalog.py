"""A prepared store opened once: its root, kind facts, index, splits, plans and cases.

``Store.open(path)`` normalises the path and opens the zarr root (a missing or foreign store fails
there, with its reason); the root attributes and the index are read at first use and kept, so a
reader asking several questions pays for one open and one index read. Splits and plans are read
when asked for (each one small document); a Store is a view for reading, and a split written
through it (``hpc_seg.ingest.split.write_split``) is seen by its next ``split()``.

``str(store)`` is its path, so every function that takes a store path takes a Store too; the path
functions ``read_index``/``read_split`` use the Store's cached index when given one.

Processes: a Store pickled for another process (a spawned DataLoader worker) carries its path only
and opens again there; one inherited across fork drops the parent's root and zarr store on its first
use in the child. No process reads through another's object-store session
(``hpc_seg.storage.location``).

The split rules (``SPLITS``, ``split_key``, ``check_split``) live here because reading a split
checks it against the store's index; ``hpc_seg.ingest.split`` makes and writes splits with them.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import zarr

from hpc_seg.errors import SplitError, StoreError
from hpc_seg.storage import location as loc
from hpc_seg.storage import store as zstore

if TYPE_CHECKING:
    from hpc_seg.preprocessing.plan import PreprocessingPlan

SPLITS = ("train", "val", "test")


def split_key(seed: int) -> str:
    return f"splits/seed{seed}"


def check_split(split: dict, known_cases: set[str] | None = None, source: str = "<split>") -> None:
    """Raise SplitError if a case is in two splits, a split key is unknown or a case is unknown."""
    unknown_keys = set(split) - set(SPLITS) - {"meta"}
    if unknown_keys:
        raise SplitError(f"{source}: unknown split name(s) {sorted(unknown_keys)}")
    seen: dict[str, str] = {}
    for name in SPLITS:
        for cid in split.get(name, []):
            if cid in seen:
                raise SplitError(f"{source}: case '{cid}' is in both '{seen[cid]}' and '{name}' "
                                 "(data leakage between splits)")
            seen[cid] = name
    if known_cases is not None:
        missing = sorted(set(seen) - known_cases)
        if missing:
            raise SplitError(f"{source}: case(s) {missing[:5]} are not in the store")


class Store:
    """An hpc-seg store for reading. ``Store.open(path)`` opens it; ``Store.of(x)`` takes a path or
    a Store (returned as it is)."""

    def __init__(self, path):
        self.path = loc.normalize(path)
        self._pid: int | None = None
        self._root: zarr.Group | None = None
        self._zarr = None  # this process's zarr store object, shared by the case arrays
        self._info: dict | None = None
        self._index: dict | None = None

    @classmethod
    def open(cls, path) -> "Store":
        store = cls(path)
        store.root  # opened now: a missing or foreign store fails here, naming why
        return store

    @classmethod
    def of(cls, store) -> "Store":
        return store if isinstance(store, Store) else cls.open(store)

    def __str__(self) -> str:
        return self.path

    def __repr__(self) -> str:
        return f"Store({self.path!r})"

    def __getstate__(self) -> dict:  # another process opens its own root and object-store session
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    def _this_process(self) -> None:
        if self._pid != os.getpid():
            self._pid, self._root, self._zarr = os.getpid(), None, None

    @property
    def remote(self) -> bool:
        return loc.is_remote(self.path)

    @property
    def root(self) -> zarr.Group:
        self._this_process()
        if self._root is None:
            self._root = zstore.open_store(self.path)
        return self._root

    @property
    def info(self) -> dict:
        """The root attributes: kind, classes, channels, modality, defaults (``storage.store.root_info``)."""
        if self._info is None:
            self._info = zstore.root_info(self.root)
        return self._info

    @property
    def index(self) -> dict:
        """Per-case statistics of every complete case (``hpc_seg.ingest.index``), kind under ``kind``."""
        if self._index is None:
            self.root  # a foreign or older-layout store is refused with its reason
            index = zstore.read_meta(self.path, "index")
            if index is None:
                raise StoreError(f"{self.path}: store has no case index (conversion did not finish); rerun "
                                 "'hpc-seg prepare' (or 'hpc-seg convert')")
            self._index = zstore.with_kind(index)
        return self._index

    @property
    def case_ids(self) -> list[str]:
        """Every indexed case, sorted."""
        return sorted(self.index["cases"])

    def has_split(self, seed: int) -> bool:
        """Whether the split of ``seed`` exists (without reading it or the index)."""
        return zstore.has_meta(self.path, split_key(seed))

    def split(self, seed: int) -> dict[str, list[str]]:
        """The split of ``seed`` (checked against the index)."""
        split = zstore.read_meta(self.path, split_key(seed))
        if split is None:
            raise SplitError(f"{self.path}: no split for seed {seed}; run 'hpc-seg split {self.path} --seed {seed}' "
                             "(or 'hpc-seg prepare')")
        check_split(split, set(self.index["cases"]), source=f"{self.path} (meta/{split_key(seed)})")
        return {k: list(split.get(k, [])) for k in SPLITS}

    def plan(self, seed: int) -> "PreprocessingPlan":
        """The preprocessing plan of the split of ``seed`` (unresolved: ``.resolve(cfg.data)``)."""
        from hpc_seg.preprocessing.plan import read_plan  # here: conversion workers import this module, not torch

        return read_plan(self.path, seed)

    def case(self, case_id: str) -> tuple[zarr.Array, zarr.Array]:
        """A case's (image, label) arrays, opened through this process's zarr store."""
        self._this_process()
        if self._zarr is None:
            self._zarr = self._root.store if self._root is not None else loc.zarr_store(self.path)
        return zstore.open_case_arrays(self.path, case_id, self._zarr)

"""The hpc-seg Zarr v3 store layout.

::

    STORE.zarr/                      root group; attrs["hpc_seg"] = {format, kind, classes, channels,
                                     modality, defaults (window, normalize, rgb mean/std), modes}
      meta/index/                    group; attrs: per-case statistics (``convert``, ingest/index.py)
      meta/splits/seed0/             group; attrs: train/val/test case lists (``split``/``prepare``)
      meta/plans/seed0/              group; attrs: the preprocessing plan of that split (preprocessing/plan.py)
      cases/<case_id>/               one group per case; attrs: OME-Zarr 0.5 "ome" multiscales
        image   (C, Z, Y, X)         int16 HU (CT, C=1) or uint8 RGB (C=3, Z=1)
        label   (Z, Y, X)            uint8 class ids

Layout ``hpc-seg/zarr-v3`` (sharded): each array of a case is **one shard file** (Zarr v3
``sharding_indexed``) written in one call, so a case is 5 files (group + two array metadata + two
shards) — parallel filesystems pay per file, not per byte. Inside, every chunk is written (also the
empty ones) and carries a crc32c, so a missing or damaged chunk is detected at read time
(``hpc_seg.storage.chunks``), never read as zeros. ``hpc-seg/zarr-v2`` stores (one file per chunk) are
still read.

Chunks (inner chunks of the shard) are one axial slice, ``(1, 1, Y, X)`` / ``(1, Y, X)``: training reads random 2D slices and
2.5D stacks of k adjacent slices, so a sample touches exactly k image chunks and one label chunk,
and never decompresses data it does not use. 3D patches read a z-range of whole slices. Images are
Blosc-LZ4 with byte shuffle (decodes at memory speed; ~0.27x the bytes of raw int16 on noisy CT,
see bench/data_loading.py), labels Blosc-zstd (long runs of zeros compress to almost nothing).

A case is *complete* only when ``attrs["hpc_seg"]["complete"]`` is true; that attribute is written
last, so a case half-written by a crash is detected and rewritten, never trusted.

Store metadata (index, splits, plans) lives in attributes of groups under ``meta/``, so plain
zarr-python lists the store without warnings; each is one ``zarr.json`` written atomically
(temporary file + rename) and read without touching the others.

The dataset kind is ``kind`` in the root attributes and the index; stores written by earlier
versions name it ``dataset``, and :func:`with_kind` (the one reader of that key) takes either.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from hpc_seg.storage import location as loc
from hpc_seg.errors import StoreError

FORMAT = "hpc-seg/zarr-v3"  # sharded: one shard file per array per case, every chunk written, crc32c
UNSHARDED = "hpc-seg/zarr-v2"  # one file per chunk; still read
READABLE = (FORMAT, UNSHARDED)
META_KEY = "hpc_seg_meta"
IMAGE_CODEC = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
LABEL_CODEC = BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")
WRITE_ALL_CHUNKS = {"write_empty_chunks": True}  # an absent chunk is damage, never "all zeros"


def _is_zarr_dir(path) -> bool:
    return loc.is_file(loc.join(path, "zarr.json"))


def with_kind(meta: dict) -> dict:
    """Root attributes or an index with the kind under ``kind``, whichever name the store used."""
    meta = dict(meta)
    if "kind" not in meta and "dataset" in meta:
        meta["kind"] = meta["dataset"]
    return meta


def kind_record(kind: str) -> dict:
    """The kind as stores record it: ``kind``, and ``dataset`` too, so that hpc-seg 0.2 installs
    sharing a store keep reading it (drop ``dataset`` in 0.4)."""
    return {"kind": kind, "dataset": kind}


def open_store(path, mode: str = "r") -> zarr.Group:
    """Open an existing hpc-seg store (read-only by default; a local path or an ``s3://`` URL:
    ``hpc_seg.storage.location``); StoreError if absent or foreign."""
    path = loc.normalize(path)
    if not _is_zarr_dir(path):
        raise StoreError(f"{path}: not a Zarr store (no zarr.json); run 'hpc-seg prepare KIND SRC {path}' first")
    try:
        root = zarr.open_group(loc.zarr_store(path, read_only=mode == "r"), mode=mode, zarr_format=3)
    except Exception as exc:
        raise StoreError(f"{path}: cannot open Zarr store: {exc}") from None
    meta = root.attrs.get("hpc_seg")
    if not isinstance(meta, dict) or not str(meta.get("format", "")).startswith("hpc-seg/"):
        raise StoreError(f"{path}: Zarr store was not written by hpc-seg (format {FORMAT} expected)")
    if meta["format"] not in READABLE:
        kind = with_kind(meta).get("kind", "KIND")
        raise StoreError(f"{path}: store layout {meta['format']}, this hpc-seg reads {' and '.join(READABLE)}; "
                         f"convert the source again into a new store: hpc-seg prepare {kind} SRC NEW.zarr")
    return root


def root_info(root: zarr.Group) -> dict:
    """The root attributes of an open store (kind, classes, channels, modality, defaults)."""
    return with_kind(root.attrs["hpc_seg"])


def store_info(path) -> dict:
    """The root attributes of the store at ``path`` (:func:`root_info`)."""
    return root_info(open_store(path))


def _group_json(attrs: dict) -> dict:
    return {"zarr_format": 3, "node_type": "group", "attributes": attrs}


def write_meta(store_path, key: str, payload: dict) -> str:
    """Write ``payload`` as the attributes of group ``meta/<key>`` (atomic; parents created)."""
    parts = ["meta", *key.split("/")]
    for i in range(1, len(parts)):
        parent = loc.join(store_path, *parts[:i], "zarr.json")
        if not loc.is_file(parent):
            loc.write_json(parent, _group_json({}))
    return loc.write_json(loc.join(store_path, *parts, "zarr.json"), _group_json({META_KEY: payload}), indent=None)


def read_meta(store_path, key: str) -> dict | None:
    """The payload of ``meta/<key>``, or None when absent."""
    path = loc.join(store_path, "meta", *key.split("/"), "zarr.json")
    try:
        doc = loc.read_json(path)
        return None if doc is None else doc["attributes"][META_KEY]
    except (StoreError, KeyError, TypeError) as exc:
        raise StoreError(f"{path}: damaged store metadata ({exc}); rerun 'hpc-seg prepare'") from None


def has_meta(store_path, key: str) -> bool:
    """Whether ``meta/<key>`` exists (without reading it: the index can be megabytes)."""
    return loc.is_file(loc.join(store_path, "meta", *key.split("/"), "zarr.json"))


def create_or_open_store(path, kind: str, info: dict | None = None,
                         layout: str = FORMAT) -> zarr.Group:
    """Open our store for appending, or create it with root attributes ``info`` (kind facts);
    refuse to touch anything else at ``path`` (an empty directory or prefix is fine to fill)."""
    path = loc.normalize(path)
    what = loc.state(path)
    if what == "store":
        root = open_store(path, mode="r+")
        _check_joining(path, root, kind, info)
        return root
    if what == "other":
        raise StoreError(f"{path}: exists and is not an hpc-seg Zarr store; refusing to overwrite it")
    root = zarr.open_group(loc.zarr_store(path, read_only=False), mode="w", zarr_format=3)
    root.require_group("cases")
    if layout not in READABLE:
        raise StoreError(f"{path}: unknown store layout {layout} (one of {', '.join(READABLE)})")
    root.attrs["hpc_seg"] = {"format": layout, **kind_record(kind), **(info or {})}
    return root


def _check_joining(path: str, root: zarr.Group, kind: str, info: dict | None) -> None:
    """A source may join a store of its own kind with the same classes, or of another kind of the
    same task whose classes are a subset of the store's (its cases then annotate only those:
    ``hpc_seg.preprocessing.labels``). Anything else is refused, naming both."""
    have = root_info(root)
    if not info:
        if have.get("kind") != kind:
            raise StoreError(f"{path}: store holds kind '{have.get('kind')}', refusing to add kind '{kind}'")
        return
    mine, theirs = list(have.get("classes", [])), list(info.get("classes", []))
    if have.get("kind") == kind:
        if mine != theirs:
            raise StoreError(f"{path}: store has classes {mine}, the source has {theirs}; convert into a new store")
        return
    same_data = (have.get("modality"), have.get("channels")) == (info.get("modality"), info.get("channels"))
    if not same_data or not theirs or theirs[0] != mine[0] or not set(theirs) <= set(mine):
        raise StoreError(f"{path}: store holds kind '{have.get('kind')}' ({have.get('modality')}, classes {mine}); "
                         f"a kind '{kind}' source ({info.get('modality')}, classes {theirs}) may join it only with "
                         "the same modality and classes that are a subset of the store's; convert into a new store")
    kinds = list(have.get("kinds") or [have["kind"]])
    if kind not in kinds:
        root.attrs["hpc_seg"] = {**have, "kinds": kinds + [kind]}


def case_complete(store_path, case_id: str) -> bool:
    """True when the case group exists and carries the completion marker."""
    try:
        attrs = (loc.read_json(loc.join(store_path, "cases", case_id, "zarr.json")) or {}).get("attributes", {})
    except StoreError:
        return False
    return bool(attrs.get("hpc_seg", {}).get("complete"))


def ome_attrs(spacing: tuple[float, ...], channels: int, unit: str | None) -> dict:
    """OME-Zarr 0.5 style multiscales metadata for a (C, Z, Y, X) image."""
    axes = [{"name": "c", "type": "channel"}] + [
        {"name": n, "type": "space", **({"unit": unit} if unit else {})} for n in ("z", "y", "x")]
    return {"version": "0.5", "multiscales": [{
        "name": "image", "axes": axes,
        "datasets": [{"path": "image", "coordinateTransformations": [
            {"type": "scale", "scale": [1.0, *[float(s) for s in spacing]]}]}],
    }]}


def write_case(store_path, case_id: str, image: np.ndarray, label: np.ndarray,
               meta: dict[str, Any], spacing: tuple[float, float, float], unit: str | None) -> None:
    """Write one case; any previous (incomplete) group of that name is removed first."""
    if image.ndim != 4 or label.ndim != 3 or image.shape[1:] != label.shape:
        raise ValueError(f"{case_id}: image {image.shape} / label {label.shape} do not match")
    loc.remove_tree(loc.join(store_path, "cases", case_id))  # a previous, incomplete try
    root = zarr.open_group(loc.zarr_store(store_path, read_only=False), mode="r+")
    sharded = root.attrs["hpc_seg"].get("format") == FORMAT  # the store's layout decides
    g = root.require_group("cases").create_group(case_id)
    c, z, y, x = image.shape
    extra = ({"config": WRITE_ALL_CHUNKS} if sharded else {})
    img = g.create_array("image", shape=image.shape, chunks=(1, 1, y, x), shards=image.shape if sharded else None,
                         dtype=image.dtype, fill_value=0, dimension_names=("c", "z", "y", "x"),
                         compressors=[IMAGE_CODEC, Crc32cCodec()] if sharded else IMAGE_CODEC, **extra)
    img[...] = image  # sharded: the whole shard in one call, one file written once
    lab = g.create_array("label", shape=label.shape, chunks=(1, y, x), shards=label.shape if sharded else None,
                         dtype=np.uint8, fill_value=0, dimension_names=("z", "y", "x"),
                         compressors=[LABEL_CODEC, Crc32cCodec()] if sharded else LABEL_CODEC, **extra)
    lab[...] = label
    g.attrs.update({"ome": ome_attrs(spacing, c, unit), "hpc_seg": {**meta, "complete": False}})
    g.attrs["hpc_seg"] = {**meta, "complete": True}  # completion marker: written last


def open_case_arrays(store_path, case_id: str, opened=None) -> tuple[zarr.Array, zarr.Array]:
    """A case's image and label arrays opened directly (two metadata reads, not the group chain:
    on an object store every node opened is a request). ``opened``: the store's zarr store made in
    this process (``location.zarr_store``), reused instead of a new one."""
    opened = loc.zarr_store(store_path) if opened is None else opened
    try:
        return tuple(zarr.open_array(opened, path=f"cases/{case_id}/{name}", mode="r", zarr_format=3)
                     for name in ("image", "label"))
    except FileNotFoundError:
        raise StoreError(f"{loc.normalize(store_path)}: case {case_id} has no image/label arrays; the store is "
                         "damaged: convert this case again") from None


def list_cases(root: zarr.Group, complete_only: bool = True) -> list[str]:
    cases = root.get("cases")
    if cases is None:
        return []
    names = sorted(name for name, _ in cases.groups())
    if complete_only:
        names = [n for n in names if cases[n].attrs.get("hpc_seg", {}).get("complete")]
    return names

"""The hpc-seg Zarr v3 store layout.

::

    STORE.zarr/                      root group; attrs["hpc_seg"] = {format, dataset, classes, channels}
      index.json                     per-case statistics (written by ``convert``, see data/index.py)
      split-seed0.json               train/val/test case lists (written by ``split``)
      cases/<case_id>/               one group per case; attrs: OME-Zarr 0.5 "ome" multiscales
        image   (C, Z, Y, X)         int16 HU (CT, C=1) or uint8 RGB (C=3, Z=1)
        label   (Z, Y, X)            uint8 class ids

Chunks are one axial slice, ``(1, 1, Y, X)`` / ``(1, Y, X)``: training reads random 2D slices and
2.5D stacks of k adjacent slices, so a sample touches exactly k image chunks and one label chunk,
and never decompresses data it does not use. 3D patches read a z-range of whole slices. Images are
Blosc-zstd with bit-shuffle (good on noisy int16 HU), labels Blosc-zstd (long runs of zeros).

A case is *complete* only when ``attrs["hpc_seg"]["complete"]`` is true; that attribute is written
last, so a case half-written by a crash is detected and rewritten, never trusted.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from hpc_seg.errors import StoreError

FORMAT = "hpc-seg/zarr-v1"
CLASSES = {
    "lits": ["background", "liver", "tumour"],
    "msd": ["background", "liver", "tumour"],
    "phantom": ["background", "liver", "tumour"],
    "kvasir": ["background", "polyp"],
}
IMAGE_CODEC = BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")
LABEL_CODEC = BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")


def _is_zarr_dir(path: Path) -> bool:
    return (path / "zarr.json").is_file()


def open_store(path: str | Path, mode: str = "r") -> zarr.Group:
    """Open an existing hpc-seg store (read-only by default); StoreError if absent or foreign."""
    path = Path(path)
    if not _is_zarr_dir(path):
        raise StoreError(f"{path}: not a Zarr store (no zarr.json); run 'hpc-seg convert' first")
    try:
        root = zarr.open_group(str(path), mode=mode)
    except Exception as exc:
        raise StoreError(f"{path}: cannot open Zarr store: {exc}") from None
    meta = root.attrs.get("hpc_seg")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise StoreError(f"{path}: Zarr store was not written by hpc-seg (format {FORMAT} expected)")
    return root


def create_or_open_store(path: str | Path, dataset: str) -> zarr.Group:
    """Open our store for appending, or create it; refuse to touch anything else at ``path``."""
    path = Path(path)
    if path.exists():
        if path.is_dir() and not any(path.iterdir()):
            pass  # an empty directory is fine to fill
        elif _is_zarr_dir(path):
            root = open_store(path, mode="r+")
            have = root.attrs["hpc_seg"].get("dataset")
            if have != dataset:
                raise StoreError(f"{path}: store holds dataset '{have}', refusing to add '{dataset}'")
            return root
        else:
            raise StoreError(f"{path}: exists and is not an hpc-seg Zarr store; refusing to overwrite it")
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    root.require_group("cases")
    root.attrs["hpc_seg"] = {"format": FORMAT, "dataset": dataset, "classes": CLASSES[dataset],
                             "channels": 3 if dataset == "kvasir" else 1}
    return root


def case_complete(store_path: str | Path, case_id: str) -> bool:
    """True when the case group exists and carries the completion marker."""
    meta_file = Path(store_path) / "cases" / case_id / "zarr.json"
    try:
        attrs = json.loads(meta_file.read_text()).get("attributes", {})
    except (OSError, ValueError):
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


def write_case(store_path: str | Path, case_id: str, image: np.ndarray, label: np.ndarray,
               meta: dict[str, Any], spacing: tuple[float, float, float], unit: str | None) -> None:
    """Write one case; any previous (incomplete) group of that name is removed first."""
    if image.ndim != 4 or label.ndim != 3 or image.shape[1:] != label.shape:
        raise ValueError(f"{case_id}: image {image.shape} / label {label.shape} do not match")
    group_dir = Path(store_path) / "cases" / case_id
    if group_dir.exists():
        shutil.rmtree(group_dir)
    root = zarr.open_group(str(store_path), mode="r+")
    g = root.require_group("cases").create_group(case_id)
    c, z, y, x = image.shape
    img = g.create_array("image", shape=image.shape, chunks=(1, 1, y, x), dtype=image.dtype,
                         compressors=IMAGE_CODEC, fill_value=0,
                         dimension_names=("c", "z", "y", "x"))
    img[...] = image
    lab = g.create_array("label", shape=label.shape, chunks=(1, y, x), dtype=np.uint8,
                         compressors=LABEL_CODEC, fill_value=0, dimension_names=("z", "y", "x"))
    lab[...] = label
    g.attrs.update({"ome": ome_attrs(spacing, c, unit), "hpc_seg": {**meta, "complete": False}})
    g.attrs["hpc_seg"] = {**meta, "complete": True}  # completion marker: written last


def list_cases(root: zarr.Group, complete_only: bool = True) -> list[str]:
    cases = root.get("cases")
    if cases is None:
        return []
    names = sorted(name for name, _ in cases.groups())
    if complete_only:
        names = [n for n in names if cases[n].attrs.get("hpc_seg", {}).get("complete")]
    return names

"""CHAOS CT (40 contrast CTs of healthy liver donors; liver masks, no tumours), in the challenge's
layout: a patient folder with ``DICOM_anon/`` (the series) and ``Ground/`` (one PNG mask per slice),
as in ``Train_Sets/CT/<n>/``; ``SRC`` may be one patient folder or any folder above several.

Mask k belongs to DICOM file k, both in file-name order (``InstanceNumber`` order, the same here):
masks are paired with files that way, whatever the slices' order in space, and then follow their
slice into position order. Labels: 0 background, 1 liver (a two-class store: CHAOS marks no tumour).

Kavur et al., "CHAOS Challenge — combined (CT-MR) healthy abdominal organ segmentation", Medical
Image Analysis 2021.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from hpc_seg.ingest.dicom_io import binary_mask, load_dicom_ct
from hpc_seg.ingest.kinds.base import CaseSource, DatasetKind, Discovered, register
from hpc_seg.ingest.nifti_io import to_canonical
from hpc_seg.errors import InputDataError

CLASSES = ("background", "liver")


def _is_patient(p: Path) -> bool:
    return (p / "DICOM_anon").is_dir() and (p / "Ground").is_dir()


def discover(src: Path) -> Discovered:
    if not src.is_dir():
        raise InputDataError(src, "input directory not found (expected CHAOS layout: DICOM_anon/ + Ground/)")
    patients = [src] if _is_patient(src) else sorted(p for p in src.rglob("*") if p.is_dir() and _is_patient(p))
    if not patients:
        raise InputDataError(src, "no patient folder with DICOM_anon/ and Ground/ found (CHAOS CT layout)")
    return Discovered([CaseSource("chaos_" + re.sub(r"[^A-Za-z0-9_.-]", "_", p.name), p / "DICOM_anon", p / "Ground")
                       for p in patients], list(CLASSES))


def _masks(ground: Path, slices, shape_rc: tuple[int, int]) -> np.ndarray:
    """(rows, cols, k) mask stack in position order, paired by file order."""
    from PIL import Image

    files = sorted(p for p in ground.iterdir() if p.suffix.lower() == ".png")
    if len(files) != len(slices):
        raise InputDataError(ground, f"{len(files)} mask slices for {len(slices)} image slices")
    by_file = sorted(slices, key=lambda s: (int(getattr(s.ds, "InstanceNumber", 0) or 0), s.path.name))
    rank = {id(s): k for k, s in enumerate(by_file)}
    planes = []
    for s in slices:  # position order
        f = files[rank[id(s)]]
        with Image.open(f) as im:
            m = np.asarray(im.convert("L"))
        if m.shape != shape_rc:
            raise InputDataError(f, f"mask size {m.shape} differs from the image slice {shape_rc}")
        planes.append(binary_mask(m, f))
    return np.stack(planes, axis=-1)


def load(src: CaseSource, classes: list[str]):
    ct, series = load_dicom_ct(src.image)
    ref_img, slices = series.image, series.slices
    rows, cols = int(slices[0].ds.Rows), int(slices[0].ds.Columns)
    stack = _masks(src.label, slices, (rows, cols)).transpose(1, 0, 2)  # as the image: (col, row, slice)
    import nibabel as nib

    label = to_canonical(nib.Nifti1Image(stack.astype(np.uint8), ref_img.affine), src.label).data
    meta = {"source": {"image": str(src.image), "label": str(src.label)},
            "affine_original": ct.affine_original.tolist(), "affine_canonical": ct.affine_canonical.tolist(),
            "orientation": "RAS", "source_shape_xyz": list(ct.data.shape[::-1]), "spacing_unit": "millimeter",
            "notes": "; ".join(f"left out {x}" for x in series.left_out)}
    return ct.data[None], label, ct.spacing, meta


CHAOS = register(DatasetKind("chaos", "CT", CLASSES, discover, load, window=(-100.0, 400.0)))

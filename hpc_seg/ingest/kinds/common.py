"""Readers shared by the kinds: a CT NIfTI pair and an RGB image/mask pair → store arrays."""

from __future__ import annotations

from pathlib import Path

from hpc_seg.ingest.kinds.base import CaseSource
from hpc_seg.ingest.nifti_io import load_ct_pair, load_rgb_pair
from hpc_seg.errors import InputDataError

NIFTI_RE = r"\.nii(\.gz)?$"


def require_dir(src: Path, expected: str) -> None:
    if not src.is_dir():
        raise InputDataError(src, f"input directory not found (expected {expected})")


def _require_pair(src: CaseSource) -> None:
    if src.image is None:
        raise InputDataError(src.label, "label has no matching image/volume file")
    if src.label is None:
        raise InputDataError(src.image, "volume has no matching segmentation/mask file")


def load_ct(src: CaseSource, classes: list[str]):
    """NIfTI volume + segmentation → (1, Z, Y, X) int16 HU in RAS, (Z, Y, X) uint8, spacing, meta."""
    _require_pair(src)
    ct, seg = load_ct_pair(src.image, src.label, len(classes))
    meta = {
        "source": {"image": str(src.image), "label": str(src.label)},
        "affine_original": ct.affine_original.tolist(),
        "affine_canonical": ct.affine_canonical.tolist(),
        "orientation": "RAS",
        "source_shape_xyz": list(ct.data.shape[::-1]),
        "spacing_unit": "millimeter",
    }
    return ct.data[None], seg.data, ct.spacing, meta


def load_rgb(src: CaseSource, classes: list[str]):
    """JPEG/PNG image + mask → (3, 1, H, W) uint8, (1, H, W) {0, 1}, unit spacing, meta."""
    _require_pair(src)
    rgb, mask = load_rgb_pair(src.image, src.label)
    image = rgb.transpose(2, 0, 1)[:, None]
    meta = {"source": {"image": str(src.image), "label": str(src.label)}, "spacing_unit": None,
            "source_size_hw": list(rgb.shape[:2])}
    return image, mask[None], (1.0, 1.0, 1.0), meta

"""Reading and validating NIfTI / JPEG sources, and reorienting CT to one canonical orientation.

Canonical orientation is RAS+ (``nibabel.as_closest_canonical``); arrays are then stored as
(Z, Y, X) = (inferior→superior, posterior→anterior, left→right) so that an axial slice is
``array[z]`` and is contiguous in the Zarr chunk layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from hpc_seg.errors import InputDataError

AFFINE_ATOL = 1e-3  # mm; volume/segmentation affines must agree to this


@dataclass
class CanonicalVolume:
    data: np.ndarray  # (Z, Y, X) in RAS+ after reorientation
    spacing: tuple[float, float, float]  # (sz, sy, sx) mm
    affine_original: np.ndarray  # 4x4 affine of the file as read
    affine_canonical: np.ndarray  # 4x4 affine of the RAS+ (X, Y, Z) array


def load_nifti(path: str | Path) -> nib.Nifti1Image:
    """Open a NIfTI file and read its data once, turning any failure into InputDataError."""
    path = Path(path)
    if not path.is_file():
        raise InputDataError(path, "file not found")
    try:
        proxy = nib.load(str(path))
        data = np.asanyarray(proxy.dataobj)  # read everything now: truncation shows up here
        img = nib.Nifti1Image(data, proxy.affine, proxy.header)
    except Exception as exc:  # nibabel raises many types for corrupt/truncated files
        raise InputDataError(path, f"cannot read NIfTI (corrupt or truncated?): {exc}") from None
    if len(img.shape) == 4 and img.shape[3] == 1:
        img = img.slicer[..., 0]
    if len(img.shape) != 3:
        raise InputDataError(path, f"expected a 3D volume, got shape {img.shape}")
    if min(img.shape) < 1:
        raise InputDataError(path, f"empty volume (shape {img.shape})")
    return img


def to_canonical(img: nib.Nifti1Image, path: str | Path) -> CanonicalVolume:
    """Reorient to RAS+ and return a (Z, Y, X) array plus spacing and both affines."""
    try:
        canon = nib.as_closest_canonical(img)
    except Exception as exc:
        raise InputDataError(path, f"cannot determine orientation from the affine: {exc}") from None
    data = np.asanyarray(canon.dataobj)
    zooms = canon.header.get_zooms()[:3]
    if not all(np.isfinite(zooms)) or min(zooms) <= 0:
        raise InputDataError(path, f"invalid voxel spacing {tuple(float(z) for z in zooms)}")
    sx, sy, sz = (float(z) for z in zooms)
    return CanonicalVolume(
        data=np.ascontiguousarray(data.transpose(2, 1, 0)),
        spacing=(sz, sy, sx),
        affine_original=np.asarray(img.affine, dtype=np.float64),
        affine_canonical=np.asarray(canon.affine, dtype=np.float64),
    )


def ct_to_int16(data: np.ndarray, path: str | Path) -> np.ndarray:
    """HU array → int16, refusing NaN/inf (rounded to 1 HU, clipped to the int16 range)."""
    if data.dtype.kind == "f":
        bad = ~np.isfinite(data)
        if bad.any():
            raise InputDataError(path, f"{int(bad.sum())} NaN/inf voxels in the CT volume")
        data = np.clip(np.rint(data), -32768, 32767)
    elif data.dtype.kind not in "iu":
        raise InputDataError(path, f"unsupported CT data type {data.dtype}")
    return data.astype(np.int16, copy=False)


def labels_to_uint8(data: np.ndarray, path: str | Path, num_classes: int) -> np.ndarray:
    """Label array → uint8, refusing non-integer floats and values outside 0..num_classes-1."""
    if data.dtype.kind == "f":
        if not np.isfinite(data).all():
            raise InputDataError(path, "NaN/inf values in the label map")
        rounded = np.rint(data)
        if not np.array_equal(rounded, data):
            raise InputDataError(path, "label map has non-integer values (interpolated labels?)")
        data = rounded
    values = np.unique(data)
    allowed = set(range(num_classes))
    extra = [v for v in values.tolist() if v not in allowed]
    if extra:
        raise InputDataError(
            path, f"label values {sorted(extra)[:10]} outside {{{', '.join(map(str, sorted(allowed)))}}}")
    return data.astype(np.uint8, copy=False)


def load_ct_pair(image_path: Path, label_path: Path | None, num_classes: int = 3):
    """Load and cross-check a CT volume and its segmentation; returns (ct, label|None)."""
    img = load_nifti(image_path)
    ct = to_canonical(img, image_path)
    ct.data = ct_to_int16(ct.data, image_path)
    if label_path is None:
        return ct, None
    seg_img = load_nifti(label_path)
    if seg_img.shape != img.shape:
        raise InputDataError(label_path, f"shape {seg_img.shape} differs from volume {image_path.name} {img.shape}")
    if not np.allclose(seg_img.affine, img.affine, atol=AFFINE_ATOL):
        raise InputDataError(label_path, f"affine differs from volume {image_path.name} "
                                         f"(max |diff| {np.abs(seg_img.affine - img.affine).max():.4g})")
    seg = to_canonical(seg_img, label_path)
    seg.data = labels_to_uint8(seg.data, label_path, num_classes)
    return ct, seg


def load_rgb_pair(image_path: Path, mask_path: Path, threshold: int = 127):
    """Load a Kvasir-SEG JPEG image and mask; mask thresholded at ``threshold`` → {0, 1}."""
    from PIL import Image

    def _open(path: Path, mode: str) -> np.ndarray:
        try:
            with Image.open(path) as im:
                im.load()
                return np.asarray(im.convert(mode))
        except Exception as exc:
            raise InputDataError(path, f"cannot read image: {exc}") from None

    rgb = _open(image_path, "RGB")
    mask = _open(mask_path, "L")
    if mask.shape != rgb.shape[:2]:
        raise InputDataError(mask_path, f"mask size {mask.shape[::-1]} differs from image "
                                        f"{image_path.name} size {rgb.shape[1::-1]}")
    return rgb, (mask > threshold).astype(np.uint8)

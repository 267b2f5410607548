"""Reading a DICOM CT series (pydicom) into the same RAS canonical form as a NIfTI volume.

* Slices are ordered by their position along the slice normal (``ImageOrientationPatient`` row ×
  column direction · ``ImagePositionPatient``), never by file name or ``InstanceNumber``.
* HU = stored value × ``RescaleSlope`` + ``RescaleIntercept``.
* Spacing: ``PixelSpacing`` is (between rows, between columns) — row spacing first — and the slice
  spacing comes from the positions.
* The affine is built in DICOM's patient frame (LPS) for the voxel array indexed (column, row,
  slice) and flipped to RAS (diag(-1, -1, 1)); the volume then goes through the NIfTI path's
  ``to_canonical`` (RAS+, stored as (Z, Y, X)).

A folder that mixes two series, has a gap in slice positions (a missing slice), changes orientation
or pixel spacing between slices, or holds pixel data in a compressed transfer syntax that no
installed decoder reads is refused with an InputDataError naming the folder and the problem.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from hpc_seg.ingest.nifti_io import CanonicalVolume, ct_to_int16, to_canonical
from hpc_seg.errors import InputDataError

ORIENT_ATOL = 1e-4
SPACING_ATOL = 1e-3  # mm


@dataclass
class Slice:
    path: Path
    ds: object  # pydicom Dataset
    position: float  # along the slice normal


def _read_all(folder: Path) -> list:
    import pydicom
    from pydicom.errors import InvalidDicomError

    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name.upper() != "DICOMDIR")
    out = []
    for p in files:
        try:
            out.append((p, pydicom.dcmread(p)))
        except InvalidDicomError:
            continue  # not DICOM (a README, a thumbnail): ignored
        except Exception as exc:
            raise InputDataError(p, f"cannot read DICOM: {exc}") from None
    if not out:
        raise InputDataError(folder, "no DICOM files found")
    return out


def _geometry(folder: Path, datasets: list) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """Common (row direction, column direction) and PixelSpacing, checked across slices."""
    series = {str(getattr(ds, "SeriesInstanceUID", "")) for _, ds in datasets}
    if len(series) > 1:
        raise InputDataError(folder, f"{len(series)} DICOM series mixed in one folder (SeriesInstanceUID "
                                     f"{sorted(series)[:2]}…); put each series in its own folder")
    try:
        orients = np.array([[float(v) for v in ds.ImageOrientationPatient] for _, ds in datasets])
        spacings = np.array([[float(v) for v in ds.PixelSpacing] for _, ds in datasets])
        [ds.ImagePositionPatient for _, ds in datasets]
    except AttributeError as exc:
        raise InputDataError(folder, f"DICOM geometry missing ({exc}); not a CT image series") from None
    if np.abs(orients - orients[0]).max() > ORIENT_ATOL:
        i = int(np.argmax(np.abs(orients - orients[0]).max(1)))
        raise InputDataError(folder, f"inconsistent ImageOrientationPatient: {datasets[i][0].name} has "
                                     f"{orients[i].round(4).tolist()}, {datasets[0][0].name} {orients[0].round(4).tolist()}")
    if np.abs(spacings - spacings[0]).max() > SPACING_ATOL:
        i = int(np.argmax(np.abs(spacings - spacings[0]).max(1)))
        raise InputDataError(folder, f"inconsistent PixelSpacing: {datasets[i][0].name} has {spacings[i].tolist()}, "
                                     f"{datasets[0][0].name} {spacings[0].tolist()}")
    row, col = orients[0][:3], orients[0][3:]
    return row / np.linalg.norm(row), col / np.linalg.norm(col), (float(spacings[0][0]), float(spacings[0][1]))


def _ordered(folder: Path, datasets: list, normal: np.ndarray) -> tuple[list[Slice], float]:
    """Slices sorted along the normal, and the slice spacing; gaps and duplicates refused."""
    slices = sorted((Slice(p, ds, float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient])))
                     for p, ds in datasets), key=lambda s: s.position)
    if len(slices) == 1:
        thickness = float(getattr(slices[0].ds, "SliceThickness", 1.0) or 1.0)
        return slices, thickness
    steps = np.diff([s.position for s in slices])
    dz = float(np.median(steps))
    if dz <= SPACING_ATOL:
        raise InputDataError(folder, "two or more slices share one position (a duplicated slice?)")
    bad = np.flatnonzero(np.abs(steps - dz) > max(0.1 * dz, 0.01))
    if bad.size:
        k = int(bad[0])
        raise InputDataError(folder, f"gap in slice positions between {slices[k].path.name} ({slices[k].position:.2f} mm) "
                                     f"and {slices[k + 1].path.name} ({slices[k + 1].position:.2f} mm), expected "
                                     f"{dz:.2f} mm: a missing slice?")
    return slices, dz


def _decoded(s: Slice) -> np.ndarray:
    """``pixel_array``, or one clear error (pydicom's own log lines about failed plug-ins muted)."""
    log = logging.getLogger("pydicom")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        return s.ds.pixel_array
    except Exception as exc:  # compressed transfer syntax without a decoder, truncated data, …
        ts = getattr(getattr(s.ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(ts, "name", ts)
        raise InputDataError(s.path, f"cannot decode pixel data (transfer syntax {name}): {' '.join(str(exc).split())}. "
                                     "Decompress the series (e.g. 'gdcmconv --raw') or install a pydicom decoder "
                                     "plug-in") from None
    finally:
        log.setLevel(level)


def _pixels(s: Slice, folder: Path) -> np.ndarray:
    arr = _decoded(s)
    slope = float(getattr(s.ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(s.ds, "RescaleIntercept", 0) or 0)
    return arr.astype(np.float64) * slope + intercept


def read_series(folder: Path, as_labels: bool = False) -> tuple[nib.Nifti1Image, list[Slice]]:
    """A DICOM series folder → a NIfTI image in RAS (voxel order: column, row, slice) and the
    slices in position order. ``as_labels``: raw stored values (masks), no HU rescale."""
    folder = Path(folder)
    datasets = _read_all(folder)
    row, col, (drow, dcol) = _geometry(folder, datasets)
    normal = np.cross(row, col)
    slices, dz = _ordered(folder, datasets, normal)
    shapes = {(int(s.ds.Rows), int(s.ds.Columns)) for s in slices}
    if len(shapes) > 1:
        raise InputDataError(folder, f"slices of different sizes {sorted(shapes)}")
    planes = [_raw(s) if as_labels else _pixels(s, folder) for s in slices]
    data = np.stack(planes, axis=-1).transpose(1, 0, 2)  # (rows, cols, k) → (col i, row j, slice k)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2] = row * dcol, col * drow, normal * dz
    lps[:3, 3] = [float(v) for v in slices[0].ds.ImagePositionPatient]
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    return nib.Nifti1Image(data, ras), slices


def _raw(s: Slice) -> np.ndarray:
    return np.asarray(_decoded(s))


def load_dicom_ct(folder: Path) -> tuple[CanonicalVolume, nib.Nifti1Image, list[Slice]]:
    """CT series → canonical (Z, Y, X) int16 HU volume (as a NIfTI would give), the RAS image, the slices."""
    img, slices = read_series(folder)
    canon = to_canonical(img, folder)
    canon.data = ct_to_int16(canon.data, folder)
    return canon, img, slices


def binary_mask(values: np.ndarray, where: Path) -> np.ndarray:
    """A mask with two values at most (0 and one other: 1, 255, …) → bool; anything else refused."""
    vals = np.unique(values)
    if vals.size > 2 or (vals.size == 2 and vals[0] != 0):
        raise InputDataError(where, f"mask is not binary: values {vals[:6].tolist()}{'…' if vals.size > 6 else ''}")
    return values > 0

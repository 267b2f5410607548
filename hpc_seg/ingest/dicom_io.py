"""Reading a DICOM CT series (pydicom) into the same RAS canonical form as a NIfTI volume.

* Slices are ordered by their position along the slice normal (``ImageOrientationPatient`` row ×
  column direction · ``ImagePositionPatient``), never by file name or ``InstanceNumber``.
* HU = stored value × ``RescaleSlope`` + ``RescaleIntercept``.
* Spacing: ``PixelSpacing`` is (between rows, between columns) — row spacing first — and the slice
  spacing comes from the positions.
* The affine is built in DICOM's patient frame (LPS) for the voxel array indexed (column, row,
  slice) and flipped to RAS (diag(-1, -1, 1)); the volume then goes through the NIfTI path's
  ``to_canonical`` (RAS+, stored as (Z, Y, X)).

Files of another orientation than most of the folder's (a coronal reformat or a localizer stored
under the same SeriesInstanceUID, as scanners often add) and non-image objects (DICOM-SEG, RTSTRUCT)
are left out and reported (``Series.left_out``). A folder that mixes two series (unless one is
chosen by UID), has a gap in slice positions (a missing slice), has no orientation shared by most
files, changes pixel spacing between slices, or holds pixel data in a compressed transfer syntax
that no installed decoder reads is refused with an InputDataError naming the folder and the problem.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from hpc_seg.ingest.nifti_io import CanonicalVolume, ct_to_int16, to_canonical
from hpc_seg.errors import InputDataError

ORIENT_ATOL = 1e-3  # direction cosines this close are one orientation (0.06°)
SPACING_ATOL = 1e-3  # mm
SHEAR_MM = 0.5  # in-plane drift of a slice from the first tolerated (rounding in positions)


# Objects that share a series folder with the images but are not slices of the volume.
NON_IMAGE_SOP = {"1.2.840.10008.5.1.4.1.1.66.4": "Segmentation Storage",
                 "1.2.840.10008.5.1.4.1.1.481.3": "RT Structure Set Storage",
                 "1.2.840.10008.5.1.4.1.1.11.1": "Grayscale Softcopy Presentation State Storage"}


@dataclass
class Slice:
    path: Path
    ds: object  # pydicom Dataset
    position: float  # along the slice normal


@dataclass
class Series:
    """A read series: the RAS image (voxel order column, row, slice), its slices in position order,
    and the files of the folder left out of it (``"name: why"``)."""

    image: nib.Nifti1Image
    slices: list[Slice]
    left_out: list[str]

    @property
    def uid(self) -> str:
        return str(getattr(self.slices[0].ds, "SeriesInstanceUID", ""))


def is_series_folder(folder: Path) -> bool:
    """A folder is a series when it holds DICOM files directly (a folder of case folders does not;
    a DICOMDIR index alone does not make one)."""
    from pydicom.misc import is_dicom

    return Path(folder).is_dir() and any(p.is_file() and p.name.upper() != "DICOMDIR" and is_dicom(p)
                                         for p in Path(folder).iterdir())


def _read_headers(folder: Path, left_out: list[str]) -> list:
    """(path, header) of every DICOM file under ``folder``; pixel data is read later, for the slices
    kept only. A file pydicom cannot parse is left out and reported (it may belong to no series)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    if not folder.is_dir():
        raise InputDataError(folder, "not a folder (a DICOM series is a folder of slice files)")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name.upper() != "DICOMDIR")
    out = []
    for p in files:
        try:
            out.append((p, pydicom.dcmread(p, stop_before_pixels=True)))
        except InvalidDicomError:
            continue  # not DICOM (a README, a thumbnail): ignored
        except Exception as exc:
            left_out.append(f"{p.name}: unreadable DICOM ({' '.join(str(exc).split())[:120]})")
    if not out:
        raise InputDataError(folder, "no DICOM files found" + (f" (left out: {'; '.join(left_out)})" if left_out else ""))
    return out


def _images_only(folder: Path, datasets: list, left_out: list[str]) -> list:
    """Single-frame image slices; SEG, RTSTRUCT, reports and multi-frame objects beside them are left
    out and reported."""
    kept = []
    for p, ds in datasets:
        sop = str(getattr(ds, "SOPClassUID", ""))
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        if sop in NON_IMAGE_SOP or "Rows" not in ds:
            left_out.append(f"{p.name}: not an image slice ({NON_IMAGE_SOP.get(sop, 'no image')})")
        elif frames > 1:
            left_out.append(f"{p.name}: multi-frame object ({frames} frames; Enhanced CT is not read: convert it "
                            "to single-frame slices, e.g. with dcm2niix or dciodvfy's emf2sf)")
        else:
            kept.append((p, ds))
    if not kept:
        raise InputDataError(folder, f"no single-frame image slices (left out: {'; '.join(left_out)})")
    return kept


def _describe(group: list) -> str:
    ds = group[0][1]
    parts = [f"#{ds.SeriesNumber}" if getattr(ds, "SeriesNumber", None) not in (None, "") else "",
             str(getattr(ds, "SeriesDescription", "") or ""), f"{len(group)} file{'s' if len(group) != 1 else ''}"]
    return ", ".join(x for x in parts if x)


def _is_localizer(group: list) -> bool:
    return all("LOCALIZER" in [str(v).upper() for v in getattr(ds, "ImageType", [])] for _, ds in group)


def _one_series(folder: Path, datasets: list, series_uid: str | None, left_out: list[str]) -> list:
    """The slices of one SeriesInstanceUID: the one asked for, the only one present, or the only one
    that is not a localizer (scouts are left out and reported)."""
    groups: dict[str, list] = {}
    for p, ds in datasets:
        groups.setdefault(str(getattr(ds, "SeriesInstanceUID", "")), []).append((p, ds))
    listed = "; ".join(f"{u} ({_describe(g)})" for u, g in sorted(groups.items(), key=lambda kv: -len(kv[1])))
    if series_uid is not None:
        if series_uid not in groups:
            raise InputDataError(folder, f"no series {series_uid} here; series present: {listed}")
        return groups[series_uid]
    real = {u: g for u, g in groups.items() if not _is_localizer(g)}
    if len(groups) > 1 and len(real) == 1:
        for u in groups.keys() - real.keys():
            left_out.append(f"series {u} ({_describe(groups[u])}): a localizer")
        groups = real
    if len(groups) > 1:
        raise InputDataError(folder, f"{len(groups)} DICOM series mixed in one folder ({listed}); put each series "
                                     "in its own folder, or choose one (predict --series UID)")
    return next(iter(groups.values()))


def _majority_orientation(folder: Path, datasets: list, left_out: list[str]) -> list:
    """Slices of the orientation most files share; reformats and localizers of another orientation
    (often stored under the same SeriesInstanceUID) are left out and reported, one line per orientation."""
    try:
        orients = np.array([[float(v) for v in ds.ImageOrientationPatient] for _, ds in datasets])
    except (AttributeError, TypeError, ValueError) as exc:
        raise InputDataError(folder, f"DICOM geometry missing or malformed ({exc}); not a CT image series") from None
    _, group, counts = np.unique(np.round(orients / ORIENT_ATOL), axis=0, return_inverse=True, return_counts=True)
    group = group.ravel()
    best = int(np.argmax(counts))
    keep = group == best
    first = int(np.flatnonzero(keep)[0])
    if 2 * int(keep.sum()) <= len(datasets):  # no majority: the folder is not one stack
        i = int(np.flatnonzero(~keep)[0])
        raise InputDataError(folder, f"inconsistent ImageOrientationPatient: {datasets[i][0].name} has "
                                     f"{orients[i].round(4).tolist()}, {datasets[first][0].name} "
                                     f"{orients[first].round(4).tolist()}, and no orientation is shared by most files")
    for g in sorted(set(group.tolist()) - {best}):
        idx = np.flatnonzero(group == g)
        image_type = "\\".join(str(v) for v in getattr(datasets[idx[0]][1], "ImageType", []))
        names = ", ".join(datasets[i][0].name for i in idx[:3]) + (f" and {len(idx) - 3} more" if len(idx) > 3 else "")
        left_out.append(f"{names}: ImageOrientationPatient {orients[idx[0]].round(4).tolist()} differs from "
                        f"the other {int(keep.sum())} slices'" + (f" (ImageType {image_type})" if image_type else ""))
    return [d for d, k in zip(datasets, keep) if k]


def _geometry(folder: Path, datasets: list) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """Common (row direction, column direction) and PixelSpacing, checked across slices."""
    try:
        orient = [float(v) for v in datasets[0][1].ImageOrientationPatient]
        spacings = np.array([[float(v) for v in ds.PixelSpacing] for _, ds in datasets])
        [ds.ImagePositionPatient for _, ds in datasets]
    except AttributeError as exc:
        raise InputDataError(folder, f"DICOM geometry missing ({exc}); not a CT image series") from None
    if np.abs(spacings - spacings[0]).max() > SPACING_ATOL:
        i = int(np.argmax(np.abs(spacings - spacings[0]).max(1)))
        raise InputDataError(folder, f"inconsistent PixelSpacing: {datasets[i][0].name} has {spacings[i].tolist()}, "
                                     f"{datasets[0][0].name} {spacings[0].tolist()}")
    row, col = np.array(orient[:3]), np.array(orient[3:])
    return row / np.linalg.norm(row), col / np.linalg.norm(col), (float(spacings[0][0]), float(spacings[0][1]))


def _ordered(folder: Path, datasets: list, normal: np.ndarray, left_out: list[str]) -> tuple[list[Slice], float]:
    """Slices sorted along the normal, and the slice spacing; duplicates, gaps, drifting spacing and
    in-plane drift refused."""
    slices = sorted((Slice(p, ds, float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient])))
                     for p, ds in datasets), key=lambda s: s.position)
    if len(slices) == 1:
        thickness = float(getattr(slices[0].ds, "SliceThickness", 1.0) or 1.0)
        return slices, thickness
    steps = np.diff([s.position for s in slices])
    dz = float(np.median(steps))
    note = f" (left out: {'; '.join(left_out)})" if left_out else ""
    if dz <= SPACING_ATOL or (steps <= SPACING_ATOL).any():
        k = int(np.argmin(steps))
        raise InputDataError(folder, f"duplicated slice: {slices[k].path.name} and {slices[k + 1].path.name} share "
                                     f"position {slices[k].position:.2f} mm")
    bad = np.flatnonzero(np.abs(steps - dz) > max(0.1 * dz, 0.01))
    if bad.size:
        k = int(bad[0])
        raise InputDataError(folder, f"gap in slice positions between {slices[k].path.name} ({slices[k].position:.2f} mm) "
                                     f"and {slices[k + 1].path.name} ({slices[k + 1].position:.2f} mm), expected "
                                     f"{dz:.2f} mm: a missing slice?" + note)
    dz = (slices[-1].position - slices[0].position) / (len(slices) - 1)
    _check_regular(folder, slices, normal, dz)
    return slices, dz


def _check_regular(folder: Path, slices: list[Slice], normal: np.ndarray, dz: float) -> None:
    """Every slice where the affine puts it: along the normal at ``dz`` steps (a spacing that drifts
    would misplace voxels and volumes) and with no in-plane drift (gantry tilt would be sheared)."""
    pos = np.array([[float(v) for v in s.ds.ImagePositionPatient] for s in slices])
    rel = pos - pos[0]
    along = rel @ normal
    off = np.abs(along - dz * np.arange(len(slices)))
    k = int(np.argmax(off))
    if off[k] > min(0.1 * abs(dz), 0.5):
        raise InputDataError(folder, f"slice spacing is not regular: {slices[k].path.name} lies {off[k]:.2f} mm from "
                                     f"where a regular {dz:.2f} mm stack puts it; resample the series first")
    drift = np.linalg.norm(rel - along[:, None] * normal[None, :], axis=1)
    k = int(np.argmax(drift))
    if drift[k] > SHEAR_MM:
        raise InputDataError(folder, f"slices are not stacked along their normal: {slices[k].path.name} lies "
                                     f"{drift[k]:.1f} mm off in-plane from {slices[0].path.name} (gantry tilt?); "
                                     "resample the series to an orthogonal grid first")


def _decoded(s: Slice) -> np.ndarray:
    """The slice's pixels, read now from its file (the header kept in ``s.ds`` holds none), or one
    clear error (pydicom's own log lines about failed plug-ins muted)."""
    import pydicom

    log = logging.getLogger("pydicom")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        return pydicom.dcmread(s.path).pixel_array
    except Exception as exc:  # compressed transfer syntax without a decoder, truncated data, …
        ts = getattr(getattr(s.ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(ts, "name", ts)
        raise InputDataError(s.path, f"cannot decode pixel data (transfer syntax {name}): {' '.join(str(exc).split())}. "
                                     "Decompress the series (e.g. 'gdcmconv --raw') or install a pydicom decoder "
                                     "plug-in") from None
    finally:
        log.setLevel(level)


def _volume(slices: list[Slice], as_labels: bool) -> np.ndarray:
    """(columns, rows, slices) array, filled slice by slice: HU as float32 (exact for stored integers
    and the usual slopes), or the stored values for masks; no per-slice float64 copies kept."""
    rows, cols = int(slices[0].ds.Rows), int(slices[0].ds.Columns)
    out = None
    for k, s in enumerate(slices):
        arr = _decoded(s)
        if arr.shape != (rows, cols):
            raise InputDataError(s.path, f"slice of size {arr.shape}, the series' first is {(rows, cols)}")
        if not as_labels:
            slope = float(getattr(s.ds, "RescaleSlope", 1) or 1)
            arr = arr.astype(np.float32) * np.float32(slope) + np.float32(getattr(s.ds, "RescaleIntercept", 0) or 0)
        if out is None:
            out = np.empty((cols, rows, len(slices)), arr.dtype)
        out[:, :, k] = arr.T
    return out


def read_series(folder: Path, as_labels: bool = False, series_uid: str | None = None) -> Series:
    """A DICOM series folder → a NIfTI image in RAS (voxel order: column, row, slice), the slices in
    position order (headers only) and what was left out. ``as_labels``: raw stored values (masks),
    no HU rescale. ``series_uid`` picks one series of a folder holding several."""
    folder = Path(folder)
    left_out: list[str] = []
    datasets = _images_only(folder, _read_headers(folder, left_out), left_out)
    datasets = _majority_orientation(folder, _one_series(folder, datasets, series_uid, left_out), left_out)
    row, col, (drow, dcol) = _geometry(folder, datasets)
    normal = np.cross(row, col)
    slices, dz = _ordered(folder, datasets, normal, left_out)
    shapes = {(int(s.ds.Rows), int(s.ds.Columns)) for s in slices}
    if len(shapes) > 1:
        raise InputDataError(folder, f"slices of different sizes {sorted(shapes)}")
    data = _volume(slices, as_labels)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2] = row * dcol, col * drow, normal * dz
    lps[:3, 3] = [float(v) for v in slices[0].ds.ImagePositionPatient]
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    return Series(nib.Nifti1Image(data, ras), slices, left_out)


def load_dicom_ct(folder: Path, series_uid: str | None = None) -> tuple[CanonicalVolume, Series]:
    """CT series → canonical (Z, Y, X) int16 HU volume (as a NIfTI would give) and the series read."""
    series = read_series(folder, series_uid=series_uid)
    canon = to_canonical(series.image, folder)
    canon.data = ct_to_int16(canon.data, folder)
    return canon, series


def binary_mask(values: np.ndarray, where: Path) -> np.ndarray:
    """A mask with two values at most (0 and one other: 1, 255, …) → bool; anything else refused."""
    vals = np.unique(values)
    if vals.size > 2 or (vals.size == 2 and vals[0] != 0):
        raise InputDataError(where, f"mask is not binary: values {vals[:6].tolist()}{'…' if vals.size > 6 else ''}")
    return values > 0

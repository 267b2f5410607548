"""3D-IRCADb-01 (20 contrast CTs with liver tumours), in its own layout: one folder per patient
with ``PATIENT_DICOM`` (the CT series) and ``MASKS_DICOM/<structure>/`` (one binary DICOM series per
structure), each a folder or the ``.zip`` it is distributed as; files have no extension.

Labels: 1 liver (``liver``), 2 tumour = union of the tumour structures, whose folder names vary
between patients (``livertumor01``, ``livertumors``, ``tumor``, …: every name containing
"tumor"/"tumour"); other structures (vessels, kidneys, cysts, …) are ignored and listed in the
case's metadata (``structures_ignored``) and the conversion report.

Soler et al., "3D image reconstruction for comparison of algorithm database", IRCAD 2010.
"""

from __future__ import annotations

import re
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from hpc_seg.ingest.dicom_io import binary_mask, load_dicom_ct, read_series
from hpc_seg.ingest.kinds.base import CaseSource, DatasetKind, Discovered, register
from hpc_seg.ingest.nifti_io import AFFINE_ATOL, to_canonical
from hpc_seg.errors import InputDataError

CLASSES = ("background", "liver", "tumour")
TUMOUR = re.compile(r"tumou?r", re.I)


def _part(patient: Path, name: str) -> Path | None:
    for cand in (patient / name, patient / f"{name}.zip"):
        if cand.exists():
            return cand
    return None


def _case_id(folder: Path) -> str:
    m = re.search(r"(\d+)$", folder.name)
    return f"ircadb_{int(m.group(1)):04d}" if m else "ircadb_" + re.sub(r"[^A-Za-z0-9_.-]", "_", folder.name)


def discover(src: Path) -> Discovered:
    if not src.is_dir():
        raise InputDataError(src, "input directory not found (expected 3D-IRCADb layout: <patient>/PATIENT_DICOM "
                                  "+ MASKS_DICOM, folders or .zip)")
    patients = [src] if _part(src, "PATIENT_DICOM") else sorted(
        p for p in src.iterdir() if p.is_dir() and _part(p, "PATIENT_DICOM"))
    if not patients:
        raise InputDataError(src, "no patient folder with PATIENT_DICOM (folder or .zip) found")
    return Discovered([CaseSource(_case_id(p), _part(p, "PATIENT_DICOM"), _part(p, "MASKS_DICOM"))
                       for p in patients], list(CLASSES))


@contextmanager
def _unzipped(path: Path, name: str):
    """``path`` as a folder (a .zip is extracted into a temporary folder for the duration)."""
    if path.is_dir():
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="hpc-seg-ircadb-") as tmp:
        try:
            with zipfile.ZipFile(path) as z:
                z.extractall(tmp)
        except zipfile.BadZipFile as exc:
            raise InputDataError(path, f"not a readable zip archive ({exc})") from None
        inner = Path(tmp) / name
        yield inner if inner.is_dir() else Path(tmp)


def _structures(masks: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(masks.iterdir()) if p.is_dir()}


def _mask(folder: Path, ref_img, where: Path) -> np.ndarray:
    img = read_series(folder, as_labels=True).image
    if img.shape != ref_img.shape or not np.allclose(img.affine, ref_img.affine, atol=AFFINE_ATOL):
        raise InputDataError(folder, f"mask series geometry {img.shape} differs from the CT series {ref_img.shape} "
                                     f"in {where} (slice positions, orientation or spacing)")
    return binary_mask(to_canonical(img, folder).data, folder)


def load(src: CaseSource, classes: list[str]):
    if src.label is None:
        raise InputDataError(src.image.parent, "no MASKS_DICOM (folder or .zip) beside PATIENT_DICOM")
    with _unzipped(src.image, "PATIENT_DICOM") as ct_dir, _unzipped(src.label, "MASKS_DICOM") as mask_dir:
        ct, series = load_dicom_ct(ct_dir)
        ref_img = series.image
        structures = _structures(mask_dir)
        if "liver" not in {k.lower() for k in structures}:
            raise InputDataError(src.label, f"no 'liver' mask among {sorted(structures)}")
        label = np.zeros(ct.data.shape, np.uint8)
        used, ignored = [], []
        for name, folder in structures.items():
            if name.lower() == "liver":
                label[_mask(folder, ref_img, src.image) & (label == 0)] = 1
                used.append(name)
        for name, folder in structures.items():
            if TUMOUR.search(name):
                label[_mask(folder, ref_img, src.image)] = 2
                used.append(name)
            elif name.lower() != "liver":
                ignored.append(name)
    meta = {"source": {"image": str(src.image), "label": str(src.label)},
            "affine_original": ct.affine_original.tolist(), "affine_canonical": ct.affine_canonical.tolist(),
            "orientation": "RAS", "source_shape_xyz": list(ct.data.shape[::-1]), "spacing_unit": "millimeter",
            "structures_used": used, "structures_ignored": ignored,
            "notes": "; ".join(([f"ignored structures: {', '.join(ignored)}"] if ignored else [])
                               + [f"left out {x}" for x in series.left_out])}
    return ct.data[None], label, ct.spacing, meta


IRCADB = register(DatasetKind("ircadb", "CT", CLASSES, discover, load, window=(-100.0, 400.0),
                             merge=(("tumour", "liver"),)))

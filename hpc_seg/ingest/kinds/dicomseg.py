"""CT DICOM series with their masks as DICOM Segmentation objects (SOP class Segmentation Storage,
BINARY, FRACTIONAL or LABELMAP), as PACS exports and TCIA collections hold them.

``SRC`` is one case folder or any folder above several. A case is a folder that holds a SEG file
itself (beside series folders, or with every file mixed in it), or whose subfolders include a folder
of SEG files only (``<case>/<series>/`` + ``<case>/<seg>/``); a case's folders are not searched for
further cases. Case id: the folder's path below ``SRC`` (``SRC``'s own name when it is the case).

Inside a case: CT series (one folder each, or mixed), several contrast phases allowed, and one or
more SEG files. The series is the one the SEGs' ``ReferencedSeriesSequence`` names (phases often
share their geometry, so positions cannot tell them apart); without a reference, the only series
there is. Frames are placed by position (``hpc_seg.ingest.dicom_seg``). Segments become classes by
``SegmentLabel`` or property type meaning (liver; tumour/tumor/lesion/HCC/neoplasm/mass/… → tumour),
``options["segment"]`` (``--segment LABEL=CLASS``) first; several SEG files merge, tumour over
liver. Segments no class maps to and series no SEG references are left out and reported.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np

from hpc_seg.ingest.dicom_io import NON_IMAGE_SOP, load_dicom_ct
from hpc_seg.ingest.dicom_seg import (SEG_SOP_CLASSES, class_of_segment, read_seg, referenced_series, seg_masks,
                                      segments_of)
from hpc_seg.ingest.kinds.base import CaseSource, DatasetKind, Discovered, register
from hpc_seg.ingest.nifti_io import to_canonical
from hpc_seg.errors import HpcSegError, InputDataError

CLASSES = ("background", "liver", "tumour")
IGNORE = "background"  # --segment LABEL=background: the segment is not taken


def _sop_classes(folder: Path):
    """(path, SOPClassUID) of the DICOM files directly in ``folder``, read lazily (headers only)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name.upper() != "DICOMDIR":
            try:
                ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SOPClassUID"])
            except (InvalidDicomError, OSError):
                continue  # not DICOM (a README, a thumbnail)
            yield p, str(ds.get("SOPClassUID", ""))


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir())


def _holds_seg(folder: Path) -> bool:
    return any(sop in SEG_SOP_CLASSES for _, sop in _sop_classes(folder))


def _seg_only_leaf(folder: Path) -> bool:
    """A folder of SEG files only (a case's SEG folder, not a case of its own: it holds no series)."""
    if _subfolders(folder):
        return False
    sops = []
    for _, sop in _sop_classes(folder):
        if sop not in SEG_SOP_CLASSES:
            return False
        sops.append(sop)
    return bool(sops)


def _is_case(folder: Path) -> bool:
    return _holds_seg(folder) or any(_seg_only_leaf(sub) for sub in _subfolders(folder))


def _cases_below(folder: Path) -> list[Path]:
    found = []
    for sub in _subfolders(folder):
        found += [sub] if _is_case(sub) else _cases_below(sub)
    return found


def discover(src: Path) -> Discovered:
    if not src.is_dir():
        raise InputDataError(src, "input directory not found (expected case folders of CT DICOM series + DICOM-SEG files)")
    cases = [src] if _is_case(src) else _cases_below(src)
    if not cases:
        raise InputDataError(src, "no case found: no folder holds a DICOM Segmentation file (SOP class Segmentation "
                                  "Storage), itself or in a folder of SEG files beside its series")
    ids = [src.name if c == src else "_".join(c.relative_to(src).parts) for c in cases]
    return Discovered([CaseSource(re.sub(r"[^A-Za-z0-9_.-]", "_", i), c, None) for i, c in zip(ids, cases)],
                      list(CLASSES))


def _scan(case: Path) -> tuple[list[Path], dict[str, list[Path]]]:
    """The case's SEG files and its other DICOM image files by SeriesInstanceUID (headers only)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    segs, series = [], {}
    for p in sorted(q for q in case.rglob("*") if q.is_file() and q.name.upper() != "DICOMDIR"):
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SOPClassUID", "SeriesInstanceUID"])
        except (InvalidDicomError, OSError):
            continue
        sop = str(ds.get("SOPClassUID", ""))
        if sop in SEG_SOP_CLASSES:
            segs.append(p)
        elif sop not in NON_IMAGE_SOP:
            series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(p)
    return segs, series


def _listed(series: dict[str, list[Path]]) -> str:
    return ", ".join(f"{uid} ({len(files)} files)" for uid, files in series.items()) or "none"


def _chosen_series(case: Path, segs: list, series: dict[str, list[Path]]) -> str:
    """The one series every SEG of the case references (or the only series, for SEGs naming none)."""
    chosen = {}
    for path, seg in segs:
        refs = referenced_series(seg)
        present = [uid for uid in refs if uid in series]
        if refs and not present:
            raise InputDataError(path, f"references series {', '.join(refs)}, which is not in {case} "
                                       f"(series there: {_listed(series)})")
        if len(present) > 1:
            raise InputDataError(path, f"references {len(present)} series of the case ({', '.join(present)}): "
                                       "which one it marks is unclear")
        if not refs and len(series) != 1:
            raise InputDataError(path, f"names no series (no ReferencedSeriesSequence) and the case holds "
                                       f"{len(series)}: {_listed(series)}; which one it marks is unclear")
        chosen[path] = present[0] if present else next(iter(series))
    if len(set(chosen.values())) > 1:
        raise InputDataError(case, "its SEG files mark different series (" + "; ".join(
            f"{p.name}: {uid}" for p, uid in chosen.items()) + "): a case is one CT series, put each in its own folder")
    return next(iter(chosen.values()))


def _overrides(options: dict, classes: list[str]) -> dict[str, str]:
    pairs = {str(k).casefold(): str(v) for k, v in (options.get("segment") or {}).items()}
    bad = sorted({v for v in pairs.values() if v not in classes})
    if bad:
        raise HpcSegError(f"--segment: unknown class {', '.join(bad)} (classes: {', '.join(classes[1:])}; "
                          f"{IGNORE} leaves the segment out)")
    return pairs


def _class_of(label: str, meaning: str, overrides: dict[str, str]) -> str | None:
    cls = overrides.get(label.casefold()) or class_of_segment(label, meaning)
    return None if cls == IGNORE else cls


def _labels(segs: list, series, overrides: dict[str, str], classes: list[str]):
    """The merged label grid (column, row, slice) and, per SEG file, what was taken and left out."""
    masks = {c: np.zeros(series.image.shape, bool) for c in classes[1:]}
    used, ignored = [], []
    for path, seg in segs:
        classes_of = {number: _class_of(label, meaning, overrides) for number, label, meaning in segments_of(seg)}
        by_number = seg_masks(seg, path, series, [n for n, cls in classes_of.items() if cls in masks])
        taken = []
        for number, label, _ in segments_of(seg):
            if number in by_number:
                masks[classes_of[number]] |= by_number[number]
                taken.append({"number": number, "label": label, "class": classes_of[number]})
            else:
                ignored.append(f"segment {number} '{label}' of {path.name}")
        used.append({"file": str(path), "sop_instance_uid": str(seg.SOPInstanceUID), "type": str(seg.SegmentationType),
                     "frames": int(seg.NumberOfFrames), "segments": taken})
    label = np.zeros(series.image.shape, np.uint8)
    for value, cls in enumerate(classes[1:], start=1):  # later classes over earlier: tumour over liver
        label[masks[cls]] = value
    return label, used, ignored


def _folder_of(files: list[Path]) -> Path:
    return Path(os.path.commonpath([str(p.parent) for p in files]))


def load(src: CaseSource, classes: list[str]):
    case = Path(src.image)
    overrides = _overrides(src.options, classes)
    seg_paths, series_files = _scan(case)
    if not seg_paths:
        raise InputDataError(case, "no DICOM Segmentation file in the case")
    segs = [(p, read_seg(p)) for p in seg_paths]
    uid = _chosen_series(case, segs, series_files)
    folder = _folder_of(series_files[uid])
    ct, series = load_dicom_ct(folder, series_uid=uid)
    grid, used, ignored = _labels(segs, series, overrides, classes)
    if not any(u["segments"] for u in used):
        raise InputDataError(case, f"no segment of its SEG files maps to a class ({'; '.join(ignored)}): "
                                   "name the class with --segment LABEL=CLASS")
    label = to_canonical(nib.Nifti1Image(grid, series.image.affine), case).data
    seg_names = {p.name for p in seg_paths}
    left_series = [f"series {u} ({len(files)} files in {_folder_of(files)})"
                   for u, files in series_files.items() if u != uid]
    left_files = [x for x in series.left_out if x.split(":")[0] not in seg_names]
    notes = ([f"ignored {x} (no class; --segment LABEL=CLASS maps it)" for x in ignored]
             + [f"left out {x}: no Segmentation references it" for x in left_series]
             + [f"left out {x}" for x in left_files])
    meta = {"source": {"image": str(folder), "label": [str(p) for p in seg_paths]}, "series_uid": uid,
            "segmentations": used, "segments_ignored": ignored, "series_left_out": left_series,
            "affine_original": ct.affine_original.tolist(), "affine_canonical": ct.affine_canonical.tolist(),
            "orientation": "RAS", "source_shape_xyz": list(ct.data.shape[::-1]), "spacing_unit": "millimeter",
            "notes": "; ".join(notes)}
    return ct.data[None], label, ct.spacing, meta


DICOMSEG = register(DatasetKind("dicomseg", "CT", CLASSES, discover, load, window=(-100.0, 400.0),
                                merge=(("tumour", "liver"),), options=("segment",)))

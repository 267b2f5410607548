"""DICOM Segmentation objects (SOP class Segmentation Storage) through highdicom.

One module for both directions, so that the coded concepts a prediction is written with are the
ones a conversion maps back to classes:

* ``write_seg``: a label map on a CT series' own slices → a BINARY Segmentation that references
  the series and its instances, one segment per non-background class (segment number = label
  value: "liver" 1, "tumour" 2), frames only where a segment is present, the algorithm identified
  (hpc-seg version, model name, the preprocessing plan's digest).
* ``SEGMENT_CODES`` / ``class_of_segment``: class name ↔ (category, type, anatomic region) codes.
* reading (the ``dicomseg`` kind): ``read_seg`` (a BINARY, FRACTIONAL or LABELMAP SEG file),
  ``referenced_series``, ``segments_of`` and ``seg_masks``: each segment's mask on the grid of the
  CT series it references, frames placed by their position, geometry checked against the series.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np

from hpc_seg.errors import InputDataError

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
# Words in a SegmentLabel or a segmented property type's meaning that name a liver tumour.
TUMOUR_WORDS = re.compile(r"(?<![a-z])(tumou?r|lesion|hcc|neoplasm|mass|carcinoma|metasta)", re.IGNORECASE)
# Words naming a structure other than the liver parenchyma: "liver vessels" or "liver cyst" is no liver.
NOT_LIVER = re.compile(r"vessel|vein|arter|cyst|duct|biliar|portal|hepatic\s*v", re.IGNORECASE)
# highdicom's notes on a source's PatientName format are not the user's problem (one filter, set once:
# catch_warnings would change process-global state while a reader thread runs)
warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name", category=UserWarning)


def _codes():
    from pydicom.sr.codedict import codes

    return {  # class name → (segmented property category, type, anatomic regions)
        "liver": (codes.SCT.AnatomicalStructure, codes.SCT.Liver, None),
        "tumour": (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Neoplasm, [codes.SCT.Liver]),
    }


def class_of_segment(label: str, property_meaning: str = "") -> str | None:
    """The class a segment stands for, by its SegmentLabel or its property type's meaning."""
    words = f"{label} {property_meaning}"
    if TUMOUR_WORDS.search(words):
        return "tumour"
    if re.search(r"(?<![a-z])liver", words, re.IGNORECASE) and not NOT_LIVER.search(words):
        return "liver"
    return None


def segment_descriptions(classes: list[str], algorithm) -> list:
    """One SegmentDescription per non-background class; unknown names are coded as tissue."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    known = _codes()
    out = []
    for number, name in enumerate(classes[1:], start=1):
        category, kind, regions = known.get(name, (codes.SCT.Tissue, codes.SCT.Tissue, None))
        out.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=name, segmented_property_category=category,
            segmented_property_type=kind, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm, anatomic_regions=regions))
    return out


def algorithm_identification(model_name: str, version: str, plan_digest: str):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    return hd.AlgorithmIdentificationSequence(
        name=f"hpc-seg {model_name}", family=codes.cid7162.ArtificialIntelligence, version=version,
        source="hpc-seg", parameters={"preprocessing_plan_sha256": plan_digest})


# Type 2 attributes highdicom copies from the source into the SEG: present (empty is allowed) on
# every real CT, often removed by anonymisers.
TYPE2_FROM_SOURCE = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                     "StudyID", "AccessionNumber", "ReferringPhysicianName")


def seg_sources(datasets: list, where: Path) -> list:
    """The series' headers as highdicom needs them: the UIDs it references are required (one line
    naming what is missing), anonymised-away Type 2 attributes are added empty, on copies."""
    import copy

    missing = sorted({k for ds in datasets for k in ("FrameOfReferenceUID", "StudyInstanceUID",
                                                      "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
                      if not getattr(ds, k, None)})
    if missing:
        raise InputDataError(where, f"the CT series lacks {', '.join(missing)}: a DICOM-SEG cannot reference it")
    out = []
    for ds in datasets:
        ds = copy.copy(ds)
        for key in TYPE2_FROM_SOURCE:
            if key not in ds:
                setattr(ds, key, "")
        out.append(ds)
    return out


def write_seg(labels: np.ndarray, datasets: list, classes: list[str], out_path: Path, *, model_name: str,
              version: str, plan_digest: str, where: Path) -> Path:
    """``labels`` (slices, rows, columns), slice k on ``datasets[k]`` → a BINARY DICOM-SEG, atomically."""
    import highdicom as hd
    from pydicom.uid import generate_uid

    sources = seg_sources(datasets, where)
    if labels.shape != (len(sources), int(sources[0].Rows), int(sources[0].Columns)):
        raise InputDataError(where, f"internal error: labels {labels.shape} do not match the series "
                                    f"({len(sources)} slices of {sources[0].Rows}×{sources[0].Columns})")
    algorithm = algorithm_identification(model_name, version, plan_digest)
    try:
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=labels.astype(np.uint8),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=segment_descriptions(classes, algorithm),
            series_instance_uid=generate_uid(), series_number=int(getattr(sources[0], "SeriesNumber", 0) or 0) + 9000,
            sop_instance_uid=generate_uid(), instance_number=1, manufacturer="hpc-seg",
            manufacturer_model_name=model_name, software_versions=version, device_serial_number=plan_digest[:16],
            series_description=f"hpc-seg {model_name}", content_label="HPCSEG",
            omit_empty_frames=bool(labels.any()))  # an empty prediction keeps its frames: a SEG needs one
    except (ValueError, TypeError, AttributeError, KeyError) as exc:  # what highdicom finds wrong in the source
        raise InputDataError(where, f"cannot make a DICOM-SEG of this series: {' '.join(str(exc).split())}") from None
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    seg.save_as(tmp, enforce_file_format=True)
    tmp.replace(out_path)
    return out_path


# ---- reading: a Segmentation's segments on the grid of the CT series it references ---------------
#
# Frames are placed by their PlanePositionSequence position, never by the per-frame referenced SOP
# instances: real files get those wrong (all frames naming one slice). highdicom's ``get_volume``
# stacks the frames by position; the volume it returns (LPS affine, maybe a sub-range of slices, in
# either slice direction) is then mapped onto the series' (column, row, slice) grid by that affine.

LABELMAP_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.7"
SEG_SOP_CLASSES = {SEG_SOP_CLASS: "Segmentation Storage", LABELMAP_SOP_CLASS: "Label Map Segmentation Storage"}
GRID_TOL = 0.1  # of a voxel: how far off a slice of the series a frame may lie and still be on it
FRACTION_ON = 0.5  # a FRACTIONAL pixel belongs to its segment from this fraction of the maximum on


def read_seg(path: Path):
    """A DICOM-SEG file as highdicom's ``Segmentation``; not a SEG, or a SEG without frames, refused."""
    import highdicom as hd
    import pydicom

    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:
        raise InputDataError(path, f"cannot read DICOM: {exc}") from None
    if str(ds.get("SOPClassUID", "")) not in SEG_SOP_CLASSES:
        raise InputDataError(path, f"not a DICOM Segmentation (SOP class {ds.get('SOPClassUID', 'missing')})")
    if int(ds.get("NumberOfFrames", 0) or 0) < 1 or "PixelData" not in ds or \
            not ds.get("PerFrameFunctionalGroupsSequence"):
        raise InputDataError(path, "Segmentation without frames (NumberOfFrames "
                                   f"{ds.get('NumberOfFrames', 'missing')}): it marks nothing")
    try:
        return hd.seg.Segmentation.from_dataset(ds, copy=False)
    except Exception as exc:  # highdicom's integrity checks: one line, not its traceback
        raise InputDataError(path, f"not a readable DICOM Segmentation: {' '.join(str(exc).split())}") from None


def segments_of(seg) -> list[tuple[int, str, str]]:
    """(SegmentNumber, SegmentLabel, segmented property type's meaning) of every segment."""
    out = []
    for item in seg.SegmentSequence:
        codes_ = item.get("SegmentedPropertyTypeCodeSequence") or []
        out.append((int(item.SegmentNumber), str(item.get("SegmentLabel", "")),
                    str(codes_[0].get("CodeMeaning", "")) if codes_ else ""))
    return out


def referenced_series(seg) -> list[str]:
    return [str(item.SeriesInstanceUID) for item in seg.get("ReferencedSeriesSequence") or []]


def _per_frame(seg, sequence: str, attribute: str) -> list:
    """One value per frame: from the shared functional group when it holds ``sequence``."""
    shared = (seg.get("SharedFunctionalGroupsSequence") or [None])[0]
    frames = seg.PerFrameFunctionalGroupsSequence
    if shared is not None and shared.get(sequence):
        return [shared[sequence][0].get(attribute)] * len(frames)
    return [(f[sequence][0].get(attribute) if f.get(sequence) else None) for f in frames]


def _series_lps(series) -> np.ndarray:
    """Affine of the series grid (column, row, slice) in DICOM's LPS patient frame."""
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ series.image.affine


def check_seg_geometry(seg, path: Path, series) -> None:
    """Frame size, orientation, pixel spacing and frame of reference equal to the series'."""
    ref = series.slices[0].ds
    problems = []
    if (int(seg.Rows), int(seg.Columns)) != (int(ref.Rows), int(ref.Columns)):
        problems.append(f"frames {seg.Rows}×{seg.Columns} pixels, slices {ref.Rows}×{ref.Columns}")
    want = np.array([float(v) for v in ref.ImageOrientationPatient])
    for n, orient in enumerate(_per_frame(seg, "PlaneOrientationSequence", "ImageOrientationPatient"), 1):
        if orient is None or np.abs(np.array([float(v) for v in orient]) - want).max() > 1e-4:
            problems.append(f"frame {n} ImageOrientationPatient {orient and [float(v) for v in orient]}, "
                            f"series {want.tolist()}")
            break
    want = np.array([float(v) for v in ref.PixelSpacing])
    for n, spacing in enumerate(_per_frame(seg, "PixelMeasuresSequence", "PixelSpacing"), 1):
        if spacing is None or np.abs(np.array([float(v) for v in spacing]) - want).max() > 1e-3:
            problems.append(f"frame {n} PixelSpacing {spacing and [float(v) for v in spacing]}, series {want.tolist()}")
            break
    frame_uid, ref_uid = seg.get("FrameOfReferenceUID"), ref.get("FrameOfReferenceUID")
    if frame_uid and ref_uid and str(frame_uid) != str(ref_uid):
        problems.append(f"FrameOfReferenceUID {frame_uid}, series {ref_uid}")
    if problems:
        raise InputDataError(path, f"geometry differs from its CT series {series.uid}: " + "; ".join(problems))


def frame_slices(seg, path: Path, series) -> np.ndarray:
    """The series slice each frame lies on, by its PlanePositionSequence position; a frame on none refused."""
    to_grid = np.linalg.inv(_series_lps(series))
    first, last = series.slices[0].position, series.slices[-1].position
    out = []
    for n, pos in enumerate(_per_frame(seg, "PlanePositionSequence", "ImagePositionPatient"), 1):
        if pos is None:
            raise InputDataError(path, f"frame {n} has no PlanePositionSequence position: it cannot be placed")
        col, row, k = (to_grid @ [*(float(v) for v in pos), 1.0])[:3]
        if max(abs(col), abs(row), abs(k - round(k))) > GRID_TOL or not 0 <= round(k) < len(series.slices):
            raise InputDataError(path, f"frame {n} at {[round(float(v), 2) for v in pos]} mm lies on no slice of "
                                       f"series {series.uid} ({len(series.slices)} slices, {first:.2f} to "
                                       f"{last:.2f} mm along their normal)")
        out.append(int(round(k)))
    return np.array(out, int)


def _volume_slices(volume, path: Path, series) -> np.ndarray:
    """The series slice of each slice of highdicom's volume, read off the two affines."""
    m = np.linalg.inv(_series_lps(series)) @ volume.affine  # volume (slice, row, column) → series (column, row, slice)
    ks = m[2, 3] + m[2, 0] * np.arange(volume.spatial_shape[0])
    on_grid = (np.allclose(m[:3, 1], [0, 1, 0], atol=1e-3) and np.allclose(m[:3, 2], [1, 0, 0], atol=1e-3)
               and np.allclose(m[:2, [0, 3]], 0, atol=GRID_TOL) and abs(m[2, 0]) > 0.5
               and np.abs(ks - np.rint(ks)).max() <= GRID_TOL)
    ki = np.rint(ks).astype(int)
    if not on_grid or ki.min() < 0 or ki.max() >= len(series.slices):
        raise InputDataError(path, f"the frames, stacked by position, do not fall on the slices of series {series.uid}")
    return ki


def seg_masks(seg, path: Path, series, numbers: list[int] | None = None) -> dict[int, np.ndarray]:
    """The mask (bool) of each segment of ``numbers`` (default: all) on the series grid (column, row,
    slice), frames placed by position; FRACTIONAL pixels count from half the maximum fractional value on.
    The geometry is checked whatever ``numbers`` holds."""
    import highdicom as hd

    check_seg_geometry(seg, path, series)
    frame_slices(seg, path, series)
    numbers = [n for n in seg.segment_numbers if numbers is None or n in numbers]
    if not numbers:  # nothing asked for: no volume is built
        return {}
    try:
        volume = seg.get_volume(segment_numbers=numbers, combine_segments=False, rescale_fractional=True)
    except (ValueError, RuntimeError) as exc:
        raise InputDataError(path, f"frames do not stack into a volume: {' '.join(str(exc).split())}") from None
    ks = _volume_slices(volume, path, series)
    values = np.asarray(volume.array)
    on = values >= FRACTION_ON if seg.segmentation_type == hd.seg.SegmentationTypeValues.FRACTIONAL else values > 0
    ref = series.slices[0].ds
    grid = np.zeros((len(numbers), int(ref.Columns), int(ref.Rows), len(series.slices)), bool)
    grid[..., ks] = on.reshape(*on.shape[:3], len(numbers)).transpose(3, 2, 1, 0)
    return {number: grid[i] for i, number in enumerate(numbers)}

"""DICOM Segmentation objects (SOP class Segmentation Storage) through highdicom.

One module for both directions, so that the coded concepts a prediction is written with are the
ones a conversion maps back to classes:

* ``write_seg``: a label map on a CT series' own slices → a BINARY Segmentation that references
  the series and its instances, one segment per non-background class (segment number = label
  value: "liver" 1, "tumour" 2), frames only where a segment is present, the algorithm identified
  (hpc-seg version, model name, the preprocessing plan's digest).
* ``SEGMENT_CODES`` / ``class_of_segment``: class name ↔ (category, type, anatomic region) codes.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np

from hpc_seg.errors import InputDataError

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
# Words in a SegmentLabel or a segmented property type's meaning that name a liver tumour.
TUMOUR_WORDS = re.compile(r"tumou?r|lesion|hcc|neoplasm|mass|carcinoma|metasta", re.IGNORECASE)


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
    if re.search(r"liver", words, re.IGNORECASE):
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


def _check_sources(datasets: list, where: Path) -> None:
    """What highdicom needs from the source images, said in one line rather than its traceback."""
    missing = [k for k in ("FrameOfReferenceUID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
               if not getattr(datasets[0], k, None)]
    if missing:
        raise InputDataError(where, f"the CT series lacks {', '.join(missing)}: a DICOM-SEG cannot reference it")


def write_seg(labels: np.ndarray, datasets: list, classes: list[str], out_path: Path, *, model_name: str,
              version: str, plan_digest: str, where: Path) -> Path:
    """``labels`` (slices, rows, columns), slice k on ``datasets[k]`` → a BINARY DICOM-SEG, atomically."""
    import highdicom as hd
    from pydicom.uid import generate_uid

    _check_sources(datasets, where)
    if labels.shape != (len(datasets), int(datasets[0].Rows), int(datasets[0].Columns)):
        raise InputDataError(where, f"internal error: labels {labels.shape} do not match the series "
                                    f"({len(datasets)} slices of {datasets[0].Rows}×{datasets[0].Columns})")
    algorithm = algorithm_identification(model_name, version, plan_digest)
    with warnings.catch_warnings():  # highdicom's notes on the source's PatientName format are not the user's problem
        warnings.simplefilter("ignore", UserWarning)
        seg = hd.seg.Segmentation(
            source_images=datasets, pixel_array=labels.astype(np.uint8),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=segment_descriptions(classes, algorithm),
            series_instance_uid=generate_uid(), series_number=int(getattr(datasets[0], "SeriesNumber", 0) or 0) + 9000,
            sop_instance_uid=generate_uid(), instance_number=1, manufacturer="hpc-seg",
            manufacturer_model_name=model_name, software_versions=version, device_serial_number=plan_digest[:16],
            series_description=f"hpc-seg {model_name}", content_label="HPCSEG",
            omit_empty_frames=bool(labels.any()))  # an empty prediction keeps its frames: a SEG needs one
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    seg.save_as(tmp, enforce_file_format=True)
    tmp.replace(out_path)
    return out_path

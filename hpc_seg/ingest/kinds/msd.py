"""Medical Segmentation Decathlon tasks, read through the task's own ``dataset.json``: its
``labels`` (class names), ``modality`` and ``training`` list (``imagesTr/X.nii.gz`` +
``labelsTr/X.nii.gz``). Any single-channel CT task converts (Task03 Liver, Task06 Lung,
Task07 Pancreas, Task08 HepaticVessel, Task09 Spleen, Task10 Colon); multi-channel tasks
(BraTS, Prostate MRI) and non-CT modalities are refused with the reason.

Antonelli et al., "The Medical Segmentation Decathlon", Nature Communications 2022.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from hpc_seg.ingest.kinds.base import CaseSource, DatasetKind, Discovered, register
from hpc_seg.ingest.kinds.common import NIFTI_RE, load_ct, require_dir
from hpc_seg.errors import InputDataError

ALIASES = {"cancer": "tumour", "tumor": "tumour"}  # MSD Task03 says "cancer" for LiTS's tumour label


def _read_json(src: Path) -> dict:
    path = src / "dataset.json"
    if not path.is_file():
        raise InputDataError(src, "not an MSD task directory (dataset.json, imagesTr/ and labelsTr/ expected)")
    try:
        meta = json.loads(path.read_text())
    except ValueError as exc:
        raise InputDataError(path, f"not valid JSON ({exc})") from None
    for key in ("labels", "modality", "training"):
        if key not in meta:
            raise InputDataError(path, f"missing key '{key}'")
    return meta


def _classes(meta: dict, path: Path) -> list[str]:
    labels = {int(k): str(v) for k, v in meta["labels"].items()}
    if sorted(labels) != list(range(len(labels))) or len(labels) < 2:
        raise InputDataError(path, f"labels must be 0..K-1 with K >= 2, got {sorted(labels)}")
    return [ALIASES.get(labels[i].strip().lower(), labels[i].strip().lower()) for i in range(len(labels))]


def _case_id(name: str) -> str:
    m = re.match(r"^(.*?)_?(\d+)" + NIFTI_RE, name)
    return f"{m.group(1).lower()}_{int(m.group(2)):04d}" if m else re.sub(NIFTI_RE, "", name)


def discover(src: Path) -> Discovered:
    require_dir(src, "MSD layout: dataset.json + imagesTr/ + labelsTr/")
    meta = _read_json(src)
    path = src / "dataset.json"
    modality = [str(v) for _, v in sorted(meta["modality"].items())]
    if len(modality) != 1:
        raise InputDataError(path, f"multi-channel task ({', '.join(modality)}): hpc-seg converts single-channel "
                                   "CT tasks only")
    if modality[0].upper() != "CT":
        raise InputDataError(path, f"modality '{modality[0]}' is not CT: HU windows and the CT plan do not apply")
    cases = []
    for entry in meta["training"]:
        img, lab = (src / entry["image"]).resolve(), (src / entry["label"]).resolve()
        cases.append(CaseSource(_case_id(img.name), img if img.is_file() else None, lab if lab.is_file() else None))
    if not cases:
        raise InputDataError(path, "the 'training' list is empty")
    return Discovered(cases, _classes(meta, path), {"task": meta.get("name")})


# window None: the plan takes the 0.5–99.5 percentile range of the training foreground (nnU-Net's CT scheme)
MSD = register(DatasetKind("msd", "CT", None, discover, load_ct, window=None, normalize="zscore"))

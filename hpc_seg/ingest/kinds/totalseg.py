"""TotalSegmentator CT (Wasserthal et al., "TotalSegmentator: robust segmentation of 104 anatomic
structures in CT images", Radiology: AI 2023): one folder per subject with ``ct.nii.gz`` and
``segmentations/<structure>.nii.gz`` (or, flattened, ``liver.nii.gz`` beside ``ct.nii.gz``).

Only the liver is taken: labels 0 background, 1 liver. The set's masks were made by a model and
checked by people; they mark no liver tumour, so such a case, added to a LiTS store, teaches
liver-vs-background only (``hpc_seg.preprocessing.labels``).
"""

from __future__ import annotations

import re
from pathlib import Path

from hpc_seg.ingest.kinds.base import CaseSource, DatasetKind, Discovered, register
from hpc_seg.ingest.kinds.common import load_ct, require_dir
from hpc_seg.errors import InputDataError

CLASSES = ("background", "liver")


def _mask(folder: Path) -> Path | None:
    for p in (folder / "segmentations" / "liver.nii.gz", folder / "liver.nii.gz", folder / "segmentations" / "liver.nii"):
        if p.is_file():
            return p
    return None


def discover(src: Path) -> Discovered:
    require_dir(src, "TotalSegmentator layout: <subject>/ct.nii.gz + <subject>/segmentations/liver.nii.gz")
    cts = sorted(p for p in [src / "ct.nii.gz", *src.rglob("ct.nii.gz")] if p.is_file())
    if not cts:
        raise InputDataError(src, "no ct.nii.gz found (TotalSegmentator layout: <subject>/ct.nii.gz + "
                                  "<subject>/segmentations/liver.nii.gz)")
    cases = {}
    for ct in cts:
        cid = "totalseg_" + re.sub(r"[^A-Za-z0-9_.-]", "_", ct.parent.name)
        cases[cid] = CaseSource(cid, ct, _mask(ct.parent))
    return Discovered([cases[c] for c in sorted(cases)], list(CLASSES))


TOTALSEG = register(DatasetKind("totalseg", "CT", CLASSES, discover, load_ct, window=(-100.0, 400.0)))

"""LiTS17 (and the synthetic phantom, written in LiTS layout): ``volume-N.nii[.gz]`` +
``segmentation-N.nii[.gz]``, searched recursively; labels 0 background, 1 liver, 2 tumour.

Bilic et al., "The Liver Tumor Segmentation Benchmark (LiTS)", Medical Image Analysis 2023.
"""

from __future__ import annotations

import re
from pathlib import Path

from hpc_seg.ingest.kinds.base import CaseSource, DatasetKind, Discovered, register
from hpc_seg.ingest.kinds.common import NIFTI_RE, load_ct, require_dir
from hpc_seg.errors import InputDataError

CLASSES = ("background", "liver", "tumour")


def discover(src: Path) -> Discovered:
    require_dir(src, "LiTS17 layout: volume-N.nii + segmentation-N.nii")
    vols, segs = {}, {}
    for p in sorted(src.rglob("*")):
        m = re.match(r"^(volume|segmentation)-(\d+)" + NIFTI_RE, p.name)
        if m and p.is_file():
            (vols if m.group(1) == "volume" else segs)[int(m.group(2))] = p
    if not vols and not segs:
        raise InputDataError(src, "no volume-N.nii[.gz] files found (expected LiTS17 layout: "
                                  "volume-N.nii + segmentation-N.nii)")
    cases = [CaseSource(f"lits_{n:04d}", vols.get(n), segs.get(n)) for n in sorted(set(vols) | set(segs))]
    return Discovered(cases, list(CLASSES))


MERGE = (("tumour", "liver"),)  # tumours lie in the liver: a liver-only label's liver includes them
LITS = register(DatasetKind("lits", "CT", CLASSES, discover, load_ct, window=(-100.0, 400.0), merge=MERGE))
PHANTOM = register(DatasetKind("phantom", "CT", CLASSES, discover, load_ct, window=(-100.0, 400.0), merge=MERGE))

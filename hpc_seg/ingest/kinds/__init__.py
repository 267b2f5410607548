"""Dataset kinds: one module per kind of source data, each the only place that knows its layout.

A kind says how to find cases in a source directory (``discover``), how to read one case
(``load``: image (C, Z, Y, X), label (Z, Y, X), spacing, metadata), and the facts every later
step needs — classes, channels per slice, modality, default intensity window and
normalisation, the sampling modes it allows. Conversion copies those facts into the store's root
attributes, the split turns them into the preprocessing plan (``hpc_seg.preprocessing.plan``), and nothing
after conversion asks for a kind by name.

Registered: ``lits`` (LiTS17), ``phantom`` (the synthetic CT in LiTS layout), ``msd`` (any
single-channel CT task of the Medical Segmentation Decathlon, through its ``dataset.json``),
``ircadb`` (3D-IRCADb-01, DICOM), ``chaos`` (CHAOS CT, DICOM + PNG masks), ``dicomseg`` (CT
DICOM series + DICOM Segmentation objects), ``totalseg``
(TotalSegmentator CT, its liver mask) and ``kvasir`` (Kvasir-SEG polyps). Adding a kind = one
module calling :func:`register`.
"""

from __future__ import annotations

from hpc_seg.errors import HpcSegError
from hpc_seg.ingest.kinds import chaos, dicomseg, ircadb, kvasir, lits, msd, totalseg  # noqa: F401  (each registers itself)
from hpc_seg.ingest.kinds.base import KINDS, CaseSource, DatasetKind, Discovered, register  # noqa: F401


def get_kind(name: str) -> DatasetKind:
    if name not in KINDS:
        raise HpcSegError(f"unknown dataset kind '{name}' (registered: {', '.join(kind_names())})")
    return KINDS[name]


def kind_names() -> list[str]:
    return sorted(KINDS)

"""Shared fixtures: real NIfTI phantoms, real Zarr stores, the shared real data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HPC_SEG_SHARED_DATA", ROOT / ".." / "shared" / "data")).resolve()
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def shared_path(*parts: str) -> Path:
    """A path in ../shared/data; a missing data set fails (never skips) — CI has it."""
    p = SHARED.joinpath(*parts)
    assert p.exists(), f"shared data {p} is missing (see ../shared/data/README.md)"
    return p


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    from hpc_seg.data.phantom import write_lits_phantom

    d = tmp_path_factory.mktemp("phantom-nifti")
    write_lits_phantom(d, cases=6, shape=(64, 64, 16), seed=3)
    return d


@pytest.fixture(scope="session")
def phantom_store(phantom_dir, tmp_path_factory) -> Path:
    from hpc_seg.data.convert import convert

    out = tmp_path_factory.mktemp("stores") / "phantom.zarr"
    report = convert("lits", phantom_dir, out, workers=1, show_progress=False)
    assert report.ok and len(report.converted) == 6
    return out


@pytest.fixture(scope="session")
def kvasir_subset(tmp_path_factory) -> Path:
    """Twelve real Kvasir-SEG pairs copied into a temporary Kvasir layout."""
    import shutil

    src = shared_path("kvasir-seg")
    dst = tmp_path_factory.mktemp("kvasir")
    (dst / "images").mkdir()
    (dst / "masks").mkdir()
    for p in sorted((src / "images").iterdir())[:12]:
        shutil.copy(p, dst / "images" / p.name)
        shutil.copy(src / "masks" / p.name, dst / "masks" / p.name)
    return dst

"""Shared fixtures: real NIfTI phantoms, real Zarr stores, the repository's real CT fixture, and
the shared real data.

Two suites: ``make test`` (``-m "not shared_data"``) needs nothing beside the checkout (phantoms and
``tests/fixtures``, whose licences allow them here); ``make test-shared`` (``-m shared_data``) runs
the tests on LiTS, Kvasir-SEG and CHAOS from ``../shared/data``, which may not be redistributed in
this MIT repository, and fails — naming where the data comes from — when it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
SHARED = Path(os.environ.get("HPC_SEG_SHARED_DATA", ROOT / ".." / "shared" / "data")).resolve()
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


SOURCES = {
    "kvasir-seg": "Kvasir-SEG (Jha et al., MMM 2020), https://datasets.simula.no/kvasir-seg/",
    "lits-tiny": "LiTS17 (Bilic et al. 2023), https://competitions.codalab.org/competitions/17094",
    "lits-117": "LiTS17 (Bilic et al. 2023), https://competitions.codalab.org/competitions/17094",
    "chaos-ct": "CHAOS (Kavur et al. 2021), https://chaos.grand-challenge.org/",
}


def shared_path(*parts: str) -> Path:
    """A path in ../shared/data (or $HPC_SEG_SHARED_DATA); a missing data set fails (never skips)."""
    p = SHARED.joinpath(*parts)
    origin = SOURCES.get(parts[0], "see ../shared/data/README.md")
    assert p.exists(), (f"shared data {p} is missing: the shared_data suite needs ../shared/data next to the "
                        f"checkout (or HPC_SEG_SHARED_DATA); this data set comes from {origin}. "
                        f"'make test' runs without it")
    return p


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    from hpc_seg.ingest.phantom import write_lits_phantom

    d = tmp_path_factory.mktemp("phantom-nifti")
    write_lits_phantom(d, cases=6, shape=(64, 64, 16), seed=3)
    return d


@pytest.fixture(scope="session")
def phantom_store(phantom_dir, tmp_path_factory) -> Path:
    from hpc_seg.ingest.prepare import prepare

    out = tmp_path_factory.mktemp("stores") / "phantom.zarr"
    done = prepare("lits", phantom_dir, out, workers=1, show_progress=False)
    assert done.report.ok and len(done.report.converted) == 6 and done.plan is not None
    return out


@pytest.fixture(scope="session")
def store(phantom_store):
    """The phantom store, under the name the training-run tests use."""
    return phantom_store


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


@pytest.fixture(scope="session")
def synthetic_rgb(tmp_path_factory) -> Path:
    """Eight generated RGB images with elliptic 'polyps', in the Kvasir-SEG layout (JPEG masks)."""
    import numpy as np
    from PIL import Image

    d = tmp_path_factory.mktemp("rgb-kvasir-layout")
    (d / "images").mkdir()
    (d / "masks").mkdir()
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[:96, :128]
    for i in range(8):
        cy, cx, ry, rx = rng.integers(30, 66), rng.integers(30, 98), rng.integers(10, 25), rng.integers(10, 25)
        mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        img = rng.normal(120, 20, (96, 128, 3)).clip(0, 255)
        img[mask] = img[mask] * 0.5 + np.array([200, 80, 90]) * 0.5
        Image.fromarray(img.astype(np.uint8)).save(d / "images" / f"img{i:02d}.jpg", quality=95)
        Image.fromarray((mask * 255).astype(np.uint8)).save(d / "masks" / f"img{i:02d}.jpg", quality=95)
    return d



@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (moto's, from PyPI) on 127.0.0.1 with bucket ``hpc-seg``; the
    standard AWS environment variables point at it (inherited by the subprocesses tests start)."""
    from bench.local_s3 import local_s3

    with local_s3(tmp_path_factory.mktemp("s3") / "server.log") as server:
        yield server


def case_arrays(store, case_id: str):
    """A whole stored case as numpy: image (C, Z, Y, X), label (Z, Y, X)."""
    from hpc_seg.storage.store import open_case_arrays

    image, label = open_case_arrays(store, case_id)
    return image[...], label[...]

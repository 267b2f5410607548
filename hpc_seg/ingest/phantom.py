"""Synthetic abdominal CT phantom written in the real LiTS17 layout.

Each case is ``volume-N.nii.gz`` (int16 HU) + ``segmentation-N.nii.gz`` (uint8: 0 background,
1 liver, 2 tumour). The anatomy is crude but has the properties a liver-tumour pipeline must
cope with: air outside the body (and -1024 outside the scan's field of view), subcutaneous fat,
muscle/soft tissue, a lobulated liver (~60 HU) spanning only part of the slices, a spleen
(liver-like decoy, ~48 HU), contrast-filled aorta/IVC/portal vessels, spine and ribs (bone),
hypo- or hyperdense tumours inside the liver (some cases have none), Gaussian noise, anisotropic
voxel spacing and a randomly flipped/transposed orientation per case.

Usage::

    hpc-seg phantom OUT_DIR --cases 6 --shape 128 128 32
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

HU = {"air": -1000, "fat": -100, "soft": 40, "muscle": 50, "liver": 60, "spleen": 48,
      "vessel": 170, "bone": 700, "kidney": 150}


@dataclass
class PhantomCase:
    volume: np.ndarray  # (X, Y, Z) int16 HU, RAS voxel order before reorientation
    label: np.ndarray  # (X, Y, Z) uint8
    affine: np.ndarray  # 4x4 affine of the *stored* (reoriented) arrays
    n_tumours: int


def _ellipsoid(x, y, z, c, r):
    return ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2


def _liver_mask(x, y, z, rng, z_mid):
    """A lobulated liver: a main ellipsoid plus a left lobe, perturbed by smooth bumps."""
    c = (60.0 + rng.uniform(-8, 8), 10.0 + rng.uniform(-8, 8), z_mid)
    r = (rng.uniform(60, 75), rng.uniform(55, 70), rng.uniform(55, 75))
    field = _ellipsoid(x, y, z, c, r)
    lobe = _ellipsoid(x, y, z, (c[0] - 65, c[1] + 20, c[2] + 15), (40, 30, 35))
    field = np.minimum(field, lobe)
    for _ in range(4):  # low-frequency surface perturbation
        bc = (c[0] + rng.uniform(-50, 50), c[1] + rng.uniform(-40, 40), c[2] + rng.uniform(-40, 40))
        field = field - 0.25 * np.exp(-_ellipsoid(x, y, z, bc, (25, 25, 25)))
    return field < 1.0


def _bone(x, y, z, rng):
    spine = (((x / 18.0) ** 2 + ((y + 75) / 16.0) ** 2) < 1.0)
    ring = np.sqrt((x / 150.0) ** 2 + ((y + 5) / 105.0) ** 2)
    ribs = (np.abs(ring - 0.93) < 0.035) & (np.cos(z / 9.0) > 0.2) & (y > -70)
    return spine | ribs


def generate_case(shape=(128, 128, 32), seed=0, tumours: int | None = None,
                  noise_hu: float | None = None) -> PhantomCase:
    """Generate one phantom case of ``shape`` voxels (X, Y, Z) with a random orientation."""
    rng = np.random.default_rng(seed)  # one stream, drawn in a fixed order: a seed is one case
    grid = _grid(shape, rng)
    x, y, z = grid["xyz"]
    vol, liver = _anatomy(grid, rng)
    label = np.zeros(shape, np.uint8)
    label[liver] = 1
    placed = _add_tumours(vol, label, liver, grid, rng, tumours)
    vol = _scanner(vol, x, y, grid["fov"], rng, noise_hu)
    (sx, sy, sz), (xs, ys, zs) = grid["spacing"], grid["axes"]
    affine = np.diag([sx, sy, sz, 1.0])
    affine[:3, 3] = [xs[0], ys[0], zs[0]]
    vol, label, affine = _random_orientation(vol, label, affine, rng)
    return PhantomCase(vol, label, affine, placed)


def _grid(shape, rng) -> dict:
    """World coordinates (mm) of every voxel: a random field of view and slab thickness."""
    nx, ny, nz = shape
    fov = rng.uniform(340, 420)  # mm in-plane field of view
    sx = sy = fov / nx
    z_extent = rng.uniform(180, 260)
    sz = z_extent / nz  # anisotropic: slices thicker than in-plane pixels (usually)
    axes = [(np.arange(n) - n / 2 + 0.5) * s for n, s in ((nx, sx), (ny, sy), (nz, sz))]
    xyz = np.meshgrid(*(a.astype(np.float32) for a in axes), indexing="ij")
    return {"shape": shape, "fov": fov, "z_extent": z_extent, "spacing": (sx, sy, sz), "axes": axes, "xyz": xyz}


def _anatomy(grid: dict, rng) -> tuple[np.ndarray, np.ndarray]:
    """HU volume of body, organs, vessels and bone, and the liver mask."""
    x, y, z = grid["xyz"]
    vol = np.full(grid["shape"], HU["air"], np.float32)
    body = ((x / 160.0) ** 2 + ((y + 5) / 115.0) ** 2) < 1.0
    inner = ((x / 148.0) ** 2 + ((y + 5) / 103.0) ** 2) < 1.0
    vol[body] = HU["fat"]
    vol[inner] = HU["soft"]
    vol[inner & (((x / 70.0) ** 2 + ((y + 80) / 25.0) ** 2) < 1.0)] = HU["muscle"]
    z_mid = float(rng.uniform(-0.15, 0.25) * grid["z_extent"])  # liver covers only part of the slices
    liver = _liver_mask(x, y, z, rng, z_mid) & inner
    spleen = (_ellipsoid(x, y, z, (-95, -20, z_mid + 20), (30, 45, 45)) < 1.0) & inner & ~liver
    kidneys = ((_ellipsoid(np.abs(x), y, z, (55, -55, z_mid - 60), (22, 28, 45)) < 1.0) & inner
               & ~liver & ~spleen)
    vol[liver] = HU["liver"]
    vol[spleen] = HU["spleen"]
    vol[kidneys] = HU["kidney"]
    aorta = (((x + 10) / 11.0) ** 2 + ((y + 45) / 11.0) ** 2) < 1.0
    ivc = (((x - 20) / 10.0) ** 2 + ((y + 40) / 13.0) ** 2) < 1.0
    portal = (((x - 45) / 6.0) ** 2 + ((y - 5) / 6.0) ** 2 + ((z - z_mid) / 40.0) ** 2) < 1.0
    vol[(aorta | ivc) & inner] = HU["vessel"]
    vol[portal & liver] = HU["vessel"] - 20  # enhancing vessels inside the liver stay "liver"
    vol[_bone(x, y, z, rng) & body] = HU["bone"]
    return vol, liver


def _add_tumours(vol, label, liver, grid: dict, rng, tumours: int | None) -> int:
    """Hypo- or hyperdense blobs inside the liver (label 2); returns how many were placed."""
    x, y, z = grid["xyz"]
    xs, ys, zs = grid["axes"]
    n_tumours = int(rng.integers(0, 4)) if tumours is None else int(tumours)
    liver_idx = np.argwhere(liver)
    placed = 0
    for _ in range(n_tumours):
        if len(liver_idx) == 0:
            break
        cx, cy, cz = liver_idx[rng.integers(len(liver_idx))]
        radius = rng.uniform(8, 22)
        blob = (_ellipsoid(x, y, z, (xs[cx], ys[cy], zs[cz]),
                           (radius, radius * rng.uniform(0.7, 1.3), radius)) < 1.0) & liver
        if not blob.any():
            continue
        vol[blob] = rng.choice([rng.uniform(5, 35), rng.uniform(95, 130)])
        label[blob] = 2
        placed += 1
    return placed


def _scanner(vol, x, y, fov: float, rng, noise_hu: float | None) -> np.ndarray:
    """Partial-volume edges, noise, the field-of-view circle (-1024 outside), int16 HU."""
    vol = 0.6 * vol + 0.2 * (np.roll(vol, 1, 0) + np.roll(vol, -1, 0))
    sigma = rng.uniform(8, 14) if noise_hu is None else noise_hu
    vol += rng.normal(0.0, sigma, size=vol.shape).astype(np.float32)
    vol[(x / (fov / 2)) ** 2 + (y / (fov / 2)) ** 2 >= 1.0] = -1024
    return np.clip(np.rint(vol), -1024, 3071).astype(np.int16)


def _random_orientation(vol, label, affine, rng):
    """Flip and/or swap in-plane axes, adjusting the affine so world coordinates are unchanged."""
    if rng.random() < 0.5:  # transpose x/y voxel axes
        vol, label = vol.transpose(1, 0, 2), label.transpose(1, 0, 2)
        affine = affine[:, [1, 0, 2, 3]]
    for ax in range(3):
        if rng.random() < 0.5:
            n = vol.shape[ax]
            vol, label = np.flip(vol, ax), np.flip(label, ax)
            flip = np.eye(4)
            flip[ax, ax] = -1
            flip[ax, 3] = n - 1
            affine = affine @ flip
    return np.ascontiguousarray(vol), np.ascontiguousarray(label), affine


def write_lits_phantom(out_dir: str | Path, cases: int = 6, shape=(128, 128, 32), seed: int = 0,
                       compress: bool = True, start: int = 0) -> list[Path]:
    """Write ``cases`` phantom cases as ``volume-N.nii[.gz]`` / ``segmentation-N.nii[.gz]``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ext = ".nii.gz" if compress else ".nii"
    written = []
    for i in range(start, start + cases):
        tumours = 0 if i % 4 == 3 else None  # every fourth case has no tumour
        case = generate_case(shape, seed=seed * 100_003 + i, tumours=tumours)
        vol_img = nib.Nifti1Image(case.volume, case.affine)
        vol_img.header.set_xyzt_units("mm", "sec")
        seg_img = nib.Nifti1Image(case.label, case.affine)
        seg_img.header.set_xyzt_units("mm", "sec")
        vpath, spath = out / f"volume-{i}{ext}", out / f"segmentation-{i}{ext}"
        for img, path in ((vol_img, vpath), (seg_img, spath)):
            tmp = path.with_name(f".{path.name}.tmp{ext}")
            nib.save(img, tmp)
            tmp.replace(path)
        written.append(vpath)
    return written

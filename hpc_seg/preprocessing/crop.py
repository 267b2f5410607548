"""The crop a cascade's stage 2 sees: the 3D box of an organ mask grown by a fraction of its extent.

One rule for training (the reference organ, edges jittered) and inference (stage 1's organ, no
jitter), so that the preprocessing-plan contract covers the crop: ``plan.crop`` holds the classes
and the margin. The margin is a fraction of the box's extent per axis, not millimetres: it needs no
voxel spacing, which some sources record wrongly (the shared lits-117 copy has none, lits-tiny's
header still says 0.66 mm after a downsampling to 64²), and it scales with the organ.
"""

from __future__ import annotations

import numpy as np

Box = tuple[slice, slice, slice]


def organ_box(mask: np.ndarray) -> tuple[tuple[int, int], ...] | None:
    """((z0, z1), (y0, y1), (x0, x1)), half-open, of a (Z, Y, X) mask; None when it is empty."""
    if not mask.any():
        return None
    out = []
    for axis in range(3):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        out.append((int(hit[0]), int(hit[-1]) + 1))
    return tuple(out)


def crop_box(box, shape, margin: float, jitter: float = 0.0, rng: np.random.Generator | None = None) -> Box:
    """``box`` grown by ``margin`` × its extent on each side of each axis (each edge also moved by up to
    ``jitter`` × the extent when ``rng`` is given), clipped to ``shape``; at least one voxel wide."""
    out = []
    for (lo, hi), n in zip(box, shape):
        extent = hi - lo
        grow_lo = grow_hi = margin * extent
        if rng is not None and jitter > 0:
            grow_lo += jitter * extent * rng.uniform(-1, 1)
            grow_hi += jitter * extent * rng.uniform(-1, 1)
        a = int(np.clip(np.floor(lo - grow_lo), 0, n - 1))
        b = int(np.clip(np.ceil(hi + grow_hi), a + 1, n))
        out.append(slice(a, b))
    return tuple(out)


def class_mask(labels: np.ndarray, classes, around) -> np.ndarray:
    """Voxels of the named classes in a label map over ``classes``."""
    return np.isin(labels, [list(classes).index(c) for c in around])

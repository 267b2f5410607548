"""Which stored slices make one model sample: the one rule for 2D, 2.5D and 3D, shared by the
training loader and whole-volume inference.

2.5D takes ``slices`` adjacent slices centred on ``z``; 3D takes ``patch_depth`` slices from ``z``.
Past either end of a case the edge slice repeats (a context window at the first slice sees the
first slice twice), so every slice of a case has a sample of the same shape.
"""

from __future__ import annotations

import numpy as np


def window(z: int, mode: str, slices: int = 1, patch_depth: int = 0) -> tuple[int, int]:
    """[lo, hi) of the slices a sample at ``z`` covers, before clipping to the case."""
    if mode == "3d":
        return z, z + patch_depth
    half = slices // 2 if mode == "2.5d" else 0
    return z - half, z + half + 1


def edge_indices(lo: int, hi: int, depth: int) -> np.ndarray:
    """Slice indices lo..hi-1 with the edge slice repeated outside [0, depth)."""
    return np.clip(np.arange(lo, hi), 0, depth - 1)


def stack(image: np.ndarray, z: int, slices: int) -> np.ndarray:
    """(C, Z, Y, X) volume → the (C*slices, Y, X) context stack at ``z``, channel-major."""
    sl = image[:, edge_indices(*window(z, "2.5d", slices), image.shape[1])]
    return sl.reshape(-1, *sl.shape[2:])

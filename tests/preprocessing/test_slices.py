"""``hpc_seg.preprocessing.slices.stack``, the 2.5D context stack whole-volume inference feeds the
model, equals the formula ``z - k//2 … z + k//2`` clipped to the case, channel-major, written out here
independently of ``window`` and ``edge_indices``."""

import numpy as np
import pytest

from hpc_seg.preprocessing.slices import edge_indices, stack, window


def reference_stack(image: np.ndarray, z: int, k: int) -> np.ndarray:
    """The k slices centred on z, the edge slice repeated past either end, reshaped channel-major."""
    idx = np.clip(np.arange(z - k // 2, z + k // 2 + 1), 0, image.shape[1] - 1)
    sl = image[:, idx]
    return sl.reshape(-1, *sl.shape[2:])


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_stack_equals_the_inference_formula_at_both_ends_and_the_middle(k, channels):
    depth = 7
    image = np.random.default_rng(k).integers(-1000, 1000, size=(channels, depth, 5, 6)).astype(np.int16)
    for z in (0, 1, depth // 2, depth - 2, depth - 1):
        got, want = stack(image, z, k), reference_stack(image, z, k)
        assert got.shape == (channels * k, 5, 6) and got.dtype == image.dtype
        assert np.array_equal(got, want), (z, k, channels)


def test_stack_repeats_the_edge_slice_channel_major():
    image = np.arange(2 * 4).reshape(2, 4, 1, 1)  # channel c, slice z holds 4c + z
    assert stack(image, 0, 3)[:, 0, 0].tolist() == [0, 0, 1, 4, 4, 5]
    assert stack(image, 3, 5)[:, 0, 0].tolist() == [1, 2, 3, 3, 3, 5, 6, 7, 7, 7]
    assert window(2, "2d", 5) == (2, 3) and window(2, "3d", patch_depth=4) == (2, 6)
    assert edge_indices(-2, 3, 2).tolist() == [0, 0, 0, 1, 1]

"""The fast chunk reader must agree with zarr's own indexing, absent chunks included."""

import numpy as np
import pytest
import zarr

from hpc_seg.data import store as zstore


@pytest.fixture()
def arrays(tmp_path):
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    rng = np.random.default_rng(0)
    img = rng.integers(-1024, 2000, size=(1, 7, 13, 11)).astype(np.int16)
    lab = np.zeros((7, 13, 11), np.uint8)
    lab[2:4, 3:9, 1:5] = 2  # slices 0, 1, 4, 5, 6 are all zero → no chunk files written
    a = g.create_array("image", shape=img.shape, chunks=(1, 1, 13, 11), dtype=img.dtype,
                       compressors=zstore.IMAGE_CODEC)
    a[...] = img
    b = g.create_array("label", shape=lab.shape, chunks=(2, 5, 4), dtype=np.uint8,
                       compressors=zstore.LABEL_CODEC)
    b[...] = lab
    return zarr.open_group(str(tmp_path / "s.zarr"), mode="r"), img, lab


def test_fast_reader_matches_zarr(arrays):
    g, img, lab = arrays
    ri, rl = zstore.ChunkReader(g["image"]), zstore.ChunkReader(g["label"])
    assert ri.fast and rl.fast
    for sel in [(0, 3), (slice(None), slice(1, 4)), (0, slice(5, 7), slice(2, 9)), (0, -1), ()]:
        assert np.array_equal(ri[sel], img[sel]) and np.array_equal(ri[sel], g["image"][sel])
    for sel in [0, 3, (slice(0, 7),), (slice(1, 6), slice(4, 13), 3), (slice(3, 3),)]:
        got = rl[sel]
        assert got.shape == lab[sel].shape and np.array_equal(got, lab[sel])
    assert np.array_equal(rl[::2], lab[::2])  # strided: falls back to zarr
    with pytest.raises(IndexError):
        ri[0, 7]

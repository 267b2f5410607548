"""The fast chunk reader must agree with zarr's own indexing, absent chunks included."""

import numpy as np
import pytest
import zarr

from hpc_seg.storage import store as zstore
from hpc_seg.storage.chunks import ChunkReader


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
    ri, rl = ChunkReader(g["image"]), ChunkReader(g["label"])
    assert ri.fast and rl.fast
    for sel in [(0, 3), (slice(None), slice(1, 4)), (0, slice(5, 7), slice(2, 9)), (0, -1), ()]:
        assert np.array_equal(ri[sel], img[sel]) and np.array_equal(ri[sel], g["image"][sel])
    for sel in [0, 3, (slice(0, 7),), (slice(1, 6), slice(4, 13), 3), (slice(3, 3),)]:
        got = rl[sel]
        assert got.shape == lab[sel].shape and np.array_equal(got, lab[sel])
    assert np.array_equal(rl[::2], lab[::2])  # strided: falls back to zarr
    with pytest.raises(IndexError):
        ri[0, 7]


# ------------------------------------------------------------------ sharded layout (hpc-seg/zarr-v3)
from hpc_seg.ingest.convert import convert  # noqa: E402
from hpc_seg.errors import StoreError  # noqa: E402


@pytest.fixture()
def sharded(phantom_dir, tmp_path):
    store = tmp_path / "s.zarr"
    assert convert("lits", phantom_dir, store, show_progress=False).ok
    return store


def _files(path):
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())


def test_sharded_case_is_five_files_and_plain_zarr_reads_the_same(sharded, phantom_dir):
    import nibabel as nib

    case = sharded / "cases" / "lits_0000"
    assert _files(case) == ["image/c/0/0/0/0", "image/zarr.json", "label/c/0/0/0", "label/zarr.json", "zarr.json"]
    g = zarr.open_group(str(sharded), mode="r")["cases"]["lits_0000"]
    assert g["image"].shards == g["image"].shape and g["image"].chunks[:2] == (1, 1)
    ri, rl = ChunkReader(g["image"]), ChunkReader(g["label"])
    assert ri.fast and ri.sharded and ri.crc
    img, lab = g["image"][...], g["label"][...]
    src = nib.as_closest_canonical(nib.load(phantom_dir / "segmentation-0.nii.gz")).get_fdata()
    assert np.array_equal(lab, src.transpose(2, 1, 0).astype(np.uint8))
    for sel in [(0, 3), (slice(None), slice(1, 4)), (0, slice(5, 7), slice(2, 9)), (0, -1)]:
        assert np.array_equal(ri[sel], img[sel])
    for z in range(lab.shape[0]):  # empty label slices are chunks too
        assert np.array_equal(rl[z], lab[z])
    assert zstore.store_info(sharded)["format"] == "hpc-seg/zarr-v3"


def _shard(store, case="lits_0001", array="label"):
    return store / "cases" / case / array / ("c/0/0/0" if array == "label" else "c/0/0/0/0")


def test_damaged_chunk_is_an_error_naming_case_and_slice(sharded):
    g = zarr.open_group(str(sharded), mode="r")["cases"]["lits_0001"]
    rl = ChunkReader(g["label"])
    handle = rl.files.open("c/0/0/0")
    index = rl._shard_index((0, 0, 0), _shard(sharded), handle, (0, 0, 0))
    rl.files.close(handle)
    offset, nbytes = (int(v) for v in index[5])
    raw = bytearray(_shard(sharded).read_bytes())
    raw[offset + nbytes // 2] ^= 0xFF  # one flipped byte inside slice 5's chunk
    _shard(sharded).write_bytes(bytes(raw))
    fresh = ChunkReader(zarr.open_group(str(sharded), mode="r")["cases"]["lits_0001"]["label"])
    assert np.array_equal(fresh[4], g["label"][4])  # its neighbours still read
    with pytest.raises(StoreError, match=r"case lits_0001, label slice z=5: chunk truncated or failing its crc32c"):
        fresh[5]


def test_missing_shard_or_chunk_is_an_error_not_zeros(sharded):
    _shard(sharded, array="image").unlink()
    img = ChunkReader(zarr.open_group(str(sharded), mode="r")["cases"]["lits_0001"]["image"])
    with pytest.raises(StoreError, match=r"case lits_0001, image slice z=2: shard file .* is missing"):
        img[0, 2]
    path = _shard(sharded)
    raw = bytearray(path.read_bytes())
    n = 16  # slices per phantom case
    start = len(raw) - (16 * n + 4)
    index = np.frombuffer(bytes(raw[start:start + 16 * n]), "<u8").reshape(n, 2).copy()
    index[3] = 2 ** 64 - 1  # as zarr marks a chunk it did not write; index checksum recomputed
    import google_crc32c

    body = index.tobytes()
    raw[start:] = body + google_crc32c.value(body).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    lab = ChunkReader(zarr.open_group(str(sharded), mode="r")["cases"]["lits_0001"]["label"])
    with pytest.raises(StoreError, match="slice z=3: chunk missing from its shard"):
        lab[3]


def test_unsharded_stores_still_read(phantom_dir, tmp_path):
    store = tmp_path / "v2.zarr"
    assert convert("lits", phantom_dir, store, show_progress=False, layout=zstore.UNSHARDED).ok
    assert zstore.store_info(store)["format"] == "hpc-seg/zarr-v2"
    assert len(_files(store / "cases" / "lits_0000")) > 16  # one file per non-empty chunk
    g = zstore.open_store(store)["cases"]["lits_0000"]
    r = ChunkReader(g["label"])
    assert r.fast and not r.sharded
    assert all(np.array_equal(r[z], g["label"][z]) for z in range(g["label"].shape[0]))

"""Streaming dataset and sampler on a real phantom Zarr store."""

import numpy as np
import pytest
import torch

from hpc_seg.config import load_config
from tests.conftest import case_arrays
from hpc_seg.training.dataset import ShardedSampler, ZarrSliceDataset, build_loader


def cfg_for(store, *overrides):
    return load_config(None, [f"data.store={store}", "data.size=[48,48]", "data.num_workers=0",
                              *overrides]).data


CASES = [f"lits_{i:04d}" for i in range(6)]


@pytest.mark.parametrize("mode,shape,lshape", [
    ("2d", (1, 48, 48), (48, 48)), ("2.5d", (5, 48, 48), (48, 48)), ("3d", (1, 8, 48, 48), (8, 48, 48))])
def test_modes_shapes(phantom_store, mode, shape, lshape):
    cfg = cfg_for(phantom_store, f"data.mode={mode}", "data.slices=5", "data.patch_depth=8")
    ds = ZarrSliceDataset(phantom_store, CASES, cfg, train=True, seed=0)
    n_expected = 6 * (16 if mode != "3d" else 2)
    assert len(ds) == n_expected
    for i in (0, len(ds) - 1):
        s = ds[(i, 0)]
        assert tuple(s["image"].shape) == shape and tuple(s["label"].shape) == lshape
        assert s["image"].dtype == torch.float32 and s["label"].dtype == torch.int64


def test_25d_stack_and_window_exact(phantom_store):
    cfg = cfg_for(phantom_store, "data.mode=2.5d", "data.slices=3", "data.size=[64,64]",
                  "data.augment.enabled=false", "data.oversample=0")
    ds = ZarrSliceDataset(phantom_store, ["lits_0001"], cfg, train=False)
    image, label = case_arrays(phantom_store, "lits_0001")
    for z in (0, 7, 15):  # edges replicate the first/last slice
        s = ds[(z, 0)]
        zs = np.clip([z - 1, z, z + 1], 0, 15)
        expected = (np.clip(image[0, zs].astype(np.float32), -100, 400) + 100) / 500
        assert np.allclose(s["image"].numpy(), expected, atol=1e-6)
        assert np.array_equal(s["label"].numpy(), label[z])
        assert 0.0 <= s["image"].min() and s["image"].max() <= 1.0


def test_deterministic_given_seed_epoch(phantom_store):
    cfg = cfg_for(phantom_store)
    a = ZarrSliceDataset(phantom_store, CASES, cfg, train=True, seed=7)
    b = ZarrSliceDataset(phantom_store, CASES, cfg, train=True, seed=7)
    for key in [(3, 0), (3, 1), (40, 2)]:
        assert torch.equal(a[key]["image"], b[key]["image"]) and torch.equal(a[key]["label"], b[key]["label"])
    assert not torch.equal(a[(3, 0)]["image"], a[(3, 1)]["image"])


def test_oversampling_probability(phantom_store):
    cfg = cfg_for(phantom_store, "data.oversample=0.9", "data.augment.enabled=false")
    ds = ZarrSliceDataset(phantom_store, CASES, cfg, train=True, seed=0)
    tumour_slices = {(ci, z) for ci in range(6) for z in ds.fg_slices[ci][0].tolist()}
    hits = sum((ds._pick(i, np.random.default_rng([0, 0, i])) in tumour_slices) for i in range(len(ds)))
    base = sum(((int(c), int(z)) in tumour_slices) for c, z in ds.items)
    assert hits > 2 * base  # oversampling raises tumour slices well above their natural share
    cfg0 = cfg_for(phantom_store, "data.oversample=0")
    ds0 = ZarrSliceDataset(phantom_store, CASES, cfg0, train=True, seed=0)
    assert all(ds0._pick(i, np.random.default_rng(i)) == tuple(ds0.items[i]) for i in range(len(ds0)))


def test_augmentation_keeps_label_aligned(phantom_store):
    cfg = cfg_for(phantom_store, "data.mode=2d", "data.augment.rotate_deg=0", "data.augment.scale=0",
                  "data.augment.intensity=0", "data.oversample=0")
    plain = ZarrSliceDataset(phantom_store, CASES, cfg_for(phantom_store, "data.mode=2d",
                             "data.augment.enabled=false", "data.oversample=0"), train=True)
    aug = ZarrSliceDataset(phantom_store, CASES, cfg, train=True)
    flipped = 0
    for i in range(0, len(aug), 7):
        a, p = aug[(i, 0)], plain[(i, 0)]
        candidates = [(p["image"][0].flip(d), p["label"].flip(d)) for d in [(), (-1,), (-2,), (-1, -2)]]
        assert any(torch.equal(a["image"][0], ci) and torch.equal(a["label"], cl) for ci, cl in candidates)
        flipped += not torch.equal(a["label"], p["label"])
    assert flipped > 0


def test_sampler_each_sample_once_per_world():
    n, world = 103, 4
    shards = [list(ShardedSampler(n, r, world, seed=1, even=False)) for r in range(world)]
    seen = [i for s in shards for i, _ in s]
    assert sorted(seen) == list(range(n))
    even = [list(ShardedSampler(n, r, world, seed=1, even=True)) for r in range(world)]
    assert len({len(s) for s in even}) == 1 and set(i for s in even for i, _ in s) == set(range(n))
    s = ShardedSampler(n, 1, world, seed=1)
    s.set_epoch(3)
    full = list(s)
    s.skip(5)
    assert list(s) == full[5:] and all(e == 3 for _, e in full)


def test_loader_workers_and_ranks_cover_all_once(phantom_store):
    cfg = cfg_for(phantom_store, "data.mode=2d", "data.augment.enabled=false", "data.oversample=0")
    seen = []
    for rank in range(2):
        loader, sampler = build_loader(cfg, CASES, train=False, rank=rank, world=2, batch_size=5,
                                       num_workers=2)
        for batch in loader:  # forked workers open the Zarr arrays lazily
            seen += list(zip(batch["case"].tolist(), batch["z"].tolist()))
    assert len(seen) == 96 and len(set(seen)) == 96


def test_kvasir_rgb(synthetic_rgb, tmp_path):
    from hpc_seg.ingest.prepare import prepare

    out = tmp_path / "kv.zarr"
    prepare("kvasir", synthetic_rgb, out, show_progress=False)
    cfg = load_config(None, [f"data.store={out}", "data.dataset=kvasir", "data.mode=2d",
                             "data.size=[64,64]"]).data
    from hpc_seg.ingest.index import read_index

    ds = ZarrSliceDataset(out, sorted(read_index(out)["cases"]), cfg, train=True)
    assert ds.plan.in_channels == 3 and ds.plan.num_classes == 2 and ds.plan.normalize == "rgb"
    s = ds[(0, 0)]
    assert s["image"].shape == (3, 64, 64) and set(s["label"].unique().tolist()) <= {0, 1}

"""Streaming dataset and sampler on a real phantom Zarr store."""

import numpy as np
import pytest
import torch

from hpc_seg.config import load_config
from tests.conftest import case_arrays
from hpc_seg.training.dataset import (ShardedSampler, ZarrPatchDataset, ZarrSliceDataset, build_loader,
                                      make_dataset)


def cfg_for(store, *overrides):
    return load_config(None, [f"data.store={store}", "data.size=[48,48]", "data.num_workers=0",
                              *overrides]).data


CASES = [f"lits_{i:04d}" for i in range(6)]


@pytest.mark.parametrize("mode,shape,lshape", [
    ("2d", (1, 48, 48), (48, 48)), ("2.5d", (5, 48, 48), (48, 48)), ("3d", (1, 8, 48, 48), (8, 48, 48))])
def test_modes_shapes(phantom_store, mode, shape, lshape):
    cfg = cfg_for(phantom_store, f"data.mode={mode}", "data.slices=5", "data.patch_depth=8")
    ds = make_dataset(phantom_store, CASES, cfg, train=True, seed=0)
    assert type(ds) is (ZarrPatchDataset if mode == "3d" else ZarrSliceDataset)
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
    cfg = load_config(None, [f"data.store={out}", "data.kind=kvasir", "data.mode=2d",
                             "data.size=[64,64]"]).data
    from hpc_seg.ingest.index import read_index

    ds = ZarrSliceDataset(out, sorted(read_index(out)["cases"]), cfg, train=True)
    assert ds.plan.in_channels == 3 and ds.plan.num_classes == 2 and ds.plan.normalize == "rgb"
    s = ds[(0, 0)]
    assert s["image"].shape == (3, 64, 64) and set(s["label"].unique().tolist()) <= {0, 1}


def test_3d_patch_exact_past_the_last_slice(phantom_store):
    """A patch that runs past the case repeats the last image slice, with background labels."""
    cfg = cfg_for(phantom_store, "data.mode=3d", "data.patch_depth=6", "data.augment.enabled=false",
                  "data.oversample=0")
    ds = make_dataset(phantom_store, ["lits_0002"], cfg, train=False)
    image, label = case_arrays(phantom_store, "lits_0002")
    assert [int(z) for _, z in ds.items] == [0, 6, 12]
    img, lab = ds.read(0, 12)
    zs = [12, 13, 14, 15, 15, 15]
    assert img.dtype == image.dtype and np.array_equal(img, image[:, zs])
    assert lab.dtype == np.uint8 and np.array_equal(lab[:4], label[12:16]) and not lab[4:].any()


def test_each_mode_has_its_dataset(phantom_store):
    with pytest.raises(ValueError, match="ZarrSliceDataset cuts 2d/2.5d samples, not data.mode '3d'"):
        ZarrSliceDataset(phantom_store, CASES, cfg_for(phantom_store, "data.mode=3d"), train=False)
    with pytest.raises(ValueError, match="make_dataset picks"):
        ZarrPatchDataset(phantom_store, CASES, cfg_for(phantom_store, "data.mode=2d"), train=False)
    loader, _ = build_loader(cfg_for(phantom_store, "data.mode=3d", "data.patch_depth=8"), CASES, train=False,
                             num_workers=0)
    assert type(loader.dataset) is ZarrPatchDataset and len(loader.dataset) == 12


def test_dataset_takes_an_open_store_and_pickles_without_its_arrays(phantom_store):
    import pickle

    from hpc_seg.ingest.catalog import Store

    store = Store.open(phantom_store)
    cfg = cfg_for(phantom_store, "data.augment.enabled=false")
    ds = make_dataset(store, CASES, cfg, train=True, seed=2)
    assert ds.store is store
    first = ds[(5, 0)]
    copy = pickle.loads(pickle.dumps(ds))  # what a spawned worker gets
    assert copy._arrays == {} and copy.store.path == store.path and vars(copy.store)["_root"] is None
    again = copy[(5, 0)]
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["label"], again["label"])


def test_oversample_class_is_a_class_name(phantom_store):
    from hpc_seg.ingest.index import from_runs, read_index

    index = read_index(phantom_store)
    by_name = ZarrSliceDataset(phantom_store, CASES, cfg_for(phantom_store), train=True)  # default: tumour
    assert by_name.cfg.oversample_class == "tumour"
    for ci, cid in enumerate(CASES):
        runs = index["cases"][cid]["stats"]["slices_with_class"]
        assert np.array_equal(by_name.fg_slices[ci][0], from_runs(runs.get("2", [])))
    liver = ZarrSliceDataset(phantom_store, CASES, cfg_for(phantom_store, "data.oversample_class=liver"), train=True)
    assert all(np.array_equal(liver.fg_slices[ci][0], from_runs(index["cases"][cid]["stats"]["slices_with_class"]["1"]))
               for ci, cid in enumerate(CASES))
    absent = ZarrSliceDataset(phantom_store, CASES, cfg_for(phantom_store, "data.oversample_class=polyp"), train=True)
    assert all(len(t) == 0 and len(a) for t, a in absent.fg_slices)  # any foreground slice instead
    with pytest.warns(FutureWarning, match="write the class name instead: data.oversample_class: tumour"):
        by_index = ZarrSliceDataset(phantom_store, CASES, cfg_for(phantom_store, "data.oversample_class=2"),
                                    train=True)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(by_index.fg_slices, by_name.fg_slices))
    assert all(torch.equal(by_index[(i, 0)]["image"], by_name[(i, 0)]["image"]) for i in range(0, 96, 9))
    with pytest.warns(FutureWarning, match=r"one of \['liver', 'tumour'\] \(index 7 is no class"):
        out_of_range = ZarrSliceDataset(phantom_store, CASES, cfg_for(phantom_store, "data.oversample_class=7"),
                                        train=True)
    assert all(len(t) == 0 for t, _ in out_of_range.fg_slices)

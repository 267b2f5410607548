"""Stage 2's samples (ZarrCropDataset): the slices of the reference organ's box, cut exactly as
inference cuts the box out of the case (2.5D context repeated at the box's ends), jitter that moves
the edges but keeps the item's slice, image and label cut alike."""

import numpy as np
import pytest

from hpc_seg.config import load_config
from hpc_seg.errors import StoreError
from hpc_seg.ingest.catalog import Store
from hpc_seg.preprocessing.crop import class_mask, crop_box, organ_box
from hpc_seg.preprocessing.slices import stack
from hpc_seg.training.dataset import ZarrCropDataset, make_dataset


def _setup(store_path, margin=0.2):
    cfg = load_config(None, [f"data.store={store_path}", "data.size=[32,32]", "data.mode=2.5d",
                             "data.crop_around=[liver,tumour]", f"data.crop_margin={margin}", "data.crop_jitter=0.1"])
    store = Store.open(cfg.data.store)
    return cfg, store, store.plan(0).resolve(cfg.data)


def test_validation_samples_are_the_inference_crop(phantom_store):
    cfg, store, plan = _setup(phantom_store)
    cases = store.split(0)["train"][:2]
    ds = make_dataset(store, cases, cfg.data, train=False, plan=plan)
    assert isinstance(ds, ZarrCropDataset) and plan.crop == {"around": ["liver", "tumour"], "margin": 0.2}
    for ci, cid in enumerate(cases):
        image, label = (a[...] for a in store.case(cid))
        cut = crop_box(organ_box(class_mask(label, store.index["classes"], ["liver", "tumour"])), label.shape, 0.2)
        zs = sorted(int(z) for c, z in ds.items if c == ci)
        assert zs == list(range(cut[0].start, cut[0].stop))  # the box's slices, margin included
        sub = image[(slice(None), *cut)]
        for z in (zs[0], zs[len(zs) // 2], zs[-1]):  # the ends repeat the box's edge slice, as inference does
            raw, lab = ds.read(ci, z)
            assert np.array_equal(raw, stack(sub, z - cut[0].start, 3)) and np.array_equal(lab, label[z][cut[1:]])


def test_training_jitter_moves_the_box_and_keeps_the_slice(phantom_store):
    cfg, store, plan = _setup(phantom_store)
    cases = store.split(0)["train"][:1]
    ds = make_dataset(store, cases, cfg.data, train=True, plan=plan)
    z = int(ds.items[0][1])  # the box's first slice: a jittered box may start after it
    shapes = set()
    for seed in range(30):
        raw, lab = ds.read(0, z, np.random.default_rng(seed))
        assert raw.shape[1:] == lab.shape and raw.shape[0] == 3
        shapes.add(lab.shape)
    assert len(shapes) > 5
    item = ds[(0, 0)]
    assert tuple(item["image"].shape) == (3, 32, 32) and tuple(item["label"].shape) == (32, 32)


def test_cases_without_the_organ(phantom_store):
    cfg, store, plan = _setup(phantom_store)
    cfg.data.crop_around = ["tumour"]
    plan = store.plan(0).resolve(cfg.data)
    untouched = [c for c in store.case_ids if not store.index["cases"][c]["stats"]["slices_with_class"].get("2")]
    assert untouched, "the phantom set has tumour-free cases"
    with pytest.raises(StoreError, match="nothing to crop around"):
        make_dataset(store, untouched, cfg.data, train=True, plan=plan)
    assert len(make_dataset(store, untouched, cfg.data, train=False, plan=plan)) == 0  # validation: pads instead

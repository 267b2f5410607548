"""Partially labelled data: label maps, sources of another kind joining a store, the loss and the
metrics on cases that annotate only some classes (hpc_seg.preprocessing.labels)."""

import shutil

import numpy as np
import pytest
import torch

from hpc_seg.ingest.convert import convert
from hpc_seg.ingest.index import read_index
from hpc_seg.preprocessing.labels import label_map, store_label_lut
from hpc_seg.errors import PlanError
from hpc_seg.preprocessing.plan import read_plan
from hpc_seg.storage.store import open_store, store_info
from hpc_seg.errors import StoreError
from hpc_seg.losses import DiceCELoss
from hpc_seg.metrics import SegmentationMetrics
from tests.conftest import FIXTURES

LITS = ["background", "liver", "tumour"]
MERGE = {"tumour": "liver"}


def test_label_map_follows_merge_to_an_annotated_class():
    assert label_map(LITS, MERGE, None) == [0, 1, 2]
    assert label_map(LITS, MERGE, LITS) == [0, 1, 2]
    assert label_map(LITS, MERGE, ["background", "liver"]) == [0, 1, 1]
    assert label_map(LITS, {}, ["background", "liver"]) == [0, 1, 0]  # nothing to lie in: background
    assert label_map(LITS, MERGE, ["background", "tumour"]) == [0, 0, 2]


@pytest.fixture(scope="module")
def mixed_store(phantom_dir, tmp_path_factory):
    """A LiTS-kind store (phantom cases) joined by a TotalSegmentator CT (liver only)."""
    store = tmp_path_factory.mktemp("mixed") / "mixed.zarr"
    assert convert("lits", phantom_dir, store, show_progress=False).ok
    src = tmp_path_factory.mktemp("ts") / "s0001"
    shutil.copytree(FIXTURES / "totalseg-ct", src)
    assert convert("totalseg", src.parent, store, show_progress=False).ok
    return store


def test_source_of_another_kind_joins_with_its_classes_recorded(mixed_store):
    index = read_index(mixed_store)
    assert index["cases"]["totalseg_s0001"]["annotated"] == ["background", "liver"]
    assert all("annotated" not in e for c, e in index["cases"].items() if c.startswith("lits_"))
    info = store_info(mixed_store)
    assert info["classes"] == LITS and info["kinds"] == ["lits", "totalseg"] and info["merge"] == MERGE
    label = open_store(mixed_store)["cases"]["totalseg_s0001"]["label"][...]
    assert set(np.unique(label)) == {0, 1}


def test_sources_that_do_not_fit_are_refused(mixed_store, synthetic_rgb, phantom_dir, tmp_path):
    with pytest.raises(StoreError, match="kvasir.*may join it only"):
        convert("kvasir", synthetic_rgb, mixed_store, show_progress=False)
    two = tmp_path / "liver.zarr"
    convert("totalseg", FIXTURES / "totalseg-ct", two, show_progress=False)
    with pytest.raises(StoreError, match="subset"):
        convert("lits", phantom_dir, two, show_progress=False)  # three classes cannot join a two-class store


def test_loss_on_liver_only_case_does_not_teach_no_tumour():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    target = torch.randint(0, 2, (2, 8, 8))
    swapped = logits.detach()[:, [0, 2, 1]]  # liver and tumour logits exchanged
    partial = torch.tensor([[0, 1, 1], [0, 1, 1]])
    loss = DiceCELoss(0.3, 0.7)
    # liver-only: tumour and liver both count as liver, so exchanging them changes nothing
    assert torch.allclose(loss(logits, target, partial), loss(swapped, target, partial))
    assert not torch.allclose(loss(logits, target), loss(swapped, target))
    # fully annotated maps take the plain path (identical numbers)
    full = torch.tensor([[0, 1, 2], [0, 1, 2]])
    assert torch.equal(loss(logits, target, full), loss(logits, target))
    loss(logits, target, partial).backward()
    assert torch.isfinite(logits.grad).all()


def test_metrics_merge_predictions_and_skip_unannotated_classes():
    m = SegmentationMetrics(3, LITS)
    target = torch.tensor([[[0, 1, 1, 1]]])  # a liver-only case: its tumour voxels are labelled liver
    pred = torch.tensor([[[0, 1, 2, 2]]])
    m.add_labels(pred, target, case_ids=["chaos"], label_maps=torch.tensor([[0, 1, 1]]))
    res = m.compute()
    row = res["per_case"][0]["per_class"]
    assert row["liver"]["dice"] == 1.0 and row["tumour"]["dice"] is None
    assert res["per_class"]["tumour"]["support"] == 0 and res["per_class"]["liver"]["iou"] == 1.0


def test_store_lut_matches_classes_by_name(mixed_store, tmp_path):
    plan = read_plan_or_split(mixed_store)
    two = tmp_path / "ts.zarr"
    convert("totalseg", FIXTURES / "totalseg-ct", two, show_progress=False)
    assert store_label_lut(plan, store_info(two), two).tolist() == [0, 1]
    nomerge = type(plan)(**{**plan.to_dict(), "merge": {}, "classes": tuple(LITS)})
    with pytest.raises(PlanError, match=r"\['tumour'\] have no counterpart"):
        store_label_lut(nomerge, store_info(two), two)


def read_plan_or_split(store):
    from hpc_seg.ingest.split import write_split

    write_split(store, 0.2, 0.2, 0)
    return read_plan(store, 0)

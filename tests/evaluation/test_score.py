"""score_labels: other systems' labels scored with evaluate's own code (bench/peers.py's scorer)."""

import numpy as np
import pytest

from hpc_seg.errors import HpcSegError
from hpc_seg.evaluation.score import score_labels
from hpc_seg.ingest.catalog import Store
from hpc_seg.preprocessing.plan import read_plan


def _reference(store: Store):
    return lambda cid: store.root["cases"][cid]["label"][...]


def test_reference_scores_one_and_background_scores_zero(phantom_store):
    store = Store.open(phantom_store)
    plan = read_plan(store, 0)
    cases = store.case_ids[:3]
    perfect = score_labels(store, plan, cases, _reference(store))
    assert perfect["cases"] == 3 and [r["case"] for r in perfect["per_case"]] == cases
    for name in ("liver", "tumour"):
        assert perfect["per_class"][name]["dice"] == pytest.approx(1.0)
        assert perfect["per_class"][name]["iou"] == pytest.approx(1.0)
    assert perfect["lesions"]["recall"] == pytest.approx(1.0) and perfect["lesions"]["false_positives"] == 0
    empty = score_labels(store, plan, cases, lambda cid: np.zeros_like(_reference(store)(cid)))
    assert empty["per_class"]["liver"]["dice"] == 0.0 and empty["per_class"]["liver"]["recall"] == 0.0


def test_half_the_liver_scores_what_the_counts_say(phantom_store):
    store = Store.open(phantom_store)
    plan = read_plan(store, 0)
    cid = store.case_ids[0]
    ref = _reference(store)(cid)
    pred = np.where(ref == 2, 1, ref).astype(np.uint8)  # tumour called liver
    res = score_labels(store, plan, [cid], lambda _: pred)
    liver = (ref == 1).sum()
    tumour = (ref == 2).sum()
    assert res["per_class"]["liver"]["dice"] == pytest.approx(2 * liver / (2 * liver + tumour))
    assert res["per_class"]["tumour"]["dice"] == 0.0
    assert res["per_case"][0]["per_class"]["liver+tumour"]["dice"] == pytest.approx(1.0)


def test_a_prediction_off_the_grid_is_refused_by_case(phantom_store):
    store = Store.open(phantom_store)
    plan = read_plan(store, 0)
    cid = store.case_ids[0]
    with pytest.raises(HpcSegError, match=f"case {cid}.*grid"):
        score_labels(store, plan, [cid], lambda _: np.zeros((1, 2, 3), np.uint8))

"""Lesion detection against hand-made volumes: any-overlap and one-to-one IoU ≥ 0.5 matching,
false positives, per-lesion Dice, size bins, and pooling over cases (docs/evaluation.md states the rules)."""

import numpy as np
import pytest

from hpc_seg.metrics.lesions import case_lesions, sum_lesions


def _case():
    """1 mm voxels (1 ml = 1000 voxels). Reference lesions A (12.5 ml), B (0.512 ml), C (1.728 ml,
    missed), D (2.1 ml, found as two predicted pieces); one predicted lesion overlaps nothing."""
    ref, pred = np.zeros((60, 400, 400), bool), np.zeros((60, 400, 400), bool)  # 400 mm across: a CT's view
    ref[0:20, 0:25, 0:25] = pred[0:20, 0:25, 0:25] = True  # A, predicted exactly
    ref[30:38, 0:8, 0:8] = True  # B
    pred[30:33, 0:8, 0:8] = True  # a third of B: detected, IoU 0.375
    ref[30:42, 40:52, 40:52] = True  # C, no prediction
    ref[45:55, 40:50, 0:21] = True  # D
    pred[45:55, 40:50, 0:11] = True  # 11 of D's 21 columns: IoU 0.524 → matched
    pred[45:55, 40:50, 12:21] = True  # 9 more, one column apart: a second piece, overlapping D
    pred[0:5, 70:75, 70:75] = True  # a false positive
    return pred, ref


def test_matching_rules_on_hand_made_lesions():
    pred, ref = _case()
    r = case_lesions(pred, ref, (1.0, 1.0, 1.0))
    assert (r["reference"], r["predicted"]) == (4, 5)
    assert r["detected"] == 3 and r["detected_iou50"] == 2 and r["false_positives"] == 1
    assert r["recall"] == pytest.approx(0.75) and r["precision"] == pytest.approx(4 / 5)
    assert r["f1"] == pytest.approx(2 * 0.75 * 0.8 / 1.55)
    assert r["recall_iou50"] == pytest.approx(0.5) and r["precision_iou50"] == pytest.approx(2 / 5)
    dice = {round(le["ml"], 3): le["dice"] for le in r["reference_lesions"]}
    assert dice[12.5] == pytest.approx(1.0) and dice[0.512] == pytest.approx(2 * 192 / (512 + 192))
    assert dice[1.728] is None and dice[2.1] == pytest.approx(2 * 2000 / (2100 + 2000))
    assert r["by_size"] == {"<1ml": {"reference": 1, "detected": 1, "recall": 1.0},
                            "1-10ml": {"reference": 2, "detected": 1, "recall": 0.5},
                            ">10ml": {"reference": 1, "detected": 1, "recall": 1.0}}


def test_spacing_sets_the_size_bins():
    pred, ref = _case()
    r = case_lesions(pred, ref, (0.5, 0.5, 0.5))  # an eighth of the volume: B, C, D under 1 ml, A 1.56 ml
    assert [r["by_size"][k]["reference"] for k in ("<1ml", "1-10ml", ">10ml")] == [3, 1, 0]


def test_pooled_over_cases_from_the_sums():
    pred, ref = _case()
    a = case_lesions(pred, ref, (1.0, 1.0, 1.0))
    only_fp = np.zeros((10, 10, 10), bool)
    only_fp[2:4, 2:4, 2:4] = True
    b = case_lesions(only_fp, np.zeros_like(only_fp), (1.0, 1.0, 1.0))
    assert b["recall"] is None and b["precision"] == 0.0 and b["false_positives"] == 1
    s = sum_lesions([a, b])
    assert (s["reference"], s["predicted"], s["detected"], s["false_positives"]) == (4, 6, 3, 2)
    assert s["recall"] == pytest.approx(0.75) and s["precision"] == pytest.approx(4 / 6) and s["cases"] == 2
    assert s["lesion_dice_mean"] == pytest.approx(np.mean([1.0, 2 * 192 / 704, 4000 / 4100]))
    none = case_lesions(np.zeros((4, 4, 4), bool), np.zeros((4, 4, 4), bool), (1, 1, 1))
    assert none["recall"] is None and none["precision"] is None and none["f1"] is None


def test_no_sizes_where_the_spacing_cannot_be_a_cts():
    """A stale header (lits-tiny: 64 pixels at 0.66 mm = a 42 mm view) gives detection but no size bins."""
    pred, ref = _case()
    stale = case_lesions(pred[:, :64, :64], ref[:, :64, :64], (5.0, 0.66, 0.66))
    assert stale["by_size"] is None and stale["reference"] >= 1 and all(le["ml"] is None for le in stale["reference_lesions"])
    good = case_lesions(pred, ref, (1.0, 1.0, 1.0))
    s = sum_lesions([good, stale])
    assert s["cases_without_sizes"] == 1 and s["by_size"]["1-10ml"]["reference"] == 2  # the sized case's bins only

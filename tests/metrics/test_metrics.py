"""Metrics against scikit-learn (independent implementation) and hand-made cases."""

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.metrics import average_precision_score, confusion_matrix, f1_score, jaccard_score, \
    precision_recall_curve, precision_score, recall_score

from hpc_seg.metrics import SegmentationMetrics, plot_pr_curve

NAMES = ["background", "liver", "tumour"]


def random_batch(seed, n=4, hw=(16, 16)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 3, *hw, generator=g)
    target = torch.randint(0, 3, (n, *hw), generator=g)
    return logits, target


def test_against_sklearn_over_many_batches():
    m = SegmentationMetrics(3, NAMES)
    preds, targets = [], []
    for seed in range(5):
        logits, target = random_batch(seed)
        m.add_probs(logits.softmax(1), target)
        preds.append(logits.argmax(1).flatten())
        targets.append(target.flatten())
    y_pred, y_true = torch.cat(preds).numpy(), torch.cat(targets).numpy()
    r = m.compute()
    assert np.array_equal(m.confusion.numpy(), confusion_matrix(y_true, y_pred, labels=[0, 1, 2]))
    iou = jaccard_score(y_true, y_pred, average=None)
    dice = f1_score(y_true, y_pred, average=None)
    prec = precision_score(y_true, y_pred, average=None)
    rec = recall_score(y_true, y_pred, average=None)
    for i, n in enumerate(NAMES):
        pc = r["per_class"][n]
        assert pc["iou"] == pytest.approx(iou[i]) and pc["dice"] == pytest.approx(dice[i])
        assert pc["precision"] == pytest.approx(prec[i]) and pc["recall"] == pytest.approx(rec[i])
    assert r["mean_iou"] == pytest.approx(iou.mean())
    assert r["mean_iou_foreground"] == pytest.approx(iou[1:].mean())


def test_absent_class_is_none_not_nan():
    m = SegmentationMetrics(3, NAMES)
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, :2] = 1
    m.add_labels(target.clone(), target, case_ids=["c0"])  # perfect, tumour absent everywhere
    r = m.compute()
    assert r["per_class"]["tumour"]["iou"] is None and r["classes_undefined"] == ["tumour"]
    assert r["mean_iou"] == 1.0 and r["mean_iou_foreground"] == 1.0
    assert r["dice_per_case"]["tumour"] is None and r["cases_without_class"]["tumour"] == 1
    import json

    assert "NaN" not in json.dumps(r)


def test_per_case_and_global_dice_lits_style():
    m = SegmentationMetrics(3, NAMES, pr_class=None)
    # case A: 2 slices in different batches, tumour perfectly found (4 px); case B: tumour 4 px, none found
    ta = torch.zeros(2, 4, 4, dtype=torch.long)
    ta[:, 0, :2] = 2
    tb = torch.zeros(1, 4, 4, dtype=torch.long)
    tb[0, 3, :] = 2
    m.add_labels(ta[:1].clone(), ta[:1], case_ids=["A"])
    m.add_labels(torch.cat([ta[1:], torch.zeros_like(tb)]), torch.cat([ta[1:], tb]), case_ids=["A", "B"])
    r = m.compute()
    cases = {c["case"]: c["per_class"]["tumour"]["dice"] for c in r["per_case"]}
    assert cases == {"A": 1.0, "B": 0.0}
    assert r["dice_per_case"]["tumour"] == pytest.approx(0.5)
    assert r["global_dice"]["tumour"] == pytest.approx(2 * 4 / (2 * 4 + 0 + 4))  # tp 4, fn 4


def test_pr_curve_matches_sklearn(tmp_path):
    bins = 100
    rng = np.random.default_rng(0)
    m = SegmentationMetrics(2, ["background", "polyp"], pr_bins=bins)
    probs_all, y_all = [], []
    for _ in range(3):
        k = rng.integers(0, bins, size=(2, 8, 8))
        p1 = (k + 0.5) / bins  # probabilities inside distinct bins
        y = (rng.random((2, 8, 8)) < p1).astype(np.int64)
        logits = torch.from_numpy(np.stack([np.zeros_like(p1), np.log(p1 / (1 - p1))], 1)).float()
        m.add_probs(logits.softmax(1), torch.from_numpy(y))
        probs_all.append(p1.ravel())
        y_all.append(y.ravel())
    p, y = np.concatenate(probs_all), np.concatenate(y_all)
    pr = m.pr_curve()
    assert pr["average_precision"] == pytest.approx(average_precision_score(y, p), abs=1e-6)
    sk_p, sk_r, sk_t = precision_recall_curve(y, p)
    ours = dict(zip(np.round(np.array(pr["thresholds"]) * bins).astype(int), zip(pr["precision"], pr["recall"])))
    for prec, rec, thr in zip(sk_p[:-1], sk_r[:-1], sk_t):
        assert ours[int(thr * bins)] == pytest.approx((prec, rec), abs=1e-6)
    out = plot_pr_curve(pr, tmp_path / "pr.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _worker(rank, world, port, shards, result_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    m = SegmentationMetrics(3, NAMES)
    for logits, target, cases in shards[rank]:
        m.add_probs(logits.softmax(1), target, case_ids=cases)
    m.all_reduce()
    if rank == 0:
        torch.save(m.compute(), result_path)
    dist.destroy_process_group()


def test_all_reduce_across_two_gloo_ranks(tmp_path):
    batches = []
    for seed in range(4):
        logits, target = random_batch(seed, n=2)
        batches.append((logits, target, [f"case{seed % 3}", f"case{(seed + 1) % 3}"]))
    single = SegmentationMetrics(3, NAMES)
    for b in batches:
        single.add_probs(b[0].softmax(1), b[1], case_ids=b[2])
    shards = [batches[0::2], batches[1::2]]
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, shards, str(tmp_path / "r.pt")), nprocs=2, join=True)
    merged = torch.load(tmp_path / "r.pt", weights_only=False)
    expected = single.compute()
    assert merged["per_class"] == expected["per_class"] and merged["per_case"] == expected["per_case"]
    assert merged["pr_curve"]["average_precision"] == pytest.approx(expected["pr_curve"]["average_precision"])


def test_identity_label_maps_count_as_no_maps():
    """Fully annotated cases (identity maps) give the figures of no maps at all, for both forms."""
    logits, target = random_batch(7, n=3)
    probs, maps = logits.softmax(1), torch.tensor([[0, 1, 2]] * 3)
    for add, first in (("add_probs", probs), ("add_labels", probs.argmax(1))):
        plain, mapped = SegmentationMetrics(3, NAMES), SegmentationMetrics(3, NAMES)
        getattr(plain, add)(first, target, case_ids=["a", "b", "c"])
        getattr(mapped, add)(first, target, case_ids=["a", "b", "c"], label_maps=maps)
        assert torch.equal(plain.confusion, mapped.confusion) and torch.equal(plain.pr_hist, mapped.pr_hist)
        assert plain.compute() == mapped.compute()


def test_add_probs_merges_unannotated_classes_and_skips_their_pr_counts():
    """A liver-only case (map [0, 1, 1]): its tumour predictions count as liver, its probabilities
    add nothing to the tumour PR curve; a fully annotated case in the same batch counts as alone."""
    logits, target = random_batch(8, n=2)
    target[0][target[0] == 2] = 1  # the liver-only case marks its tumour as liver
    probs = logits.softmax(1)
    m = SegmentationMetrics(3, NAMES)
    m.add_probs(probs, target, case_ids=["liver_only", "full"], label_maps=torch.tensor([[0, 1, 1], [0, 1, 2]]))
    alone = SegmentationMetrics(3, NAMES)
    alone.add_probs(probs[1:], target[1:], case_ids=["full"])
    assert torch.equal(m.pr_hist, alone.pr_hist)
    merged = probs[0].argmax(0).clamp(max=1)
    want = torch.bincount((target[0] * 3 + merged).flatten(), minlength=9).reshape(3, 3)
    assert torch.equal(m.confusion - alone.confusion, want)
    row = {r["case"]: r["per_class"] for r in m.compute()["per_case"]}["liver_only"]
    assert row["tumour"]["dice"] is None and row["liver"]["dice"] is not None


def test_batches_that_do_not_fit_are_refused():
    logits, target = random_batch(9, n=2)
    m = SegmentationMetrics(3, NAMES)
    with pytest.raises(ValueError, match="differ"):
        m.add_probs(logits.softmax(1), target[:1])
    with pytest.raises(ValueError, match="differ"):
        m.add_labels(logits.argmax(1), target[..., :-1])
    with pytest.raises(ValueError, match="prediction values outside"):
        m.add_labels(logits.argmax(1) + 1, target)
    assert int(m.confusion.sum()) == 0 and int(m.pr_hist.sum()) == 0  # nothing refused was counted

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
        m.update(logits, target)
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
    m.update(target.clone(), target, case_ids=["c0"])  # perfect, tumour absent everywhere
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
    m.update(ta[:1].clone(), ta[:1], case_ids=["A"])
    m.update(torch.cat([ta[1:], torch.zeros_like(tb)]), torch.cat([ta[1:], tb]), case_ids=["A", "B"])
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
        m.update(logits, torch.from_numpy(y))
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
        m.update(logits, target, case_ids=cases)
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
        single.update(*b[:2], case_ids=b[2])
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

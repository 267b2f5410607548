"""Losses against hand-computed values on small tensors, gradients, bad input."""

import math

import numpy as np
import pytest
import torch

from hpc_seg.config import load_config
from hpc_seg.losses import BCEDiceLoss, DiceCELoss, build_loss


def manual_dice_ce(logits: np.ndarray, target: np.ndarray, wd=0.3, wc=0.7, s=1e-5, jaccard=False):
    """Independent numpy implementation: softmax, CE mean, per-class soft overlap over present classes."""
    e = np.exp(logits - logits.max(1, keepdims=True))
    p = e / e.sum(1, keepdims=True)  # (N, C, H, W)
    n, c = logits.shape[:2]
    ce = -np.mean(np.log(np.take_along_axis(p, target[:, None], 1)))
    scores = []
    for k in range(c):
        g = (target == k).astype(float)
        if g.sum() == 0:
            continue
        inter = (p[:, k] * g).sum()
        tot = p[:, k].sum() + g.sum()
        scores.append((inter + s) / (tot - inter + s) if jaccard else (2 * inter + s) / (tot + s))
    return wd * (1 - np.mean(scores)) + wc * ce


def test_dice_ce_hand_computed_tiny():
    # 1 image, 2 classes, 1x2 pixels: logits make p(class1) = sigmoid(2), sigmoid(-1)
    logits = torch.tensor([[[[0.0, 0.0]], [[2.0, -1.0]]]])
    target = torch.tensor([[[1, 0]]])
    p1 = [1 / (1 + math.exp(-2)), 1 / (1 + math.exp(1))]
    p0 = [1 - p1[0], 1 - p1[1]]
    ce = -(math.log(p1[0]) + math.log(p0[1])) / 2
    d0 = (2 * p0[1] + 1e-5) / (sum(p0) + 1 + 1e-5)
    d1 = (2 * p1[0] + 1e-5) / (sum(p1) + 1 + 1e-5)
    expected = 0.3 * (1 - (d0 + d1) / 2) + 0.7 * ce
    assert DiceCELoss()(logits, target).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("jaccard", [False, True])
def test_dice_ce_matches_numpy_random(jaccard):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 3, 5, 4)).astype(np.float32)
    target = rng.integers(0, 2, size=(3, 5, 4))  # class 2 absent: left out of the Dice mean
    got = DiceCELoss(jaccard=jaccard)(torch.from_numpy(logits), torch.from_numpy(target)).item()
    assert got == pytest.approx(manual_dice_ce(logits, target, jaccard=jaccard), rel=1e-5)


def test_dice_term_has_gradient():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    target = torch.randint(0, 3, (2, 8, 8))
    DiceCELoss(dice_weight=1.0, ce_weight=0.0)(logits, target).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    # gradient descent on the Dice term alone improves the Dice
    x = torch.zeros(1, 2, 4, 4, requires_grad=True)
    t = torch.zeros(1, 4, 4, dtype=torch.long)
    t[0, :2] = 1
    loss_fn = DiceCELoss(1.0, 0.0)
    start = loss_fn(x, t).item()
    opt = torch.optim.SGD([x], lr=10.0)
    for _ in range(20):
        opt.zero_grad()
        loss_fn(x, t).backward()
        opt.step()
    assert loss_fn(x, t).item() < start / 2


def test_class_weights_and_deep_supervision():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 6, 6)
    target = torch.randint(0, 3, (2, 6, 6))
    w = DiceCELoss(class_weights=[1.0, 1.0, 1.0])(logits, target)
    assert w.item() == pytest.approx(DiceCELoss()(logits, target).item(), rel=1e-6)
    weighted = DiceCELoss(class_weights=[0.1, 1.0, 5.0])(logits, target)
    assert weighted.item() != pytest.approx(w.item())
    both = DiceCELoss()([logits, logits * 2], target)
    assert both.item() == pytest.approx((DiceCELoss()(logits, target) + DiceCELoss()(logits * 2, target)).item() / 2)


def test_bce_dice_hand_computed():
    logits = torch.tensor([[[[1.0, -2.0]]]])
    target = torch.tensor([[[1, 0]]])
    p = [1 / (1 + math.exp(-1)), 1 / (1 + math.exp(2))]
    bce = -(math.log(p[0]) + math.log(1 - p[1])) / 2
    dice = (2 * p[0] + 1e-5) / (sum(p) + 1 + 1e-5)
    assert BCEDiceLoss()(logits, target).item() == pytest.approx(0.5 * (1 - dice) + 0.5 * bce, rel=1e-6)


def test_bad_input():
    loss = DiceCELoss()
    with pytest.raises(ValueError, match=r"outside \[0, 2\]"):
        loss(torch.randn(1, 3, 4, 4), torch.full((1, 4, 4), 3))
    with pytest.raises(ValueError, match="empty batch"):
        loss(torch.randn(0, 3, 4, 4), torch.zeros(0, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="do not match"):
        loss(torch.randn(1, 3, 4, 4), torch.zeros(1, 5, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer class ids"):
        loss(torch.randn(1, 3, 4, 4), torch.zeros(1, 4, 4))


def test_build_from_config():
    cfg = load_config(None, ["loss.kind=jaccard_ce", "loss.dice_weight=0.5"])
    fn = build_loss(cfg.loss)
    assert isinstance(fn, DiceCELoss) and fn.jaccard and fn.dice_weight == 0.5

"""Segmentation losses.

``DiceCELoss``: ``w_dice · (1 - soft Dice) + w_ce · CE`` (the paper: 0.3 / 0.7). Soft Dice is
computed from the softmax over the whole batch per class,
``(2 Σ p·g + s) / (Σ p + Σ g + s)`` with ``s = 1e-5``, and averaged over the classes present in
the target (optionally weighted). Unlike the paper's code the Dice term is differentiable: it
uses the probabilities, not the argmax. ``JaccardCELoss`` swaps Dice for soft IoU;
``BCEDiceLoss`` is for binary tasks with one logit channel. Deep-supervision outputs (a list of
logits) are averaged.

Partially labelled cases (``label_map``, ``hpc_seg.preprocessing.labels``): the probabilities of classes a
case does not annotate are added to the class they lie in before CE and Dice, so a liver-only
case teaches liver-vs-background and nothing about tumour; Dice of a class counts only the
samples that annotate it (merged away, it has neither prediction nor target there).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from hpc_seg.preprocessing.labels import merge_probabilities
from hpc_seg.errors import ConfigError


def check_target_range(target: torch.Tensor, num_classes: int) -> None:
    """Class ids within ``[0, num_classes)``. Reading min/max is a host sync on a GPU tensor: the
    trainer calls this on the CPU batch before the copy and builds its loss with ``check_range=False``."""
    lo, hi = int(target.min()), int(target.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"loss: target values in [{lo}, {hi}] outside [0, {num_classes - 1}] "
                         f"for {num_classes} classes")


def _check(logits: torch.Tensor, target: torch.Tensor, num_classes: int, check_range: bool = True) -> None:
    if logits.shape[0] == 0:
        raise ValueError("loss: empty batch")
    if target.dtype not in (torch.int64, torch.int32, torch.uint8, torch.int16):
        raise ValueError(f"loss: target must be integer class ids, got {target.dtype}")
    if logits.shape[0] != target.shape[0] or logits.shape[2:] != target.shape[1:]:
        raise ValueError(f"loss: logits {tuple(logits.shape)} and target {tuple(target.shape)} do not match "
                         "(expected (N, C, *S) and (N, *S))")
    if check_range:
        check_target_range(target, num_classes)


def soft_overlap(probs: torch.Tensor, onehot: torch.Tensor, smooth: float, jaccard: bool = False):
    """Per-class soft Dice (or IoU) over batch and space: (C,) tensor."""
    dims = (0, *range(2, probs.dim()))
    inter = (probs * onehot).sum(dims)
    total = probs.sum(dims) + onehot.sum(dims)
    if jaccard:
        return (inter + smooth) / (total - inter + smooth)
    return (2 * inter + smooth) / (total + smooth)


class DiceCELoss(nn.Module):
    """Args:
        dice_weight, ce_weight: weights of the two terms.
        smooth: Dice smoothing.
        class_weights: optional per-class weights for CE and for the Dice mean.
        jaccard: use soft IoU instead of soft Dice.
        include_background: count class 0 in the overlap mean.
        check_range: check target ids on every call (a host sync on a GPU; see ``check_target_range``).
    """

    def __init__(self, dice_weight: float = 0.3, ce_weight: float = 0.7, smooth: float = 1e-5,
                 class_weights: list[float] | None = None, jaccard: bool = False, include_background: bool = True,
                 check_range: bool = True):
        super().__init__()
        self.dice_weight, self.ce_weight, self.smooth = dice_weight, ce_weight, smooth
        self.check_range = check_range
        self.jaccard, self.include_background = jaccard, include_background
        self.register_buffer("class_weights", None if class_weights is None
                             else torch.tensor(class_weights, dtype=torch.float32), persistent=False)

    def _single(self, logits: torch.Tensor, target: torch.Tensor, label_map=None) -> torch.Tensor:
        c = logits.shape[1]
        _check(logits, target, c, self.check_range)
        if self.class_weights is not None and self.class_weights.numel() != c:
            raise ValueError(f"loss: {self.class_weights.numel()} class weights for {c} classes")
        target = target.long()
        logits = logits.float()
        if _is_partial(label_map):
            probs = merge_probabilities(logits.softmax(1), label_map)
            ce = F.nll_loss(probs.clamp_min(1e-7).log(), target, weight=self.class_weights)
        else:
            ce = F.cross_entropy(logits, target, weight=self.class_weights)
            probs = logits.softmax(1)
        onehot = F.one_hot(target, c).movedim(-1, 1).to(probs.dtype)
        overlap = soft_overlap(probs, onehot, self.smooth, self.jaccard)
        present = onehot.sum((0, *range(2, onehot.dim()))) > 0
        if not self.include_background:
            present[0] = False
        w = present.float() * (self.class_weights if self.class_weights is not None else 1.0)
        mean_overlap = (overlap * w).sum() / w.sum().clamp_min(1e-12)
        return self.dice_weight * (1 - mean_overlap) + self.ce_weight * ce

    def forward(self, logits, target: torch.Tensor, label_map: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(logits, (list, tuple)):
            return torch.stack([self._single(lg, target, label_map) for lg in logits]).mean()
        return self._single(logits, target, label_map)


def _is_partial(label_map) -> bool:
    if label_map is None:
        return False
    ids = torch.arange(label_map.shape[1], device=label_map.device)
    return bool((label_map != ids).any())


class BCEDiceLoss(nn.Module):
    """Binary: one logit channel, ``w_dice · (1 - soft Dice(sigmoid)) + w_bce · BCE``."""

    def __init__(self, dice_weight: float = 0.5, ce_weight: float = 0.5, smooth: float = 1e-5,
                 check_range: bool = True):
        super().__init__()
        self.dice_weight, self.ce_weight, self.smooth = dice_weight, ce_weight, smooth
        self.check_range = check_range

    def _single(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] != 1:
            raise ValueError(f"BCEDiceLoss expects 1 logit channel, got {logits.shape[1]}")
        _check(logits, target, 2, self.check_range)
        g = target.unsqueeze(1).float()
        logits = logits.float()
        bce = F.binary_cross_entropy_with_logits(logits, g)
        p = logits.sigmoid()
        dice = (2 * (p * g).sum() + self.smooth) / (p.sum() + g.sum() + self.smooth)
        return self.dice_weight * (1 - dice) + self.ce_weight * bce

    def forward(self, logits, target, label_map: torch.Tensor | None = None):
        if _is_partial(label_map):
            raise ValueError("BCEDiceLoss: one-logit binary output has no classes to merge for partially "
                             "labelled cases; use dice_ce")
        if isinstance(logits, (list, tuple)):
            return torch.stack([self._single(lg, target) for lg in logits]).mean()
        return self._single(logits, target)


def build_loss(cfg, check_range: bool = True) -> nn.Module:
    """From the ``loss`` config section."""
    if cfg.kind == "dice_ce":
        return DiceCELoss(cfg.dice_weight, cfg.ce_weight, cfg.smooth, cfg.class_weights, check_range=check_range)
    if cfg.kind == "jaccard_ce":
        return DiceCELoss(cfg.dice_weight, cfg.ce_weight, cfg.smooth, cfg.class_weights, jaccard=True,
                          check_range=check_range)
    if cfg.kind == "bce_dice":
        return BCEDiceLoss(cfg.dice_weight, cfg.ce_weight, cfg.smooth, check_range=check_range)
    raise ConfigError(f"unknown loss kind '{cfg.kind}'")


__all__ = ["DiceCELoss", "BCEDiceLoss", "build_loss", "check_target_range", "merge_probabilities", "soft_overlap"]

"""Whole-volume inference: slice-wise (2D/2.5D) batches over a (C, Z, Y, X) volume, through the
model's preprocessing plan (``hpc_seg.preprocessing.plan``: the same code the training loader runs), the
probabilities resized back to the volume grid; optional mirror TTA (the mean over all four in-plane
mirrorings, as nnU-Net mirrors every axis); autocast on GPU; optional post-processing of the liver,
chosen by class name (:func:`postprocess`).

:func:`predict_labels` (``evaluate``) reduces each batch where the model ran — argmax to uint8 and
the PR score to its histogram bin — so a case's float probabilities never cross to the host;
:func:`predict_probs` returns them whole for callers that store them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from hpc_seg.preprocessing.plan import PreprocessingPlan, model_input, probabilities, to_case_grid
from hpc_seg.preprocessing.slices import stack
from hpc_seg.errors import HpcSegError
from hpc_seg.metrics import index_dtype, pr_histogram, score_bins


def _check(plan: PreprocessingPlan, image: np.ndarray) -> None:
    if plan.mode == "3d":
        raise HpcSegError("data.mode 3d: the registry has no 3D model, so there is no sliding-window 3D "
                          "inference; evaluate 2D/2.5D models")
    if image.shape[0] != plan.channels:
        raise HpcSegError(f"image has {image.shape[0]} channel(s), the model's plan expects {plan.channels}")


@torch.no_grad()
def batch_probabilities(model, plan: PreprocessingPlan, image: np.ndarray, device=torch.device("cpu"),
                        amp_dtype=None, tta: bool = False, batch_size: int = 16):
    """Yield (first slice, (n, K, Y, X) float32 probabilities on ``device``, on the case grid) for
    consecutive slice batches of a raw (C, Z, Y, X) image. Reads nothing but the image."""
    _check(plan, image)
    k = plan.slices if plan.mode == "2.5d" else 1
    model = model.to(device).eval()
    depth, (h, w) = image.shape[1], image.shape[2:]

    def probs_of(x):
        return probabilities(plan, model(x))

    for start in range(0, depth, batch_size):
        zs = range(start, min(start + batch_size, depth))
        x = model_input(plan, np.stack([stack(image, z, k) for z in zs])).to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            p = probs_of(x)
            if tta:
                p = (p + probs_of(x.flip(-1)).flip(-1) + probs_of(x.flip(-2)).flip(-2)
                     + probs_of(x.flip(-1, -2)).flip(-1, -2)) / 4
            p = to_case_grid(p.float(), (h, w))
        yield start, p  # outside autocast: the consumer's operations run in the dtypes it chose


def predict_probs(model, plan: PreprocessingPlan, image: np.ndarray, device=torch.device("cpu"), amp_dtype=None,
                  tta: bool = False, batch_size: int = 16) -> np.ndarray:
    """Class probabilities (K, Z, Y, X) float32 on the host for a raw (C, Z, Y, X) image (HU int16
    or RGB uint8), for callers that keep them (``hpc-seg predict --probs``); ``evaluate`` needs
    only :func:`predict_labels`. Reads nothing but the image: no label, no statistics of the data."""
    out = np.zeros((plan.num_classes, image.shape[1], *image.shape[2:]), np.float32)
    for start, p in batch_probabilities(model, plan, image, device, amp_dtype, tta, batch_size):
        out[:, start:start + len(p)] = p.permute(1, 0, 2, 3).cpu().numpy()
    return out


def first_argmax(probs: torch.Tensor) -> torch.Tensor:
    """(N, K, …) → (N, …) uint8 index of the first largest probability, as ``argmax(1)`` (ties →
    the lower class), by K-1 elementwise comparisons: torch's CPU argmax over a short class axis
    is ~25× slower, and the comparisons run as fast on any device (NaN is never chosen)."""
    best, index = probs[:, 0], torch.zeros(probs[:, 0].shape, dtype=torch.uint8, device=probs.device)
    for c in range(1, probs.shape[1]):
        index.masked_fill_(probs[:, c] > best, c)
        best = torch.maximum(best, probs[:, c])
    return index


@dataclass
class LabelPrediction:
    """A case's prediction as ``evaluate`` needs it: uint8 labels on the host, and the PR score's
    bin per voxel (``hpc_seg.metrics.score_bins``) left on the device that computed it."""

    labels: np.ndarray  # (Z, Y, X) uint8
    score_bins: torch.Tensor | None  # (Z, Y, X) narrow int on the model's device; None: no PR score
    bins: int

    def pr_counts(self, target: np.ndarray, positive_class: int) -> torch.Tensor | None:
        """(2, bins) [negatives, positives] counts against ``target`` (the host label volume, read
        after the prediction), counted on the device; only the counts come back."""
        if self.score_bins is None:
            return None
        t = torch.from_numpy(np.ascontiguousarray(target)).to(self.score_bins.device)
        return pr_histogram(self.score_bins, t == positive_class, self.bins).cpu()


@torch.no_grad()
def predict_labels(model, plan: PreprocessingPlan, image: np.ndarray, device=torch.device("cpu"),
                   amp_dtype=None, tta: bool = False, batch_size: int = 16, score_classes: list[int] | None = None,
                   bins: int = 1000) -> LabelPrediction:
    """The labels of a raw (C, Z, Y, X) image — argmax on ``device``, only uint8 comes to the host —
    and, for ``score_classes`` (their probabilities summed: the PR score), each voxel's PR bin,
    kept on ``device``. The same code runs on the CPU and on a GPU. Reads nothing but the image."""
    _check(plan, image)
    depth, (h, w) = image.shape[1], image.shape[2:]
    labels = np.zeros((depth, h, w), np.uint8)
    scores = None
    if score_classes:
        scores = torch.zeros((depth, h, w), dtype=index_dtype(2 * bins), device=device)
    for start, p in batch_probabilities(model, plan, image, device, amp_dtype, tta, batch_size):
        add_batch(labels, scores, start, p, score_classes, bins)
    return LabelPrediction(labels, scores, bins)


def add_batch(labels: np.ndarray, scores: torch.Tensor | None, start: int, probs: torch.Tensor,
              score_classes: list[int] | None, bins: int) -> None:
    """One batch of device probabilities into the label volume (host) and score bins (device)."""
    labels[start:start + len(probs)] = first_argmax(probs).cpu().numpy()
    if scores is not None:
        s = probs[:, score_classes[0]] if len(score_classes) == 1 else probs[:, score_classes].sum(1)
        scores[start:start + len(probs)] = score_bins(s, bins)


def postprocess(labels: np.ndarray, classes) -> np.ndarray:
    """Liver post-processing of (Z, Y, X) labels over the model's ``classes`` (names), by name: when
    they contain ``liver``, keep the largest 3D connected component of liver (with ``tumour`` when
    they contain it) and set liver and tumour voxels outside it to background, so tumour lies only
    inside the liver; other classes stay as they are. Without ``liver`` (Kvasir's polyp, any other
    task) the labels come back unchanged."""
    names = list(classes)
    if "liver" not in names:
        return labels
    organ = np.isin(labels, [names.index(c) for c in ("liver", "tumour") if c in names])
    comp, n = ndimage.label(organ)
    if n <= 1:
        return labels
    sizes = ndimage.sum_labels(organ, comp, index=np.arange(1, n + 1))
    out = labels.copy()
    out[organ & (comp != int(np.argmax(sizes)) + 1)] = 0
    return out

"""Segmentation metrics accumulated over a whole evaluation (never averaged per batch).

``SegmentationMetrics`` keeps integer counts only — a global confusion matrix, per-case
(tp, fp, fn) per class, and histograms of the target class's probability for positives and
negatives — so results are exact, order-independent, and can be summed across ranks
(``all_reduce``). ``compute()`` derives:

* per class: IoU, Dice, precision, recall (``None`` when undefined, e.g. a class absent from
  both prediction and target — never NaN, and left out of the means, which say how many classes
  they averaged);
* mean IoU / Dice with and without background, reported separately;
* LiTS-style **Dice per case** (mean of per-case Dice) and **global Dice** (from pooled counts);
* the precision-recall curve and average precision of the ``pr_class`` probability.

A batch comes in one of two forms: :meth:`SegmentationMetrics.add_probs` takes class
probabilities (training validation: the argmax is the prediction, the probabilities give the PR
curve), :meth:`SegmentationMetrics.add_labels` takes predicted labels (``evaluate``: labels after
post-processing, with the PR histogram counted where the model ran, or none).

The counting helpers (:func:`joint_counts`, :func:`score_bins`, :func:`pr_histogram`) run on
whichever device holds their inputs and key ``bincount`` in the narrowest integer type:
``evaluate`` counts a case's PR histogram on the model's device and passes the (2, bins) counts
to ``add_labels(pr_counts=…)``; ``add_probs`` counts on the host.
"""

from __future__ import annotations

import numpy as np
import torch

from hpc_seg.distributed import collectives as coll
from hpc_seg.preprocessing.labels import merge_probabilities


def _ratio(num: float, den: float):
    return None if den == 0 else float(num) / float(den)


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def index_dtype(n: int) -> torch.dtype:
    """The narrowest integer type holding 0 … n-1: bincount over it reads a fraction of the memory
    of int64 keys (on the CPU 5-60× faster over a 512²×200 volume)."""
    for dtype in (torch.uint8, torch.int16, torch.int32):
        if n - 1 <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


def joint_counts(target: torch.Tensor, pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) int64 counts [target, prediction] of class indices in [0, C), on the inputs' device."""
    c = num_classes
    dtype = index_dtype(c * c)
    key = target.to(dtype) * c + pred.to(dtype)
    return torch.bincount(key.flatten(), minlength=c * c).reshape(c, c)


def score_bins(prob: torch.Tensor, bins: int) -> torch.Tensor:
    """PR-curve bin of each probability (bin k: [k/bins, (k+1)/bins), 1.0 in the last), as a
    narrow integer tensor on ``prob``'s device; the same rule for the host and every device."""
    dtype = index_dtype(2 * bins)
    # clamped before the cast (the narrow type must not overflow) and after it (NaN casts anywhere)
    return (prob.float() * bins).clamp_(0, bins - 1).to(dtype).clamp_(0, bins - 1)


def pr_histogram(bin_index: torch.Tensor, positive: torch.Tensor, bins: int) -> torch.Tensor:
    """(2, bins) int64 counts [negatives, positives] of ``score_bins`` output, on its device."""
    dtype = index_dtype(2 * bins)
    key = bin_index.to(dtype) + positive.to(dtype) * bins
    return torch.bincount(key.flatten(), minlength=2 * bins).reshape(2, bins)


def _merged_labels(label_maps: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """Predictions as each item's case counts them (``label_maps`` (N, C) int64 on the CPU); fully
    annotated cases (every map the identity) keep theirs without a gather."""
    if bool((label_maps == torch.arange(label_maps.shape[1])).all()):
        return pred
    return torch.gather(label_maps, 1, pred.long().cpu().flatten(1)).view(pred.shape)


class SegmentationMetrics:
    """Args:
        num_classes: number of classes (0 = background).
        class_names: names used as keys in the result.
        pr_class: class whose probability gives the PR curve (default: the last, e.g. tumour/polyp);
            None disables it.
        pr_bins: histogram resolution of the PR curve (thresholds at multiples of 1/pr_bins).
    """

    def __init__(self, num_classes: int, class_names: list[str] | None = None, pr_class: int | None = -1,
                 pr_bins: int = 1000):
        self.num_classes = num_classes
        self.class_names = class_names or [f"class_{i}" for i in range(num_classes)]
        if len(self.class_names) != num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {num_classes} classes")
        self.pr_class = None if pr_class is None else pr_class % num_classes
        self.pr_bins = pr_bins
        self.reset()

    def reset(self) -> None:
        c = self.num_classes
        self.confusion = torch.zeros(c, c, dtype=torch.int64)  # [target, prediction]
        self.per_case: dict[str, torch.Tensor] = {}  # case -> (C, 3) tp, fp, fn
        self.pr_hist = torch.zeros(2, self.pr_bins, dtype=torch.int64)  # [negatives, positives]
        self.annotated: dict[str, list[int]] = {}  # case -> classes it annotates (partially labelled only)

    @torch.no_grad()
    def add_probs(self, probs: torch.Tensor, target: torch.Tensor, case_ids=None,
                  label_maps: torch.Tensor | None = None) -> None:
        """Add a batch of class probabilities ``probs`` (N, C, *S) against ``target`` (N, *S): their
        argmax is the prediction and ``probs[:, pr_class]`` the PR score (on the host).

        ``case_ids``: one id per batch item (slices of a case may come in any batch or rank).
        ``label_maps`` (N, C): partially labelled cases (``hpc_seg.preprocessing.labels``): predictions and
        probabilities of classes an item's case does not annotate count as the class they lie in,
        and that case's figures for those classes are left out (None), as is its PR contribution.
        """
        probs = probs.float()
        pred = probs.argmax(1)
        keep_pr = None
        if label_maps is not None:
            label_maps = label_maps.long().cpu()
            pred = _merged_labels(label_maps, pred)
            probs = merge_probabilities(probs.cpu(), label_maps)
            if self.pr_class is not None:
                keep_pr = label_maps[:, self.pr_class] == self.pr_class
        self._add_counts(pred, target, case_ids, label_maps)
        if self.pr_class is not None:
            prob, t = probs[:, self.pr_class].cpu(), target.cpu()
            if keep_pr is not None:
                prob, t = prob[keep_pr], t[keep_pr]
            self.pr_hist += pr_histogram(score_bins(prob, self.pr_bins), t == self.pr_class, self.pr_bins)

    @torch.no_grad()
    def add_labels(self, pred: torch.Tensor, target: torch.Tensor, case_ids=None,
                   label_maps: torch.Tensor | None = None, pr_counts: torch.Tensor | None = None) -> None:
        """Add a batch of predicted labels ``pred`` (N, *S) (e.g. after post-processing) against
        ``target`` (N, *S); ``case_ids`` and ``label_maps`` as in :meth:`add_probs`.

        ``pr_counts`` (2, pr_bins): the batch's PR histogram counted already (:func:`pr_histogram`
        on the device that holds the probabilities, scores summed over :meth:`pr_sources`), so
        whole volumes of probabilities need not come to the host; None adds nothing to the PR curve.
        """
        if pr_counts is not None and self.pr_class is None:
            raise ValueError("metrics: pr_counts need a pr_class")
        if label_maps is not None:
            label_maps = label_maps.long().cpu()
            pred = _merged_labels(label_maps, pred)
        self._add_counts(pred, target, case_ids, label_maps)
        if pr_counts is not None:
            self.pr_hist += pr_counts.cpu().long().reshape(2, self.pr_bins)

    def pr_sources(self, label_map) -> list[int] | None:
        """Classes whose probabilities sum to the PR score on a case with ``label_map`` (as
        ``add_probs`` merges them); None when the case does not annotate ``pr_class`` (no PR counts)."""
        if self.pr_class is None:
            return None
        lmap = [int(v) for v in label_map]
        if lmap[self.pr_class] != self.pr_class:
            return None
        return [f for f, to in enumerate(lmap) if to == self.pr_class]

    def _check_range(self, t: torch.Tensor, p: torch.Tensor) -> None:
        # the counts are keyed in a narrow integer type: values out of range would wrap silently
        c = self.num_classes
        for what, x in (("target", t), ("prediction", p)):
            if x.numel() and (int(x.min()) < 0 or int(x.max()) >= c):
                raise ValueError(f"metrics: {what} values outside [0, {c - 1}]")

    def _add_counts(self, pred: torch.Tensor, target: torch.Tensor, case_ids, label_maps) -> None:
        """A batch's confusion and per-case counts, on the host."""
        if pred.shape != target.shape:
            raise ValueError(f"metrics: prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
        t, p = target.cpu(), pred.cpu()
        self._check_range(t, p)
        c = self.num_classes
        if case_ids is None:
            self.confusion += joint_counts(t, p, c)
            return
        for i, cid in enumerate(case_ids):  # one count per item serves the confusion and its case
            cm = joint_counts(t[i], p[i], c)
            self.confusion += cm
            self._add_case(str(cid), cm)
            if label_maps is not None:
                self.annotated[str(cid)] = sorted(set(label_maps[i].tolist()))

    def _add_case(self, cid: str, cm: torch.Tensor) -> None:
        c = self.num_classes
        tp = cm.diag()
        counts = torch.stack([tp, cm.sum(0) - tp, cm.sum(1) - tp], 1)
        self.per_case[cid] = self.per_case.get(cid, torch.zeros(c, 3, dtype=torch.int64)) + counts

    def all_reduce(self) -> None:
        """Sum counts over all ranks (no-op without an initialised process group). The counts are CPU
        tensors; ``hpc_seg.distributed.collectives`` carries them to the GPU under NCCL and back."""
        if not coll.active():
            return
        for name in ("confusion", "pr_hist"):
            coll.all_reduce(getattr(self, name), "sum")
        gathered = coll.all_gather_object(({k: v.tolist() for k, v in self.per_case.items()}, self.annotated))
        merged: dict[str, torch.Tensor] = {}
        for part, annotated in gathered:
            for cid, counts in part.items():
                merged[cid] = merged.get(cid, 0) + torch.tensor(counts, dtype=torch.int64)
            self.annotated.update(annotated)
        self.per_case = merged

    def _class_figures(self) -> dict:
        cm = self.confusion.double()
        tp = cm.diag()
        fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
        out = {}
        for i, name in enumerate(self.class_names):
            a, b, d = tp[i].item(), fp[i].item(), fn[i].item()
            out[name] = {"iou": _ratio(a, a + b + d), "dice": _ratio(2 * a, 2 * a + b + d),
                         "precision": _ratio(a, a + b), "recall": _ratio(a, a + d),
                         "tp": int(a), "fp": int(b), "fn": int(d), "support": int(a + d)}
        return out

    def _per_case(self) -> list[dict]:
        rows = []
        for cid in sorted(self.per_case):
            counts = self.per_case[cid].double()
            figs = {}
            marked = self.annotated.get(cid, range(self.num_classes))
            for i, name in enumerate(self.class_names):
                if i not in marked:  # the case does not annotate this class: no figure, not a zero
                    figs[name] = {"dice": None, "iou": None, "support": None}
                    continue
                tp, fp, fn = counts[i].tolist()
                figs[name] = {"dice": _ratio(2 * tp, 2 * tp + fp + fn), "iou": _ratio(tp, tp + fp + fn),
                              "support": int(tp + fn)}
            rows.append({"case": cid, "per_class": figs})
        return rows

    def pr_curve(self) -> dict | None:
        """Precision/recall at thresholds k/pr_bins (predict positive if p >= threshold), and AP."""
        if self.pr_class is None:
            return None
        neg, pos = self.pr_hist.double()
        tp = pos.flip(0).cumsum(0).flip(0)  # tp[k]: positives with bin >= k
        fp = neg.flip(0).cumsum(0).flip(0)
        total_pos = pos.sum().item()
        keep = (tp + fp) > 0
        thresholds = (torch.arange(self.pr_bins, dtype=torch.float64) / self.pr_bins)[keep]
        precision = (tp[keep] / (tp[keep] + fp[keep]))
        recall = tp[keep] / total_pos if total_pos > 0 else torch.zeros_like(precision)
        # AP as scikit-learn: sum over thresholds of (R_k - R_{k+1}) * P_k, from high to low threshold
        r_next = torch.cat([recall[1:], recall.new_zeros(1)])
        ap = float(((recall - r_next) * precision).sum()) if total_pos > 0 else None
        return {"class": self.class_names[self.pr_class], "thresholds": thresholds.tolist(),
                "precision": precision.tolist(), "recall": recall.tolist(), "average_precision": ap,
                "positives": int(total_pos)}

    def compute(self) -> dict:
        per_class = self._class_figures()
        names = self.class_names
        fg = names[1:]
        per_case = self._per_case()
        res = {
            "per_class": per_class,
            "mean_iou": _mean(per_class[n]["iou"] for n in names),
            "mean_iou_foreground": _mean(per_class[n]["iou"] for n in fg),
            "mean_dice": _mean(per_class[n]["dice"] for n in names),
            "mean_dice_foreground": _mean(per_class[n]["dice"] for n in fg),
            "classes_undefined": [n for n in names if per_class[n]["iou"] is None],
            "global_dice": {n: per_class[n]["dice"] for n in fg},
            "dice_per_case": {n: _mean(r["per_class"][n]["dice"] for r in per_case) for n in fg},
            "cases_without_class": {n: sum(r["per_class"][n]["dice"] is None for r in per_case) for n in fg},
            "per_case": per_case,
            "pr_curve": self.pr_curve(),
        }
        return res


def plot_pr_curve(pr: dict, path, title: str | None = None):
    """Write the PR curve as a PNG (matplotlib, headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hpc_seg.storage.atomic import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.plot(pr["recall"], pr["precision"], drawstyle="steps-post")
    ap = pr["average_precision"]
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
           title=title or f"{pr['class']}: AP {ap:.3f}" if ap is not None else pr["class"])
    ax.grid(alpha=0.3)
    import io

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


__all__ = ["SegmentationMetrics", "index_dtype", "joint_counts", "plot_pr_curve", "pr_histogram", "score_bins"]

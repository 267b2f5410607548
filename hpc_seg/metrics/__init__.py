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
"""

from __future__ import annotations

import numpy as np
import torch
from hpc_seg.utils import collectives as coll


def _ratio(num: float, den: float):
    return None if den == 0 else float(num) / float(den)


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


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
    def update(self, logits: torch.Tensor, target: torch.Tensor, case_ids=None, pred: torch.Tensor | None = None,
               probs: torch.Tensor | None = None, label_maps: torch.Tensor | None = None) -> None:
        """Add a batch: ``logits`` (N, C, *S) (or hard predictions (N, *S)), ``target`` (N, *S).

        ``case_ids``: one id per batch item (slices of a case may come in any batch or rank).
        ``probs`` may replace ``logits`` (already softmaxed), and ``pred`` the argmax (e.g. after
        post-processing); the PR curve always uses the probabilities.
        ``label_maps`` (N, C): partially labelled cases (``hpc_seg.data.labels``): predictions and
        probabilities of classes an item's case does not annotate count as the class they lie in,
        and that case's figures for those classes are left out (None), as is its PR contribution.
        """
        if probs is not None:
            probs = probs.float()
        elif logits is not None and logits.dim() == target.dim() + 1:
            probs = logits.float().softmax(1)
        if pred is None:
            pred = probs.argmax(1) if probs is not None else logits
        keep_pr = None
        if label_maps is not None:
            label_maps = label_maps.long().cpu()
            pred = torch.gather(label_maps, 1, pred.long().cpu().flatten(1)).view(pred.shape)
            if probs is not None:
                from hpc_seg.data.labels import merge_probabilities

                probs = merge_probabilities(probs.cpu(), label_maps)
            if self.pr_class is not None:
                keep_pr = label_maps[:, self.pr_class] == self.pr_class
        if pred.shape != target.shape:
            raise ValueError(f"metrics: prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
        c = self.num_classes
        t, p = target.long().cpu(), pred.long().cpu()
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= c):
            raise ValueError(f"metrics: target values outside [0, {c - 1}]")
        self.confusion += torch.bincount((t * c + p).flatten(), minlength=c * c).reshape(c, c)
        if case_ids is not None:
            for i, cid in enumerate(case_ids):
                self._add_case(str(cid), t[i], p[i])
                if label_maps is not None:
                    self.annotated[str(cid)] = sorted(set(label_maps[i].tolist()))
        if probs is not None and self.pr_class is not None:
            prob, tt = probs[:, self.pr_class].cpu(), t
            if keep_pr is not None:
                prob, tt = prob[keep_pr], t[keep_pr]
            prob = prob.flatten()
            bins = (prob * self.pr_bins).long().clamp_(0, self.pr_bins - 1)
            positive = (tt.flatten() == self.pr_class).long()
            self.pr_hist += torch.bincount(positive * self.pr_bins + bins,
                                           minlength=2 * self.pr_bins).reshape(2, self.pr_bins)

    def _add_case(self, cid: str, t: torch.Tensor, p: torch.Tensor) -> None:
        c = self.num_classes
        cm = torch.bincount((t * c + p).flatten(), minlength=c * c).reshape(c, c)
        tp = cm.diag()
        counts = torch.stack([tp, cm.sum(0) - tp, cm.sum(1) - tp], 1)
        self.per_case[cid] = self.per_case.get(cid, torch.zeros(c, 3, dtype=torch.int64)) + counts

    def all_reduce(self) -> None:
        """Sum counts over all ranks (no-op without an initialised process group). The counts are CPU
        tensors; ``hpc_seg.utils.collectives`` carries them to the GPU under NCCL and back."""
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

    from hpc_seg.utils.atomic import atomic_write_bytes

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


__all__ = ["SegmentationMetrics", "plot_pr_curve"]

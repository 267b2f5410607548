"""Lesion-wise detection figures of one case and their sum over cases (the view of the LiTS benchmark,
Bilic et al., MedIA 2023, which scored detection beside Dice).

Matching rules:

* Lesions are 3D connected components of the tumour mask, 26-connectivity (``volumes.components``),
  in the reference and in the prediction separately.
* ``detected``: reference lesions that any predicted lesion overlaps by at least one voxel.
* ``detected_iou50``: reference lesions matched one-to-one to a predicted lesion with IoU ≥ 0.5
  (pairs taken greedily by IoU, highest first; above 0.5 a pair is unique anyway, since each side
  then holds more than half of the other).
* ``false_positives``: predicted lesions that overlap no reference lesion.
* recall = detected / reference; precision = predicted lesions that overlap a reference lesion /
  predicted; F1 their harmonic mean; the ``_iou50`` figures with matched pairs on both sides.
* A detected lesion's Dice is between the reference lesion and the union of the predicted lesions
  that overlap it.
* ``by_size``: reference lesions by volume, < 1 ml, 1–10 ml, > 10 ml (the spacing of the case;
  None for a case whose spacing is implausible, ``volumes.spacing_plausible``, and left out of the
  pooled bins, counted in ``cases_without_sizes``).
"""

from __future__ import annotations

import numpy as np

from hpc_seg.metrics.volumes import components, spacing_plausible

SIZE_BINS = (("<1ml", 0.0, 1.0), ("1-10ml", 1.0, 10.0), (">10ml", 10.0, float("inf")))
COUNTS = ("reference", "predicted", "detected", "detected_iou50", "false_positives", "predicted_matched",
          "matched_iou50")


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def _f1(p: float | None, r: float | None) -> float | None:
    return None if p is None or r is None else (2 * p * r / (p + r) if p + r else 0.0)


def _overlaps(ref_lab: np.ndarray, n_ref: int, pred_lab: np.ndarray, n_pred: int) -> np.ndarray:
    """(n_ref + 1, n_pred + 1) voxel counts of each (reference, predicted) component pair; row and
    column 0 are background."""
    pairs = ref_lab.astype(np.int64) * (n_pred + 1) + pred_lab
    return np.bincount(pairs.ravel(), minlength=(n_ref + 1) * (n_pred + 1)).reshape(n_ref + 1, n_pred + 1)


def _iou50_pairs(inter: np.ndarray, ref_size: np.ndarray, pred_size: np.ndarray) -> int:
    """One-to-one pairs at IoU ≥ 0.5, greedily by IoU."""
    union = ref_size[:, None] + pred_size[None, :] - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    used_r, used_p, n = set(), set(), 0
    for flat in np.argsort(-iou, axis=None):
        i, j = np.unravel_index(flat, iou.shape)
        if iou[i, j] < 0.5:
            break
        if i not in used_r and j not in used_p:
            used_r.add(i), used_p.add(j)
            n += 1
    return n


def case_lesions(pred: np.ndarray, ref: np.ndarray, spacing_zyx) -> dict:
    """Lesion figures of one case from its predicted and reference tumour masks (Z, Y, X)."""
    plausible = spacing_plausible(spacing_zyx, ref.shape)
    voxel_ml = float(np.prod([float(s) for s in spacing_zyx])) / 1000.0
    ref_lab, n_ref = components(ref)
    pred_lab, n_pred = components(pred)
    table = _overlaps(ref_lab, n_ref, pred_lab, n_pred)
    inter = table[1:, 1:]
    ref_size, pred_size = table[1:, :].sum(1), table[:, 1:].sum(0)
    hit = inter > 0
    lesions = []
    for i in range(n_ref):
        ml = float(ref_size[i]) * voxel_ml
        union_pred = int(pred_size[hit[i]].sum())
        dice = 2 * int(inter[i][hit[i]].sum()) / (int(ref_size[i]) + union_pred) if hit[i].any() else None
        lesions.append({"ml": round(ml, 4) if plausible else None, "detected": bool(hit[i].any()), "dice": dice})
    out = {"reference": n_ref, "predicted": n_pred, "detected": int(hit.any(1).sum()),
           "detected_iou50": _iou50_pairs(inter, ref_size, pred_size),
           "false_positives": int((~hit.any(0)).sum()), "predicted_matched": int(hit.any(0).sum())}
    out["matched_iou50"] = out["detected_iou50"]
    out["by_size"] = _by_size(lesions) if plausible else None  # no sizes without a spacing to trust
    out["lesion_dice"] = [le["dice"] for le in lesions if le["detected"]]
    out["reference_lesions"] = lesions
    return _with_rates(out)


def _by_size(lesions: list[dict]) -> dict:
    out = {}
    for name, lo, hi in SIZE_BINS:
        inside = [le for le in lesions if lo <= le["ml"] < hi]
        found = sum(le["detected"] for le in inside)
        out[name] = {"reference": len(inside), "detected": found, "recall": _ratio(found, len(inside))}
    return out


def _with_rates(d: dict) -> dict:
    d["recall"], d["precision"] = _ratio(d["detected"], d["reference"]), _ratio(d["predicted_matched"], d["predicted"])
    d["f1"] = _f1(d["precision"], d["recall"])
    d["recall_iou50"] = _ratio(d["detected_iou50"], d["reference"])
    d["precision_iou50"] = _ratio(d["matched_iou50"], d["predicted"])
    d["f1_iou50"] = _f1(d["precision_iou50"], d["recall_iou50"])
    dice = d["lesion_dice"]
    d["lesion_dice_mean"] = float(np.mean(dice)) if dice else None
    return d


def sum_lesions(per_case: list[dict]) -> dict:
    """The cases' counts summed and the rates recomputed from the sums (pooled, not averaged)."""
    out = {k: sum(c[k] for c in per_case) for k in COUNTS}
    out["by_size"] = {}
    sized = [c for c in per_case if c["by_size"] is not None]
    out["cases_without_sizes"] = len(per_case) - len(sized)
    for name, _, _ in SIZE_BINS:
        ref = sum(c["by_size"][name]["reference"] for c in sized)
        found = sum(c["by_size"][name]["detected"] for c in sized)
        out["by_size"][name] = {"reference": ref, "detected": found, "recall": _ratio(found, ref)}
    if not sized:  # no case with a spacing to trust: no size bins at all, rather than bins of zeros
        out["by_size"] = None
    out["lesion_dice"] = [d for c in per_case for d in c["lesion_dice"]]
    out = _with_rates(out)
    out["cases"] = len(per_case)
    del out["lesion_dice"]
    return out

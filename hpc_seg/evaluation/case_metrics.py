"""Per-case volume metrics in physical units: Dice, IoU, VOE, RVD, ASSD and MSSD (symmetric
surface distances in mm from the voxel spacing), as in the LiTS benchmark (Bilic et al. 2023).

The surface distances' distance transforms run on each figure's bounding box, not the volume
(:func:`surface_distances`): the same numbers at a fraction of the time (docs/evaluation.md)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1))


def _box(mask: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of a non-empty mask grown by one voxel on each side (clipped to the volume)."""
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(int(hit[0]) - 1, 0), min(int(hit[-1]) + 2, mask.shape[axis])))
    return tuple(box)


def surface_distances(pred: np.ndarray, gt: np.ndarray, spacing) -> tuple[float | None, float | None]:
    """(ASSD, MSSD) in the units of ``spacing``; None when either mask is empty.

    The distance transforms run on the bounding box of ``pred | gt`` plus one voxel: every surface
    voxel lies inside it, so each distance to the nearest surface voxel is the same as over the
    whole volume (the EDT is exact, not a propagation), and the margin of background keeps each
    box-edge voxel's erosion neighbourhood as in the volume (a mask on the volume border is cut
    by the volume edge in both). A liver's box is about a tenth of a 512²×200 CT, a tumour's far less."""
    if not pred.any() or not gt.any():
        return None, None
    box = _box(pred | gt)
    pred, gt = pred[box], gt[box]
    sp, sg = _surface(pred), _surface(gt)
    dt_gt = ndimage.distance_transform_edt(~sg, sampling=spacing)
    dt_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)
    d = np.concatenate([dt_gt[sp], dt_pred[sg]])
    return float(d.mean()), float(d.max())


def _figures(p: np.ndarray, g: np.ndarray, spacing, surfaces: bool) -> dict:
    tp = int(np.count_nonzero(p & g))
    fp, fn = int(np.count_nonzero(p & ~g)), int(np.count_nonzero(~p & g))
    union = tp + fp + fn
    iou = tp / union if union else None
    fig = {"dice": (2 * tp / (2 * tp + fp + fn)) if union else None, "iou": iou,
           "voe": (1 - iou) if iou is not None else None,
           "rvd": ((tp + fp) - (tp + fn)) / (tp + fn) if (tp + fn) else None,
           "precision": tp / (tp + fp) if (tp + fp) else None, "recall": tp / (tp + fn) if (tp + fn) else None,
           "voxels_gt": tp + fn, "voxels_pred": tp + fp}
    if surfaces:
        fig["assd_mm"], fig["mssd_mm"] = surface_distances(p, g, spacing)
    return fig


def case_metrics(pred: np.ndarray, gt: np.ndarray, spacing, class_names: list[str],
                 annotated: set[int] | None = None) -> dict:
    """Figures per class (``label == c``; surface distances for foreground classes) for one case.

    For liver CT also ``liver+tumour`` (labels >= 1): the whole organ, as the LiTS liver score.
    Undefined figures (e.g. Dice of a class absent from both masks) are None, as are all figures of
    a class the case does not annotate (``annotated``: class indices; None = all).
    """
    out = {name: (_figures(pred == c, gt == c, spacing, c > 0) if annotated is None or c in annotated
                  else dict.fromkeys(("dice", "iou", "voe", "rvd", "precision", "recall", "voxels_gt",
                                      "voxels_pred", "assd_mm", "mssd_mm")))
           for c, name in enumerate(class_names)}
    if class_names[1:] == ["liver", "tumour"]:
        out["liver+tumour"] = _figures(pred >= 1, gt >= 1, spacing, True)
    return out

"""Volumes in millilitres and lesion counts of one label map (what a clinician reads off a prediction).

* Volumes: voxel count × voxel volume (the spacing of the file read), given only when that spacing
  is plausible for a CT (its in-plane field of view, ``spacing_plausible``): a header with no or a
  stale spacing gives no millilitres rather than wrong ones; the figures say which spacing they used.
* ``liver_ml`` is the whole liver, tumour included (LiTS' convention: tumours lie inside the liver);
  ``tumour_burden`` = tumour volume / whole-liver volume.
* Lesions: 3D connected components of the tumour mask with 26-connectivity (voxels touching by a
  face, an edge or a corner are one lesion), as the LiTS benchmark counts them.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

CONNECTIVITY_26 = np.ones((3, 3, 3), bool)
FOV_MM = (150.0, 700.0)  # in-plane field of view of a body CT (child to extended-FOV reconstruction)


def components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components of a (Z, Y, X) mask, 26-connectivity: (labelled array, count)."""
    return ndimage.label(np.asarray(mask, bool), structure=CONNECTIVITY_26)


def field_of_view(spacing_zyx, shape_zyx) -> list[float]:
    """In-plane field of view (mm) along Y and X."""
    return [round(float(spacing_zyx[i]) * int(shape_zyx[i]), 1) for i in (1, 2)]


def spacing_plausible(spacing_zyx, shape_zyx) -> bool:
    """Whether the spacing can be a CT's: its in-plane field of view lies in ``FOV_MM``. A header
    left unchanged by a resampling (the shared lits-tiny: 64 × 0.66 mm = 42 mm) fails; adult abdominal
    CTs span about 250–500 mm. A crop of a real CT under 150 mm across fails too (no millilitres: a
    false refusal, said in the figures' ``field_of_view_mm``)."""
    return all(FOV_MM[0] <= f <= FOV_MM[1] for f in field_of_view(spacing_zyx, shape_zyx))


def _ml(count, voxel_ml: float | None):
    return None if voxel_ml is None else round(float(count) * voxel_ml, 4)


def case_volumes(labels: np.ndarray, spacing_zyx, classes: list[str]) -> dict:
    """Per-class volumes (ml) and, for liver/tumour models, whole liver, tumour, burden and lesions.
    With an implausible spacing (``spacing_plausible``) the millilitres are None; the burden and the
    lesion count need no spacing and stay."""
    plausible = spacing_plausible(spacing_zyx, labels.shape)
    voxel_ml = float(np.prod([float(s) for s in spacing_zyx])) / 1000.0 if plausible else None
    counts = np.bincount(labels.ravel(), minlength=len(classes))
    out = {"spacing_mm": [round(float(s), 4) for s in spacing_zyx], "spacing_plausible": plausible,
           "field_of_view_mm": field_of_view(spacing_zyx, labels.shape),
           "volumes_ml": {name: _ml(counts[i], voxel_ml) for i, name in enumerate(classes) if i}}
    if "liver" in classes and "tumour" in classes:
        liver, tumour = classes.index("liver"), classes.index("tumour")
        whole = int(counts[liver] + counts[tumour])
        out["liver_ml"], out["tumour_ml"] = _ml(whole, voxel_ml), _ml(counts[tumour], voxel_ml)
        out["tumour_burden"] = round(float(counts[tumour]) / whole, 5) if whole else None
        out["lesions"] = int(components(labels == tumour)[1])
    elif "liver" in classes:
        out["liver_ml"] = _ml(counts[classes.index("liver")], voxel_ml)
    return out


def volume_errors(pred: np.ndarray, ref: np.ndarray, spacing_zyx, classes: list[str]) -> dict:
    """Whole liver, tumour (ml) and tumour burden, predicted vs reference, with the absolute error."""
    p, r = case_volumes(pred, spacing_zyx, classes), case_volumes(ref, spacing_zyx, classes)
    out = {}
    for key in ("liver_ml", "tumour_ml", "tumour_burden"):
        if key in p:
            a, b = p[key], r[key]
            out[key] = {"predicted": a, "reference": b,
                        "abs_error": None if a is None or b is None else round(abs(a - b), 5)}
    return out

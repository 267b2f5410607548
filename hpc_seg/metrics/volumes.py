"""Volumes in millilitres and lesion counts of one label map (what a clinician reads off a prediction).

* Volumes: voxel count × voxel volume (the spacing of the file read; a header with wrong spacing
  gives wrong millilitres, and the figures say which spacing they used).
* ``liver_ml`` is the whole liver, tumour included (LiTS' convention: tumours lie inside the liver);
  ``tumour_burden`` = tumour volume / whole-liver volume.
* Lesions: 3D connected components of the tumour mask with 26-connectivity (voxels touching by a
  face, an edge or a corner are one lesion), as the LiTS benchmark counts them.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

CONNECTIVITY_26 = np.ones((3, 3, 3), bool)


def components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components of a (Z, Y, X) mask, 26-connectivity: (labelled array, count)."""
    return ndimage.label(np.asarray(mask, bool), structure=CONNECTIVITY_26)


def case_volumes(labels: np.ndarray, spacing_zyx, classes: list[str]) -> dict:
    """Per-class volumes (ml) and, for liver/tumour models, whole liver, tumour, burden and lesions."""
    voxel_ml = float(np.prod([float(s) for s in spacing_zyx])) / 1000.0
    counts = np.bincount(labels.ravel(), minlength=len(classes))
    out = {"spacing_mm": [round(float(s), 4) for s in spacing_zyx],
           "volumes_ml": {name: round(float(counts[i]) * voxel_ml, 4) for i, name in enumerate(classes) if i}}
    if "liver" in classes and "tumour" in classes:
        liver, tumour = classes.index("liver"), classes.index("tumour")
        whole = float(counts[liver] + counts[tumour]) * voxel_ml
        out["liver_ml"] = round(whole, 4)
        out["tumour_ml"] = round(float(counts[tumour]) * voxel_ml, 4)
        out["tumour_burden"] = round(float(counts[tumour]) * voxel_ml / whole, 5) if whole else None
        out["lesions"] = int(components(labels == tumour)[1])
    elif "liver" in classes:
        out["liver_ml"] = round(float(counts[classes.index("liver")]) * voxel_ml, 4)
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

"""Whole-volume inference: slice-wise (2D/2.5D) batches over a (C, Z, Y, X) volume, through the
model's preprocessing plan (``hpc_seg.data.plan``: the same code the training loader runs), the
probabilities resized back to the volume grid; optional mirror TTA (the mean over all four in-plane
mirrorings, as nnU-Net mirrors every axis); autocast on GPU; optional post-processing."""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from hpc_seg.data.plan import PreprocessingPlan, model_input, probabilities, to_case_grid
from hpc_seg.errors import HpcSegError


def _stack(image: np.ndarray, z: int, k: int) -> np.ndarray:
    idx = np.clip(np.arange(z - k // 2, z + k // 2 + 1), 0, image.shape[1] - 1)
    sl = image[:, idx]
    return sl.reshape(-1, *sl.shape[2:])


@torch.no_grad()
def predict_probs(model, plan: PreprocessingPlan, image: np.ndarray, device=torch.device("cpu"), amp_dtype=None,
                  tta: bool = False, batch_size: int = 16) -> np.ndarray:
    """Class probabilities (K, Z, Y, X) float32 for a raw (C, Z, Y, X) image (HU int16 or RGB uint8).

    Reads nothing but the image: no label, no statistics of the data at hand."""
    if plan.mode == "3d":
        raise HpcSegError("data.mode 3d: the registry has no 3D model, so there is no sliding-window 3D "
                          "inference; evaluate 2D/2.5D models")
    if image.shape[0] != plan.channels:
        raise HpcSegError(f"image has {image.shape[0]} channel(s), the model's plan expects {plan.channels}")
    k = plan.slices if plan.mode == "2.5d" else 1
    model = model.to(device).eval()
    depth, (h, w) = image.shape[1], image.shape[2:]
    out = np.zeros((plan.num_classes, depth, h, w), np.float32)

    def probs_of(x):
        return probabilities(plan, model(x))

    for start in range(0, depth, batch_size):
        zs = range(start, min(start + batch_size, depth))
        x = model_input(plan, np.stack([_stack(image, z, k) for z in zs])).to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            p = probs_of(x)
            if tta:
                p = (p + probs_of(x.flip(-1)).flip(-1) + probs_of(x.flip(-2)).flip(-2)
                     + probs_of(x.flip(-1, -2)).flip(-1, -2)) / 4
        out[:, start:start + len(zs)] = to_case_grid(p.float(), (h, w)).permute(1, 0, 2, 3).cpu().numpy()
    return out


def postprocess(labels: np.ndarray, liver: int = 1, tumour: int = 2) -> np.ndarray:
    """Keep the largest 3D connected liver(+tumour) component; tumour only inside it."""
    organ = labels > 0
    comp, n = ndimage.label(organ)
    if n <= 1:
        return labels
    sizes = ndimage.sum_labels(organ, comp, index=np.arange(1, n + 1))
    keep = comp == (int(np.argmax(sizes)) + 1)
    out = labels.copy()
    out[~keep] = 0
    return out

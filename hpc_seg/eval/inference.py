"""Whole-volume inference: slice-wise (2D/2.5D) batches over a (C, Z, Y, X) volume with the same
windowing/normalisation as training, resized to the model input and the probabilities resized
back to the volume grid; optional flip TTA; autocast on GPU; optional post-processing."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from hpc_seg.data.dataset import _foreground_stats
from hpc_seg.data.transforms import normalize_rgb, window_ct


def _stack(image: np.ndarray, z: int, k: int) -> np.ndarray:
    idx = np.clip(np.arange(z - k // 2, z + k // 2 + 1), 0, image.shape[1] - 1)
    sl = image[:, idx]
    return sl.reshape(-1, *sl.shape[2:])


@torch.no_grad()
def predict_probs(model, cfg, image: np.ndarray, device=torch.device("cpu"), amp_dtype=None, tta: bool = False,
                  batch_size: int = 16, stats: list[dict] | None = None) -> np.ndarray:
    """Class probabilities (K, Z, Y, X) float32 for a raw (C, Z, Y, X) image (HU int16 or RGB uint8)."""
    d = cfg.data
    if d.mode == "3d":
        from hpc_seg.errors import HpcSegError

        raise HpcSegError("data.mode 3d: the registry has no 3D model, so there is no sliding-window 3D "
                          "inference; evaluate 2D/2.5D models")
    k = d.slices if d.mode == "2.5d" else 1
    rgb = d.dataset == "kvasir"
    mean, std = _foreground_stats(stats, d.window) if stats else (float(np.mean(d.window)), 1.0)
    model = model.to(device).eval()
    depth, (h, w) = image.shape[1], image.shape[2:]
    out = np.zeros((d.num_classes, depth, h, w), np.float32)
    for start in range(0, depth, batch_size):
        zs = range(start, min(start + batch_size, depth))
        raw = np.stack([_stack(image, z, k) for z in zs])
        x = normalize_rgb(raw.reshape(-1, *raw.shape[2:]), d.rgb_mean, d.rgb_std).reshape(raw.shape) if rgb \
            else window_ct(raw, d.window, d.normalize, mean, std)
        x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        if tuple(x.shape[-2:]) != tuple(d.size):  # as the training loader: antialiased bilinear
            x = F.interpolate(x, size=tuple(d.size), mode="bilinear", align_corners=False, antialias=True)
        x = x.to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            p = model(x).float().softmax(1)
            if tta:
                p = p + model(x.flip(-1)).float().softmax(1).flip(-1)
                p = p + model(x.flip(-2)).float().softmax(1).flip(-2)
                p = p / 3
        if tuple(p.shape[-2:]) != (h, w):
            p = F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False)
        out[:, start:start + len(zs)] = p.permute(1, 0, 2, 3).cpu().numpy()
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

"""Label resizing and CPU augmentation of (C, H, W) / (C, D, H, W) samples.

Intensity normalisation and image resizing are the preprocessing plan's (``preprocessing/plan.py``).
All randomness comes from a ``numpy.random.Generator`` passed in, so a sample is a pure function
of (seed, epoch, index) whatever DataLoader worker computes it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def resize_label(label: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize the last two dims of a label map (nearest-exact)."""
    if tuple(label.shape[-2:]) == tuple(size):
        return label
    lab = label.reshape(1, -1, *label.shape[-2:]).float()
    lab = F.interpolate(lab, size=tuple(size), mode="nearest-exact")
    return lab.reshape(*label.shape[:-2], *size).long()


def augment(image: torch.Tensor, label: torch.Tensor, rng: np.random.Generator, cfg):
    """Flips, small rotation/scale (one affine resample) and intensity jitter; in-plane only."""
    if cfg.flip:
        for dim in (-1, -2):
            if rng.random() < 0.5:
                image, label = image.flip(dim), label.flip(dim)
    if rng.random() < cfg.p and (cfg.rotate_deg > 0 or cfg.scale > 0):
        angle = math.radians(rng.uniform(-cfg.rotate_deg, cfg.rotate_deg))
        zoom = rng.uniform(1 - cfg.scale, 1 + cfg.scale)
        image, label = _affine(image, label, angle, zoom)
    if cfg.intensity > 0:
        contrast = 1.0 + rng.uniform(-cfg.intensity, cfg.intensity)
        brightness = rng.uniform(-cfg.intensity, cfg.intensity)
        image = image * contrast + brightness
    return image.contiguous(), label.contiguous()


def _affine(image: torch.Tensor, label: torch.Tensor, angle: float, zoom: float):
    h, w = image.shape[-2:]
    cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
    theta = torch.tensor([[cos, -sin * h / w, 0.0], [sin * w / h, cos, 0.0]], dtype=torch.float32)
    img = image.reshape(1, -1, h, w)
    grid = F.affine_grid(theta[None], list(img.shape), align_corners=False)
    img = F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)
    lab = label.reshape(1, -1, h, w).float()
    lab = F.grid_sample(lab, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return img.reshape(image.shape), lab.reshape(label.shape).long()

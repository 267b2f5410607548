"""Kvasir-SEG polyps: ``images/NAME.jpg`` + ``masks/NAME.jpg`` (masks thresholded at 127);
labels 0 background, 1 polyp; RGB standardised with ImageNet statistics; 2D only.

Jha et al., "Kvasir-SEG: A Segmented Polyp Dataset", MMM 2020.
"""

from __future__ import annotations

from pathlib import Path

from hpc_seg.ingest.kinds.base import CaseSource, DatasetKind, Discovered, register
from hpc_seg.ingest.kinds.common import load_rgb, require_dir
from hpc_seg.errors import InputDataError

EXTS = {".jpg", ".jpeg", ".png"}


def discover(src: Path) -> Discovered:
    require_dir(src, "Kvasir-SEG layout: images/ + masks/")
    img_dir, mask_dir = src / "images", src / "masks"
    if not img_dir.is_dir() or not mask_dir.is_dir():
        raise InputDataError(src, "not a Kvasir-SEG directory (images/ and masks/ expected)")
    imgs = {p.stem: p for p in img_dir.iterdir() if p.suffix.lower() in EXTS}
    masks = {p.stem: p for p in mask_dir.iterdir() if p.suffix.lower() in EXTS}
    if not imgs and not masks:
        raise InputDataError(img_dir, "no .jpg images found")
    cases = [CaseSource(stem, imgs.get(stem), masks.get(stem)) for stem in sorted(set(imgs) | set(masks))]
    return Discovered(cases, ["background", "polyp"])


KVASIR = register(DatasetKind("kvasir", "RGB", ("background", "polyp"), discover, load_rgb, normalize="rgb",
                              rgb_mean=(0.485, 0.456, 0.406), rgb_std=(0.229, 0.224, 0.225), modes=("2d",)))

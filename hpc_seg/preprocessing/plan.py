"""The preprocessing plan: everything that turns stored voxels into model input and model output
back into labels, decided once and carried with the model (nnU-Net's "plans").

Life of a plan:

1. ``hpc-seg split`` / ``hpc-seg prepare`` compute one per split seed from the store's kind facts
   and the statistics of the **training cases only**, and keep it in the store's metadata
   (``STORE/meta/plans/seed<S>``).
2. ``hpc-seg train`` resolves it with the config's choices (mode, slices, input size, window /
   normalisation overrides, one-logit or softmax output) and writes it to ``RUN_DIR/plan.json``.
3. ``hpc-seg export`` embeds that file in the ``.safetensors`` metadata; ``evaluate`` and
   ``predict`` use the plan inside the model, never one recomputed from the data at hand.

The functions below (:func:`model_input`, :func:`probabilities`, :func:`to_case_grid`) are the one
implementation of that contract, used by the training loader, validation, ``evaluate`` and
``predict`` alike.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from hpc_seg.errors import PlanError

PLAN_VERSION = 1
PLAN_FILE = "plan.json"


@dataclass(frozen=True)
class PreprocessingPlan:
    """Args (all stored; see the module docstring for who sets what):
        kind, modality, classes, channels: the data (channels per slice; CT 1, RGB 3).
        split_seed, train_cases, train_digest: which split the statistics came from
            (digest = sha256 of the sorted training case ids).
        foreground: pooled statistics of the training cases' labelled voxels (CT): voxels, mean,
            std, p0.5, p99.5 in HU; empty when the training cases have no foreground or for RGB.
        window: HU clip range (CT) or None (RGB).
        normalize: ``minmax``, ``zscore`` or ``rgb``.
        offset, scale: per channel; model input = (clip(raw, window) - offset) / scale.
        mode, slices, patch_depth, size: sampling (``2d`` / ``2.5d`` with ``slices`` / ``3d``)
            and the model's input size (H, W); None until a training config resolves the plan.
        output: ``softmax`` (one logit per class) or ``sigmoid`` (one logit, binary).
        merge: class → the class it lies inside (LiTS: tumour → liver), for cases that do not
            annotate it (``hpc_seg.preprocessing.labels``).
        to_case_grid: how outputs return to the case grid.
        crop: None (whole slices), or ``{"around": [class names], "margin": fraction}``: the model
            sees the box around those classes grown by ``margin`` of its extent per axis
            (``hpc_seg.preprocessing.crop``; a cascade's stage 2: the box of stage 1's prediction
            at inference, of the reference at training).
    """

    kind: str
    modality: str
    classes: tuple[str, ...]
    channels: int
    split_seed: int
    train_cases: int
    train_digest: str
    foreground: dict = field(default_factory=dict)
    window: Optional[tuple[float, float]] = None
    normalize: str = "minmax"
    offset: tuple[float, ...] = (0.0,)
    scale: tuple[float, ...] = (1.0,)
    mode: Optional[str] = None
    slices: int = 1
    patch_depth: int = 0
    size: Optional[tuple[int, int]] = None
    output: str = "softmax"
    merge: dict = field(default_factory=dict)
    to_case_grid: str = "probabilities resized bilinearly to each slice's (Y, X) grid, argmax; slices map 1:1"
    crop: Optional[dict] = None
    version: int = PLAN_VERSION

    # -------------------------------------------------------------- derived facts
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return input_channels(self.channels, self.mode, self.slices)

    @property
    def out_channels(self) -> int:
        return output_channels(self.num_classes, self.output)

    # -------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["crop"] is None:  # a plan without a crop reads as before: hpc-seg 0.3 knows no 'crop' key
            del d["crop"]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: dict, source: str = "<plan>") -> "PreprocessingPlan":
        if not isinstance(d, dict) or "version" not in d:
            raise PlanError(f"{source}: not a preprocessing plan (no version)")
        if d["version"] != PLAN_VERSION:
            raise PlanError(f"{source}: preprocessing plan version {d['version']}, this hpc-seg reads version "
                            f"{PLAN_VERSION}; re-run 'hpc-seg prepare' (store) or retrain (model)")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise PlanError(f"{source}: unknown plan keys {unknown}")
        d = dict(d)
        for key in ("classes", "offset", "scale", "window", "size"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d)

    # -------------------------------------------------------------- resolving with a config
    def resolve(self, data_cfg, loss_kind: str = "dice_ce") -> "PreprocessingPlan":
        """This plan with a training config's choices; errors name the config key."""
        d = data_cfg
        if self.modality == "RGB" and d.mode != "2d":
            raise PlanError(f"data.mode must be '2d' for {self.kind} (single RGB images), got '{d.mode}'")
        output = output_activation(loss_kind)
        if output == "sigmoid" and self.num_classes != 2:
            raise PlanError(f"loss.kind bce_dice is for binary tasks (one logit); {self.kind} has "
                            f"{self.num_classes} classes {list(self.classes)}: use dice_ce")
        window = tuple(d.window) if d.window is not None else self.window
        if self.modality == "RGB" and d.window is not None:
            raise PlanError("data.window is an HU window for CT; RGB data has none")
        normalize = d.normalize or self.normalize
        crop = None
        if getattr(d, "crop_around", None):
            unknown = [c for c in d.crop_around if c not in self.classes or c == self.classes[0]]
            if unknown:
                raise PlanError(f"data.crop_around {unknown}: not foreground classes of {self.kind} {list(self.classes)}")
            crop = {"around": list(d.crop_around), "margin": float(d.crop_margin)}
        plan = dataclasses.replace(self, window=window, normalize=normalize, mode=d.mode,
                                   slices=d.slices if d.mode == "2.5d" else 1,
                                   patch_depth=d.patch_depth if d.mode == "3d" else 0,
                                   size=tuple(d.size), output=output, crop=crop)
        return _with_normalisation(plan, d)


# ------------------------------------------------------------------ the model's channels (one rule)
def input_channels(channels: int, mode: str | None, slices: int) -> int:
    """Model input channels: the data's channels per slice, times the k slices of a 2.5D sample."""
    return channels * (slices if mode == "2.5d" else 1)


def output_activation(loss_kind: str) -> str:
    """``sigmoid`` (one logit, binary) for ``bce_dice``, else ``softmax`` (one logit per class)."""
    return "sigmoid" if loss_kind == "bce_dice" else "softmax"


def output_channels(num_classes: int, output: str) -> int:
    """Model output channels: one logit for ``sigmoid``, one per class (background included) for ``softmax``."""
    return 1 if output == "sigmoid" else num_classes


def _with_normalisation(plan: PreprocessingPlan, d=None, rgb: tuple | None = None) -> PreprocessingPlan:
    """Fill window/offset/scale from the normalisation choice and the training statistics
    (``rgb``: (mean, std) in [0, 1] units; default: the config's, else the plan's own)."""
    fg, c = plan.foreground, plan.channels
    if plan.normalize == "rgb" and plan.modality != "RGB":
        raise PlanError(f"data.normalize 'rgb' is for RGB images; {plan.kind} is {plan.modality}: use minmax or zscore")
    if plan.normalize == "rgb":
        if rgb is None and d is not None and d.rgb_mean is not None:
            rgb = (d.rgb_mean, d.rgb_std or [1.0] * c)
        if rgb is None:
            return dataclasses.replace(plan, window=None)
        mean, std = list(rgb[0]), list(rgb[1])
        if len(mean) != c or len(std) != c:
            raise PlanError(f"data.rgb_mean/rgb_std need {c} values each, got {mean} / {std}")
        return dataclasses.replace(plan, window=None, offset=tuple(255.0 * m for m in mean),
                                   scale=tuple(255.0 * s for s in std))
    if plan.modality == "RGB":
        raise PlanError(f"data.normalize '{plan.normalize}' is for CT; RGB data uses 'rgb'")
    window = plan.window or ((fg["p0.5"], fg["p99.5"]) if "p0.5" in fg else None)
    if window is None:
        raise PlanError("no intensity window: the kind has no default, data.window is unset and the training "
                        "cases have no labelled voxels to take it from; set data.window: [low, high]")
    lo, hi = float(window[0]), float(window[1])
    if plan.normalize == "minmax":
        offset, scale = lo, hi - lo
    elif fg:
        offset, scale = float(np.clip(fg["mean"], lo, hi)), float(max(fg["std"], 1.0))
    else:  # no labelled voxel in the training cases: the window's centre and a quarter of its width
        offset, scale = (lo + hi) / 2, (hi - lo) / 4
    return dataclasses.replace(plan, window=(lo, hi), offset=(offset,) * c, scale=(scale,) * c)


# ------------------------------------------------------------------ computing a store's plan
def pooled_foreground(stats: list[dict]) -> dict:
    """Pooled foreground statistics (channel 0) over cases: voxel count, mean, std, p0.5, p99.5.

    Mean and std pool exactly; the percentiles are voxel-weighted means of the cases' own."""
    n = np.array([sum(s["label_counts"][1:]) for s in stats], dtype=np.float64)
    keep = [i for i, s in enumerate(stats) if n[i] > 0 and "foreground_mean" in s]
    if not keep:
        return {}
    n = n[keep]
    means = np.array([stats[i]["foreground_mean"][0] for i in keep])
    stds = np.array([stats[i]["foreground_std"][0] for i in keep])
    mean = float((n * means).sum() / n.sum())
    var = float((n * (stds ** 2 + (means - mean) ** 2)).sum() / n.sum())
    out = {"voxels": int(n.sum()), "mean": mean, "std": float(np.sqrt(var))}
    for q in ("0.5", "99.5"):
        vals = [stats[i].get("foreground_percentiles", {}).get(q, [None])[0] for i in keep]
        if all(v is not None for v in vals):
            out[f"p{q}"] = float((n * np.array(vals)).sum() / n.sum())
    return out


def plan_from_split(info: dict, index: dict, split: dict, seed: int) -> PreprocessingPlan:
    """The store-level plan of one split: kind facts + statistics of its training cases only."""
    train = sorted(split["train"])
    digest = hashlib.sha256("\n".join(train).encode()).hexdigest()
    defaults = info.get("defaults") or {}
    fg = pooled_foreground([index["cases"][c]["stats"] for c in train]) if info["modality"] == "CT" else {}
    window = tuple(defaults["window"]) if defaults.get("window") else None
    plan = PreprocessingPlan(kind=info["kind"], modality=info["modality"], classes=tuple(info["classes"]),
                             channels=int(info["channels"]), split_seed=seed, train_cases=len(train),
                             train_digest=digest, foreground=fg, window=window,
                             normalize=defaults.get("normalize") or "minmax", merge=dict(info.get("merge") or {}))
    if plan.normalize == "rgb":
        return _with_normalisation(plan, rgb=(defaults["rgb_mean"], defaults["rgb_std"]))
    if window is None and "p0.5" not in fg:
        return plan  # resolved later with data.window from the config
    return _with_normalisation(plan)


def plan_key(seed: int) -> str:
    return f"plans/seed{seed}"


def write_plan(store, plan: PreprocessingPlan) -> str:
    from hpc_seg.storage.store import write_meta

    return write_meta(store, plan_key(plan.split_seed), plan.to_dict())


def read_plan(store, seed: int) -> PreprocessingPlan:
    from hpc_seg.storage.store import read_meta

    d = read_meta(store, plan_key(seed))
    if d is None:
        raise PlanError(f"{store}: no preprocessing plan for split seed {seed}; run "
                        f"'hpc-seg split {store} --seed {seed}' (or 'hpc-seg prepare')")
    return PreprocessingPlan.from_dict(d, source=f"{store} (meta/{plan_key(seed)})")


def read_run_plan(run_dir) -> PreprocessingPlan:
    path = Path(run_dir) / PLAN_FILE
    if not path.is_file():
        raise PlanError(f"{run_dir}: run directory has no {PLAN_FILE} (made before preprocessing plans existed, "
                        f"hpc-seg 0.1); retrain it with this hpc-seg")
    try:
        d = json.loads(path.read_text())
    except ValueError as exc:
        raise PlanError(f"{path}: not valid JSON ({exc})") from None
    return PreprocessingPlan.from_dict(d, source=str(path))


# ------------------------------------------------------------------ the one implementation
def model_input(plan: PreprocessingPlan, raw: np.ndarray) -> torch.Tensor:
    """Raw stored voxels → model input.

    ``raw``: (N, C*k, H, W) int16 HU / uint8 RGB (2D, 2.5D: channel-major, k slices per channel)
    or (N, C, D, H, W) (3D). Returns float32 (…, *plan.size): windowed, normalised, resized
    (antialiased bilinear)."""
    x = raw.astype(np.float32)
    if plan.window is not None:
        x = np.clip(x, plan.window[0], plan.window[1])
    reps = x.shape[1] // plan.channels
    shape = (1, -1) + (1,) * (x.ndim - 2)
    offset = np.repeat(np.asarray(plan.offset, np.float32), reps).reshape(shape)
    scale = np.repeat(np.asarray(plan.scale, np.float32), reps).reshape(shape)
    t = torch.from_numpy(np.ascontiguousarray((x - offset) / np.maximum(scale, 1e-6)))
    if tuple(t.shape[-2:]) != tuple(plan.size):
        lead = t.shape[:-2]
        t = F.interpolate(t.reshape(lead[0], -1, *t.shape[-2:]), size=tuple(plan.size), mode="bilinear",
                          align_corners=False, antialias=True).reshape(*lead, *plan.size)
    return t


def probabilities(plan: PreprocessingPlan, logits: torch.Tensor) -> torch.Tensor:
    """Logits → per-class probabilities (N, K, …): softmax, or [1 - σ, σ] for one logit."""
    logits = logits.float()
    if plan.output == "sigmoid":
        p = logits.sigmoid()
        return torch.cat([1 - p, p], dim=1)
    return logits.softmax(1)


def to_case_grid(probs: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(N, K, h, w) probabilities → (N, K, H, W) on the case's slice grid."""
    if tuple(probs.shape[-2:]) == tuple(hw):
        return probs
    return F.interpolate(probs, size=tuple(hw), mode="bilinear", align_corners=False)

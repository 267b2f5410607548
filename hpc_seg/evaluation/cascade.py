"""A liver → tumour cascade as one model: loading, export to one file, and inference.

* A cascade run directory holds the cascade config (``config.yaml``, ``cascade.enabled: true``) and
  one ordinary run directory per stage (``stage1/``, ``stage2/``, ``hpc_seg.config.cascade``).
* ``export`` writes **one** ``.safetensors`` file: both stages' weights (keys ``stage1.…`` and
  ``stage2.…``), the cascade config, stage 1's plan (``plan``) and stage 2's (``plan_stage2``, with
  its crop). ONNX holds one graph per file: a cascade is refused there, in one line.
* Inference (:func:`case_labels`, used by ``evaluate`` and ``predict``): stage 1 on the whole case,
  its organ (the classes of ``plan_stage2.crop["around"]``: the 26-connected components of at least
  a tenth of the largest one's size, :func:`main_components`), their box
  grown by the plan's margin (``hpc_seg.preprocessing.crop``), stage 2 on the cropped sub-volume,
  its labels pasted into an all-background case. No organ found: all background.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import yaml

from hpc_seg.config import Config, to_dict
from hpc_seg.config.cascade import STAGES, stage_configs
from hpc_seg.config.loader import from_dict, rename_former_keys
from hpc_seg.distributed.consolidate import consolidated_state_dict
from hpc_seg.errors import HpcSegError, PlanError
from hpc_seg.evaluation.inference import LabelPrediction, predict_labels
from hpc_seg.metrics.volumes import components
from hpc_seg.evaluation.model_io import _model_for, load_for_eval, resolve_checkpoint, run_config
from hpc_seg.preprocessing.crop import class_mask, crop_box, organ_box
from hpc_seg.preprocessing.plan import PreprocessingPlan, read_run_plan
from hpc_seg.storage.atomic import atomic_write_bytes

MIN_COMPONENT_SHARE = 0.1  # stage 1's organ parts kept for the box, as a share of the largest part


class Cascade(torch.nn.Module):
    """Stage 1 (the organ, on whole slices) and stage 2 (inside the organ's box), with their plans."""

    def __init__(self, stage1: torch.nn.Module, plan1: PreprocessingPlan, stage2: torch.nn.Module,
                 plan2: PreprocessingPlan):
        super().__init__()
        if list(plan1.classes) != list(plan2.classes) or not plan2.crop:
            raise PlanError(f"cascade: stage 2 must crop (plan.crop) and share stage 1's classes {list(plan1.classes)}")
        self.stage1, self.stage2, self.plan1, self.plan2 = stage1.eval(), stage2.eval(), plan1, plan2


def is_cascade_dir(path: Path) -> bool:
    """A run directory whose config is a cascade (whether or not both stages have run yet)."""
    cfg = Path(path) / "config.yaml"
    if not cfg.is_file():
        return False
    raw = yaml.safe_load(cfg.read_text()) or {}
    return bool((raw.get("cascade") or {}).get("enabled"))


def load_model(source: str | Path, tag: str = "best", prefer_gpu: bool = True):
    """(model, config, plan) as ``model_io.load_for_eval``, a cascade (run directory or export) included:
    its model is a :class:`Cascade`, its plan stage 1's (whole cases in, labels out)."""
    source = Path(source)
    if source.is_dir() and is_cascade_dir(source):
        cfg = run_config(source)
        stages = []
        for name in STAGES:
            if not (source / name / "plan.json").is_file():
                raise HpcSegError(f"{source / name}: this cascade stage has not been trained yet")
            model, _, plan = load_for_eval(source / name, tag, prefer_gpu)
            stages += [model, plan]
        return Cascade(*stages), cfg, stages[1]
    if source.is_file() and source.suffix.lower() == ".safetensors" and _is_cascade_file(source):
        return _load_file(source)
    model, cfg, plan = load_for_eval(source, tag, prefer_gpu)
    if plan.crop:
        raise PlanError(f"{source}: this model sees crops around {plan.crop['around']} (a cascade's stage 2); "
                        "run it inside its cascade (the cascade's run directory or export)")
    return model, cfg, plan


def _is_cascade_file(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return "plan_stage2" in (f.metadata() or {})
    except Exception:  # not readable: load_for_eval says why in one line
        return False


def _load_file(source: Path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(source), framework="pt") as f:
        meta = f.metadata()
    state = load_file(str(source))
    cfg = from_dict(Config, rename_former_keys(Config, yaml.safe_load(meta["config"]), warn=False),
                    source=f"{source} (embedded config)")
    plans = [PreprocessingPlan.from_dict(json.loads(meta[k]), source=f"{source} ({k})") for k in ("plan", "plan_stage2")]
    stages = []
    derived = dict(stage_configs(cfg, str(source)))
    for name, plan in zip(STAGES, plans):  # each stage built from the config it was trained with
        if f"config_{name}" not in meta:  # an export without them: the stage as the cascade config derives it
            stage_cfg = derived[name]
        else:
            stage_cfg = from_dict(Config, rename_former_keys(Config, yaml.safe_load(meta[f"config_{name}"]),
                                                             warn=False), source=f"{source} (config_{name})")
        part = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
        stages += [_model_for(stage_cfg, plan, part, f"{source} ({name})"), plan]
    return Cascade(*stages), cfg, plans[0]


def export(run_dir: str | Path, out: str | Path, tag: str = "best") -> Path:
    """A cascade run directory → one ``.safetensors`` file with both stages and both plans."""
    from safetensors.torch import save

    from hpc_seg.evaluation.onnx_io import is_onnx

    run_dir = Path(run_dir)
    if is_onnx(out):
        raise HpcSegError(f"{out}: a cascade exports to one .safetensors file (both stages, both plans); ONNX "
                          "holds one graph, and a cascade file for onnxruntime is not built yet")
    cfg = run_config(run_dir)
    state, meta = {}, {"config": yaml.safe_dump(to_dict(cfg), sort_keys=False)}
    for name, key in zip(STAGES, ("plan", "plan_stage2")):
        stage_cfg = run_config(run_dir / name)  # as the stage was trained: the file and the directory agree
        meta[f"config_{name}"] = yaml.safe_dump(to_dict(stage_cfg), sort_keys=False)
        plan = read_run_plan(run_dir / name)
        root, stage_tag = resolve_checkpoint(run_dir / name, tag)
        part = consolidated_state_dict(root, stage_tag)
        _model_for(stage_cfg, plan, part, str(root / stage_tag))  # weights that do not fit are refused here
        state.update({f"{name}.{k}": v.contiguous() for k, v in part.items()})
        meta[key], meta[f"checkpoint_{name}"] = plan.to_json(), str(root / stage_tag)
    return atomic_write_bytes(out, save(state, metadata=meta))


def cascade_labels(model: Cascade, image: np.ndarray, device, amp, tta: bool) -> np.ndarray:
    """(Z, Y, X) labels of a raw (C, Z, Y, X) case: stage 1's organ, its box, stage 2 inside it."""
    p1, p2 = model.plan1, model.plan2
    first = predict_labels(model.stage1, p1, image, device, amp, tta=tta).labels
    box = organ_box(main_components(class_mask(first, p1.classes, p2.crop["around"])))
    out = np.zeros(first.shape, np.uint8)
    if box is None:
        return out
    cut = crop_box(box, first.shape, p2.crop["margin"])
    sub = np.ascontiguousarray(image[(slice(None), *cut)])
    out[cut] = predict_labels(model.stage2, p2, sub, device, amp, tta=tta).labels
    return out


def main_components(mask: np.ndarray, share: float = MIN_COMPONENT_SHARE) -> np.ndarray:
    """The organ's components (26-connectivity) of at least ``share`` of the largest one's voxels:
    stray false positives leave the box, a liver that stage 1 split in two keeps both parts."""
    comp, n = components(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(comp.ravel())[1:]
    return np.isin(comp, 1 + np.flatnonzero(sizes >= share * sizes.max()))


def case_labels(model, plan: PreprocessingPlan, image: np.ndarray, device, amp=None, tta: bool = False,
                score_classes: list[int] | None = None, bins: int = 1000) -> LabelPrediction:
    """The labels of one case for any model: a cascade's (no PR scores: its probabilities live in two
    grids), else ``predict_labels``."""
    if isinstance(model, Cascade):
        return LabelPrediction(cascade_labels(model, image, device, amp, tta), None, bins)
    return predict_labels(model, plan, image, device, amp, tta=tta, score_classes=score_classes, bins=bins)

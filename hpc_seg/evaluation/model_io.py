"""Sharded checkpoint → one fp32 ``.safetensors`` file with the config embedded, and loading a
model for evaluation from either that file or a run directory (no DeepSpeed engine, no
process group, CPU or one GPU).

    hpc-seg export RUN_DIR --out model.safetensors [--tag best|latest|stepNNNNNNNN]

A run directory without ``plan.json`` or a model without an embedded plan (both made by hpc-seg 0.1,
before preprocessing plans) is refused with one line: retrain the run, re-export the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from hpc_seg.config import Config, to_dict
from hpc_seg.config.loader import from_dict, rename_former_keys
from hpc_seg.errors import PlanError
from hpc_seg.preprocessing.plan import PreprocessingPlan, read_run_plan
from hpc_seg.distributed.checkpoint import CheckpointManager
from hpc_seg.distributed.consolidate import consolidated_state_dict
from hpc_seg.errors import HpcSegError
from hpc_seg.storage.atomic import atomic_write_bytes


def resolve_checkpoint(run_dir: Path, tag: str = "best") -> tuple[Path, str]:
    """``best`` (falling back to ``latest``), ``latest`` or an explicit tag; verified."""
    root = Path(run_dir) / "checkpoints"
    mgr = CheckpointManager(root, 0, 1)
    if tag in ("best", "latest"):
        pointer = root / tag
        if not pointer.is_file() and tag == "best":
            pointer = root / "latest"
        if not pointer.is_file():
            raise HpcSegError(f"{root}: no checkpoint found (no '{tag}' pointer)")
        tag = pointer.read_text().strip()
    problem = mgr.verify(tag)
    if problem:
        raise HpcSegError(f"{root / tag}: checkpoint is damaged or incomplete ({problem})")
    return root, tag


def run_config(run_dir: Path) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise HpcSegError(f"{run_dir}: not a run directory (no config.yaml)")
    return from_dict(Config, rename_former_keys(Config, yaml.safe_load(path.read_text()), warn=False), source=str(path))


def _model_for(cfg: Config, plan: PreprocessingPlan, state: dict, source: str):
    from hpc_seg.models import build_from_config

    m = cfg.model
    model = build_from_config(cfg, plan, pretrained=False)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes differ: weights of another model or plan
        raise HpcSegError(f"{source}: weights do not fit model {m.name}/{m.size} {m.overrides} with "
                          f"{plan.in_channels} input / {plan.out_channels} output channels: "
                          f"{str(exc).splitlines()[-1].strip()}") from None
    if result.missing_keys or result.unexpected_keys:
        raise HpcSegError(f"{source}: weights do not fit model {m.name}/{m.size} {m.overrides} "
                          f"(missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})")
    return model.eval()


def export(run_dir: str | Path, out: str | Path, tag: str = "best") -> Path:
    """Consolidate ZeRO shards (any stage, any world size) into ``out`` with the config and the
    run's preprocessing plan (``RUN_DIR/plan.json``) embedded: ``.safetensors`` (fp32 weights) or
    ``.onnx`` (the graph, ``hpc_seg.evaluation.onnx_io``)."""
    from safetensors.torch import save

    from hpc_seg.evaluation.onnx_io import export_onnx, is_onnx, require_onnx

    run_dir = Path(run_dir)
    if is_onnx(out):
        require_onnx(out)  # before minutes of consolidation
    cfg = run_config(run_dir)
    plan = read_run_plan(run_dir)
    if plan.crop:
        raise PlanError(f"{run_dir}: a cascade's stage 2 (it sees crops around {plan.crop['around']}); export the "
                        "cascade's run directory, which holds both stages")
    root, tag = resolve_checkpoint(run_dir, tag)
    state = consolidated_state_dict(root, tag)
    model = _model_for(cfg, plan, state, str(root / tag))  # refuse to write weights that do not fit the config
    if is_onnx(out):
        return export_onnx(model, cfg, plan, out)
    meta = {"config": yaml.safe_dump(to_dict(cfg), sort_keys=False), "plan": plan.to_json(),
            "checkpoint": str(root / tag), "manifest": json.dumps(CheckpointManager.manifest(root, tag).get("step"))}
    data = save({k: v.contiguous() for k, v in state.items()}, metadata=meta)
    return atomic_write_bytes(out, data)


def load_for_eval(source: str | Path, tag: str = "best", prefer_gpu: bool = True):
    """(model in eval mode, config, preprocessing plan) from a ``.safetensors`` or ``.onnx`` export or a
    run directory; a model without a plan (made before plans existed) is refused with what to do."""
    source = Path(source)
    if source.is_dir():
        cfg = run_config(source)
        plan = read_run_plan(source)
        root, tag = resolve_checkpoint(source, tag)
        return _model_for(cfg, plan, consolidated_state_dict(root, tag), str(root / tag)), cfg, plan
    if not source.is_file():
        raise HpcSegError(f"{source}: no such model file or run directory")
    if source.suffix.lower() == ".onnx":
        from hpc_seg.evaluation.onnx_io import load_onnx

        return load_onnx(source, prefer_gpu)
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(source), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(source))
    except Exception as exc:
        raise HpcSegError(f"{source}: not a readable .safetensors file ({exc})") from None
    if "config" not in meta:
        raise HpcSegError(f"{source}: no embedded config (was it written by 'hpc-seg export'?)")
    if "plan" not in meta:
        raise PlanError(f"{source}: model has no embedded preprocessing plan (exported before plans existed, "
                        f"hpc-seg 0.1); re-export it with this hpc-seg (hpc-seg export RUN_DIR --out {source.name})")
    try:
        plan_dict = json.loads(meta["plan"])
    except ValueError as exc:
        raise PlanError(f"{source}: embedded preprocessing plan is not valid JSON ({exc})") from None
    plan = PreprocessingPlan.from_dict(plan_dict, source=f"{source} (embedded plan)")
    cfg = from_dict(Config, rename_former_keys(Config, yaml.safe_load(meta["config"]), warn=False),
                    source=f"{source} (embedded config)")
    return _model_for(cfg, plan, state, str(source)), cfg, plan


def device_and_dtype(prefer_gpu: bool = True, model=None):
    """Where torch runs inference and its autocast dtype; a model that runs on the host (an ONNX
    graph in onnxruntime, which picks its own device) keeps the torch side there in fp32."""
    if getattr(model, "runs_on_host", False):
        return torch.device("cpu"), None
    if prefer_gpu and torch.cuda.is_available():
        return torch.device("cuda"), (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    return torch.device("cpu"), None


def inference_settings(cfg, tta: bool | None, postprocess: bool | None) -> tuple[bool, bool]:
    """(tta, postprocess): what the caller asked for, else the model config's ``inference`` section."""
    return (cfg.inference.tta if tta is None else tta,
            cfg.inference.postprocess if postprocess is None else postprocess)

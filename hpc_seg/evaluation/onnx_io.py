"""ONNX export with the preprocessing plan inside, and running it through onnxruntime.

    hpc-seg export RUN_DIR --out model.onnx [--tag best]
    hpc-seg predict model.onnx ct.nii.gz --out pred.nii.gz

One self-contained file: the weights are initialisers of the graph (no external ``.data`` file: the
models are far below protobuf's 2 GB limit), written by PyTorch's TorchScript exporter
(``dynamo=False``: it needs no ``onnxscript``), opset 17. The batch dimension is dynamic, and height
and width too where the model pads to a multiple (``spatial_multiple``); hpc-seg feeds the plan's
model input size, to which the plan resizes every slice. The model properties carry what turns a CT into model input and logits back
into labels: ``hpc_seg.plan`` (the preprocessing plan, JSON), ``hpc_seg.plan_version``,
``hpc_seg.inference`` (TTA and post-processing settings), ``hpc_seg.config`` (YAML) and
``hpc_seg.version``; ``InferenceSession.get_modelmeta().custom_metadata_map`` reads them back.

Running it needs onnxruntime, not DeepSpeed: :class:`OnnxModel` is a module that hands each batch
to an ``InferenceSession`` (CUDA where onnxruntime has it, else CPU), so the one inference code path
(``hpc_seg.evaluation.inference``) serves both formats.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import yaml

from hpc_seg import __version__
from hpc_seg.config import Config, to_dict
from hpc_seg.config.loader import from_dict, rename_former_keys
from hpc_seg.errors import HpcSegError, PlanError
from hpc_seg.preprocessing.plan import PLAN_VERSION, PreprocessingPlan
from hpc_seg.storage.atomic import atomic_write_bytes

OPSET = 17
INPUT, OUTPUT = "image", "logits"


def is_onnx(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".onnx"


def require_onnx(out: str | Path) -> None:
    """Before any work: exporting needs the ``onnx`` package."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise HpcSegError(f"{out}: exporting to ONNX needs the onnx package (pip install 'hpc-seg[onnx]')") from None


def export_onnx(model: torch.nn.Module, cfg: Config, plan: PreprocessingPlan, out: str | Path) -> Path:
    """``model`` (eval mode, fp32) → one ONNX file at ``out`` with the plan in its metadata."""
    import io
    import warnings

    require_onnx(out)
    import onnx

    example = torch.zeros(1, plan.in_channels, *plan.size)
    multiple = spatial_multiple(model, plan)
    axes = {0: "batch", 2: "height", 3: "width"} if multiple else {0: "batch"}
    buf = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice, not the user's concern
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (example,), buf, dynamo=False, opset_version=OPSET,
                          input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: axes, OUTPUT: axes})
    proto = onnx.load_from_string(buf.getvalue())
    onnx.helper.set_model_props(proto, {
        "hpc_seg.plan": plan.to_json(), "hpc_seg.plan_version": str(PLAN_VERSION),
        "hpc_seg.inference": json.dumps(to_dict(cfg.inference)),
        "hpc_seg.config": yaml.safe_dump(to_dict(cfg), sort_keys=False), "hpc_seg.version": __version__,
        "hpc_seg.size_multiple": str(multiple or 0)})
    proto.producer_name, proto.producer_version = "hpc-seg", __version__
    onnx.checker.check_model(proto)
    return atomic_write_bytes(out, proto.SerializeToString())


def spatial_multiple(model: torch.nn.Module, plan: PreprocessingPlan) -> int | None:
    """The multiple of which heights and widths stay dynamic in the graph, or None (fixed at the plan's
    size): models that pad to a multiple (UNet++, UNet_ASPP) trace one graph for every size that
    needs no padding, when the plan's size is such a size; TransUNet's position embeddings fix it."""
    multiple = getattr(model, "size_multiple", None)
    if multiple and all(int(s) % multiple == 0 for s in plan.size):
        return int(multiple)
    return None


class OnnxModel(torch.nn.Module):
    """An ONNX export as a module: ``forward`` runs the graph in onnxruntime (float32 in, logits out,
    on the input's device). It has no parameters, so ``.to(device)`` moves nothing; the torch side of
    inference stays on the host (``runs_on_host``) while onnxruntime uses ``provider``."""

    runs_on_host = True

    def __init__(self, session, source: str):
        super().__init__()
        self.session, self.source = session, source
        self.provider = session.get_providers()[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feed = {INPUT: x.detach().to("cpu", torch.float32).contiguous().numpy()}
        return torch.from_numpy(self.session.run([OUTPUT], feed)[0]).to(x.device)


def _session(source: Path, prefer_gpu: bool):
    """onnxruntime's CUDA provider when asked for and installed (``onnxruntime-gpu``), else the CPU;
    the provider in use is the model's ``provider`` (recorded in ``evaluate``'s metrics)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise HpcSegError(f"{source}: running an ONNX model needs onnxruntime (pip install 'hpc-seg[onnx]')") from None
    wanted = ("CUDAExecutionProvider", "CPUExecutionProvider") if prefer_gpu else ("CPUExecutionProvider",)
    providers = [p for p in wanted if p in ort.get_available_providers()]
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: onnxruntime's provider notices are not the user's concern
    try:
        return ort.InferenceSession(str(source), sess_options=options, providers=providers)
    except Exception as exc:
        raise HpcSegError(f"{source}: not a readable ONNX model ({str(exc).splitlines()[0]})") from None


def load_onnx(source: str | Path, prefer_gpu: bool = True) -> tuple[OnnxModel, Config, PreprocessingPlan]:
    """(model, config, preprocessing plan) of an ONNX export; a file without hpc-seg's plan, with a
    plan of another version or a graph that does not fit its plan is refused in one line."""
    source = Path(source)
    session = _session(source, prefer_gpu)
    meta = session.get_modelmeta().custom_metadata_map
    if "hpc_seg.plan" not in meta or "hpc_seg.config" not in meta:
        raise PlanError(f"{source}: ONNX model without hpc-seg's preprocessing plan in its metadata (was it written "
                        f"by 'hpc-seg export RUN_DIR --out {source.name}'?)")
    try:
        plan_dict, raw_cfg = json.loads(meta["hpc_seg.plan"]), yaml.safe_load(meta["hpc_seg.config"])
    except (ValueError, yaml.YAMLError) as exc:
        raise PlanError(f"{source}: embedded plan or config is not readable ({str(exc).splitlines()[0]})") from None
    if meta.get("hpc_seg.plan_version") != str(plan_dict.get("version")):
        raise PlanError(f"{source}: metadata says plan version {meta.get('hpc_seg.plan_version')}, the embedded "
                        f"plan is version {plan_dict.get('version')}; export it again with this hpc-seg")
    plan = PreprocessingPlan.from_dict(plan_dict, source=f"{source} (embedded plan)")
    cfg = from_dict(Config, rename_former_keys(Config, raw_cfg, warn=False), source=f"{source} (embedded config)")
    stated = json.loads(meta.get("hpc_seg.inference", "{}"))
    if any(to_dict(cfg.inference).get(k, v) != v for k, v in stated.items()):  # keys a later version adds are no conflict
        raise PlanError(f"{source}: metadata hpc_seg.inference {meta['hpc_seg.inference']} disagrees with the embedded "
                        f"config's inference section {json.dumps(to_dict(cfg.inference))}; export it again")
    _check_io(session, plan, source)
    return OnnxModel(session, str(source)), cfg, plan


def _check_io(session, plan: PreprocessingPlan, source: Path) -> None:
    """The graph must take what the plan produces and give what the plan reads (a plan edited by hand,
    or a graph of another model, would not fit)."""
    ins, outs = session.get_inputs(), session.get_outputs()
    dims = [int(s) if isinstance(s, (int, np.integer)) else s for s in ins[0].shape[1:]]
    want = [plan.in_channels, *plan.size]
    fits = all(d == w or (i > 0 and isinstance(d, str)) for i, (d, w) in enumerate(zip(dims, want)))
    if ins[0].name != INPUT or len(dims) != len(want) or not fits:
        raise PlanError(f"{source}: the graph takes {ins[0].name} {dims}, its preprocessing plan makes {INPUT} {want}")
    if outs[0].name != OUTPUT or outs[0].shape[1] != plan.out_channels:
        raise PlanError(f"{source}: the graph gives {outs[0].name} with {outs[0].shape[1]} channels, its plan reads "
                        f"{OUTPUT} with {plan.out_channels}")

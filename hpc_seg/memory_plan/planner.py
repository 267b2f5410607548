"""Memory planner: per-GPU memory of a model/size/input/batch under ZeRO 0–3 (± optimizer
offload), fp32/fp16/bf16 and activation checkpointing, and the largest depth × batch that fits.

* **Model states** from the parameter count Ψ, with DeepSpeed's own accounting (validated against
  real shards in ``tests/memory_plan/test_planner.py``): mixed precision holds 2Ψ parameters, 2Ψ
  gradients and 12Ψ fp32 master weights + Adam moments (the ZeRO paper's (2+2+12)Ψ); fp32 holds
  4Ψ + 4Ψ + 8Ψ, plus a 4Ψ fp32 partition for ZeRO ≥ 1. ZeRO-1/2 divide the optimizer states *and*
  the gradients by N (DeepSpeed's stage 1 keeps only its gradient partition after the reduction,
  unlike the paper's P_os), ZeRO-3 also the parameters. Optimizer offload moves master weights
  and moments to CPU memory.
* **Activations** are measured: forward/backward of the real model at batches 1 and 2 and the
  target input size on the CPU, peak memory from the PyTorch profiler minus the gradients, at two
  depths (so that any depth can be predicted) and with/without activation checkpointing; a fixed
  part plus a per-sample part; halved for fp16/bf16 (an approximation: DeepSpeed runs the module in
  half precision). A framework overhead (CUDA context, allocator slack; 1.5 GiB) is added.

    hpc-seg plan --config configs/transunet_12l.yaml [--gpus 8 --gpu-mem 40GB]
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from hpc_seg.errors import HpcSegError

GIB = 1024 ** 3
GPU_SIZES_GB = (16, 24, 40, 80)
OVERHEAD_BYTES = int(1.5 * GIB)  # CUDA context + allocator fragmentation (typical, not measured here)


def parse_mem(text: str) -> float:
    m = re.fullmatch(r"\s*([\d.]+)\s*([GM]i?B?)?\s*", text, re.I)
    if not m:
        raise ValueError(f"cannot read a memory size from {text!r} (e.g. 40GB)")
    scale = GIB if (m.group(2) or "G").upper().startswith("G") else 1024 ** 2
    return float(m.group(1)) * scale


def model_state_bytes(psi: int, stage: int, world: int, precision: str, offload_optimizer: bool = False) -> dict:
    """Per-rank bytes of parameters, gradients and optimizer states (see module docstring)."""
    n = max(world, 1)
    if precision == "fp32":
        p, g, opt = 4.0, 4.0, 8.0 + (4.0 if stage >= 1 else 0.0)
    else:
        p, g, opt = 2.0, 2.0, 12.0
    params = p / n if stage == 3 else p
    grads = g / n if stage >= 1 else g
    optim = 0.0 if offload_optimizer else (opt / n if stage >= 1 else opt)
    return {"params": params * psi, "grads": grads * psi, "optimizer": optim * psi,
            "total": (params + grads + optim) * psi}


def _profile_peak(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Peak CPU memory of forward + backward from the profiler's allocation events, minus grads."""
    from torch.profiler import ProfilerActivity, profile

    model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = model(x)
        (out if torch.is_tensor(out) else out[0]).float().mean().backward()
    cur = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        cur += e.self_cpu_memory_usage
        peak = max(peak, cur)
    grads = sum(p.numel() * p.element_size() for p in model.parameters())
    model.zero_grad(set_to_none=True)
    return max(peak - grads, 0)


def measure_activations(name: str, size: str, in_channels: int, num_classes: int, hw: tuple[int, int],
                        overrides: dict, checkpointing: bool, batch: int = 1) -> int:
    """Activation bytes (fp32) of one forward/backward at ``batch`` on the CPU."""
    from hpc_seg.distributed.activation_checkpointing import apply_activation_checkpointing
    from hpc_seg.models import build_model

    torch.manual_seed(0)
    model = build_model(name, size, in_channels=in_channels, num_classes=num_classes, **overrides).train()
    if checkpointing:
        apply_activation_checkpointing(model)
    return _profile_peak(model, torch.randn(batch, in_channels, *hw))


@dataclass
class Profile:
    """Linear models: Ψ(d) = p0 + d·p1 and activations(d, b) = c(d) + b·s(d), c and s linear in d,
    fitted from measurements at depths 1, 2 and batches 1, 2 (per checkpointing setting)."""

    p0: float
    p1: float
    act: dict  # checkpointing -> {(depth, batch): bytes}
    depth: int

    def params(self, depth: int) -> int:
        return int(self.p0 + depth * self.p1)

    def to_dict(self) -> dict:
        return {"p0": self.p0, "p1": self.p1, "depth": self.depth,
                "act": {str(ck): {f"{d},{b}": v for (d, b), v in a.items()} for ck, a in self.act.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "Profile":
        act = {ck == "True": {tuple(int(x) for x in k.split(",")): v for k, v in a.items()} for ck, a in d["act"].items()}
        return cls(d["p0"], d["p1"], act, d["depth"])

    def activations(self, depth: int, batch: int, checkpointing: bool, precision: str) -> float:
        a = self.act[checkpointing]
        depths = sorted({d for d, _ in a})

        def at(d, b):  # linear in depth between/beyond the measured depths
            if len(depths) == 1:
                return a[(depths[0], b)]
            d0, d1 = depths
            return a[(d0, b)] + (d - d0) * (a[(d1, b)] - a[(d0, b)]) / (d1 - d0)

        slope = max(at(depth, 2) - at(depth, 1), 0.0)
        fixed = max(at(depth, 1) - slope, 0.0)
        return (fixed + batch * slope) * (1.0 if precision == "fp32" else 0.5)


def profile_model(cfg, io: tuple[int, int] | None = None) -> Profile:
    """Measure Ψ and activations (batches 1, 2) at depths 1, 2 (TransUNet) or as configured (CNNs).

    ``io``: (input channels, output channels); default: :func:`model_channels` of the config."""
    from hpc_seg.models import build_model, count_parameters

    m, d = cfg.model, cfg.data
    io = io or model_channels(cfg)
    kw = dict(in_channels=io[0], num_classes=io[1])
    hw = tuple(d.size)
    if m.name == "transunet":
        from hpc_seg.models.transunet import SIZES

        depth, depths = int(m.overrides.get("depth", SIZES[m.size]["depth"])), (1, 2)
    else:
        depth, depths = 0, (0,)
    psi, act = {}, {False: {}, True: {}}
    for dd in depths:
        ov = {**m.overrides, "depth": dd} if m.name == "transunet" else dict(m.overrides)
        psi[dd] = count_parameters(build_model(m.name, m.size, **kw, **ov))
        for ckpt in (False, True):
            for b in (1, 2):
                act[ckpt][(dd, b)] = measure_activations(m.name, m.size, kw["in_channels"], kw["num_classes"],
                                                         hw, ov, ckpt, batch=b)
    if len(depths) == 1:
        return Profile(psi[0], 0.0, act, depth)
    p1 = psi[2] - psi[1]
    return Profile(psi[1] - p1, p1, act, depth)


def per_gpu_bytes(prof: Profile, depth: int, batch: int, stage: int, world: int, precision: str,
                  checkpointing: bool, offload: bool = False) -> dict:
    ms = model_state_bytes(prof.params(depth), stage, world, precision, offload)
    act = prof.activations(depth, batch, checkpointing, precision)
    return {**ms, "activations": act, "overhead": OVERHEAD_BYTES, "total": ms["total"] + act + OVERHEAD_BYTES}


def largest_batch(prof: Profile, depth: int, gpu_bytes: float, **kw) -> int:
    b = 0
    while b < 1024 and per_gpu_bytes(prof, depth, b + 1, **kw)["total"] <= gpu_bytes:
        b += 1
    return b


def recommend(prof: Profile, depth: int, batch: int, world: int, precision: str, gpu_bytes: float) -> dict | None:
    """The lowest ZeRO stage (least communication) that fits, without checkpointing if possible."""
    for ckpt in (False, True):
        for stage in range(4):
            need = per_gpu_bytes(prof, depth, batch, stage, world, precision, ckpt)["total"]
            if need <= gpu_bytes:
                return {"zero_stage": stage, "activation_checkpointing": ckpt, "bytes": need}
    return None


def model_channels(cfg) -> tuple[int, int]:
    """(input, output) channels of the config's model: from the store's preprocessing plan when the
    store is prepared, else from the dataset kind's facts by the plan's own rule
    (:func:`hpc_seg.preprocessing.plan.input_channels` / ``output_channels``). A kind whose classes
    come from the source (MSD) needs the prepared store."""
    from hpc_seg.ingest.kinds import get_kind
    from hpc_seg.ingest.prepare import is_prepared, prepare_command
    from hpc_seg.preprocessing.plan import input_channels, output_activation, output_channels, read_plan

    d = cfg.data
    if is_prepared(d.store, d.split_seed):
        p = read_plan(d.store, d.split_seed).resolve(d, cfg.loss.kind)
        return p.in_channels, p.out_channels
    kind = get_kind(d.kind)
    if kind.classes is None:
        raise HpcSegError(f"data.kind {kind.name} takes its classes from the source and data.store {d.store} "
                          f"is not prepared (split seed {d.split_seed}): prepare it first ({prepare_command(cfg)})")
    return (input_channels(kind.channels, d.mode, d.slices),
            output_channels(len(kind.classes), output_activation(cfg.loss.kind)))

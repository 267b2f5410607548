"""What the trainer sets up around the model, one rule for every device: kernel settings, buffer
dtypes under half precision, RNG state, precision support, and throughput figures."""

from __future__ import annotations

import os
import random
import time

import numpy as np
import torch

from hpc_seg.errors import HpcSegError


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def check_precision_supported(precision: str) -> None:
    """Fail early, with the reason, when the DeepSpeed accelerator cannot run ``precision``."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    if dtype is not None and dtype not in acc.supported_dtypes():
        hint = (" (DeepSpeed's CPU accelerator needs oneDNN fp16 support, i.e. AVX512-FP16/AMX)"
                if acc.device_name() == "cpu" else "")
        raise HpcSegError(f"deepspeed.precision={precision} is not supported on this {acc.device_name()} "
                          f"device{hint}; use bf16 or fp32")


def _mismatched_buffers(module: torch.nn.Module):
    for m in module.modules():
        p = next(m.parameters(recurse=False), None)
        if p is None:
            continue
        for name, buf in m.named_buffers(recurse=False):
            if buf is not None and buf.is_floating_point() and buf.dtype != p.dtype:
                yield m, name, buf, p.dtype


def match_buffer_dtypes(module: torch.nn.Module) -> int:
    """Float buffers take their module's parameter dtype, on every device. DeepSpeed (0.19) casts
    parameters to fp16/bf16 and leaves buffers in fp32 (older releases cast both): CPU batch norm
    refuses the mix, and CUDA's fused batch-norm backward takes its statistics dtype from the
    weight ("Expected running_mean to have type Half but got Float"). In place (``.data``), so the
    buffer objects others hold stay the module's; returns how many were cast."""
    found = list(_mismatched_buffers(module))
    for _, _, buf, dtype in found:
        buf.data = buf.data.to(dtype)
    return len(found)


def buffers_match_params(module: torch.nn.Module) -> bool:
    return next(_mismatched_buffers(module), None) is None


def configure_backends(tr) -> None:
    """Kernel choices, one rule for every device (each setting is inert where its backend is absent).

    Inputs have one size (the plan's), so cuDNN autotunes once; TF32 matmuls unless
    ``train.tf32: false``. ``train.deterministic``: deterministic algorithms where they exist, with
    cuBLAS's fixed workspace; CUDA has no deterministic bilinear-upsample backward, so that op warns
    (``warn_only``) instead of stopping the run (docs/gpu.md)."""
    torch.backends.cudnn.benchmark = not tr.deterministic
    torch.backends.cudnn.allow_tf32 = tr.tf32
    torch.set_float32_matmul_precision("high" if tr.tf32 else "highest")
    if tr.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)


class Throughput:
    """Samples/s of this rank: windowed since the last log or pause (the steady state) and
    cumulative since ``fit`` began (worker start-up, validation and checkpoints included)."""

    def __init__(self):
        self.t0 = self.t_window = time.perf_counter()
        self.samples = self.window_samples = 0

    def add(self, n: int) -> None:
        self.samples += n
        self.window_samples += n

    def new_window(self) -> None:
        self.t_window, self.window_samples = time.perf_counter(), 0

    def figures(self, world_size: int) -> dict:
        now = time.perf_counter()
        return {"samples_per_s": self.window_samples * world_size / max(now - self.t_window, 1e-9),
                "samples_per_s_cumulative": self.samples * world_size / max(now - self.t0, 1e-9)}

"""Optimizer (AdamW/SGD, no weight decay on norms and biases) and LR schedules with warmup."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") or "position_embeddings" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, tr, offload: bool = False) -> torch.optim.Optimizer:
    """AdamW / SGD; with ZeRO-Offload (``offload``) DeepSpeed's CPU Adam in AdamW mode — DeepSpeed
    refuses any other client optimizer there. Its C++ op is JIT-built by DeepSpeed's op builder on
    first use (a minute or two on a fresh machine) into ``TORCH_EXTENSIONS_DIR``, which cluster jobs
    set node-local per CPU type (``hpc_seg.jobs.job.extensions_dir``)."""
    groups = param_groups(model, tr.weight_decay)
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=tr.lr, betas=tuple(tr.betas), adamw_mode=True)
    if tr.optimizer == "adamw":  # fused: one kernel for all tensors (CUDA and CPU alike)
        return torch.optim.AdamW(groups, lr=tr.lr, betas=tuple(tr.betas), fused=True)
    return torch.optim.SGD(groups, lr=tr.lr, momentum=tr.momentum, nesterov=True)


def lr_factor(step: int, tr, time_fraction: float = 0.0) -> float:
    """Multiplier of ``tr.lr`` at optimizer step ``step`` (0-based). ``time_fraction``: the share
    of ``train.max_minutes`` spent (``hpc_seg.training.budget``); the schedule runs at whichever is
    further along, the step or the step that share of the budget stands for, so a time budget
    compresses the whole schedule (warmup included) to end on it."""
    if tr.schedule == "constant":
        return 1.0
    step = max(step, time_fraction * tr.max_steps)
    if step < tr.warmup_steps:
        return (step + 1) / tr.warmup_steps
    span = max(tr.max_steps - tr.warmup_steps, 1)
    t = min((step - tr.warmup_steps) / span, 1.0)
    if tr.schedule == "warmup_poly":
        return max((1 - t) ** tr.poly_power, tr.min_lr_ratio)
    return tr.min_lr_ratio + (1 - tr.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def build_scheduler(optimizer: torch.optim.Optimizer, tr, budget=None) -> torch.optim.lr_scheduler.LambdaLR:
    """``budget``: a ``TimeBudget`` whose agreed fraction the schedule reads (a closure: LambdaLR
    saves no state of it, the budget's seconds travel in the trainer's own checkpoint state)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, tr, budget.fraction if budget is not None else 0.0))

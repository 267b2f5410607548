"""Activation (gradient) checkpointing applied from outside the model code.

Models list their checkpointable submodules in ``checkpoint_targets()`` (transformer blocks,
decoder stages, nested UNet nodes); ``apply_activation_checkpointing`` replaces each with a
wrapper that recomputes its forward pass during backward, trading compute for activation memory.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


class CheckpointWrapper(nn.Module):
    """Runs ``module`` under ``torch.utils.checkpoint`` while training with gradients."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        if self.training and torch.is_grad_enabled():
            return checkpoint(self.module, *args, use_reentrant=False, **kwargs)
        return self.module(*args, **kwargs)


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Wrap every ``model.checkpoint_targets()`` entry; returns how many were wrapped."""
    targets = getattr(model, "checkpoint_targets", None)
    if targets is None:
        raise ValueError(f"{type(model).__name__} does not declare checkpoint_targets()")
    n = 0
    for parent, name in targets():
        child = parent._modules[name]  # ModuleList/ModuleDict/Module all keep children here
        if not isinstance(child, CheckpointWrapper):
            parent._modules[name] = CheckpointWrapper(child)
            n += 1
    return n

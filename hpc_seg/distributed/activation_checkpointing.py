"""Activation (gradient) checkpointing applied from outside the model code.

Models list their checkpointable submodules in ``checkpoint_targets()`` (transformer blocks,
decoder stages, nested UNet nodes); ``apply_activation_checkpointing`` makes each recompute its
forward pass during backward, trading compute for activation memory.

Two rules hold, each pinned by a test:

* **Names stay.** A target is not wrapped in another module (that would insert ``.module.`` into
  every parameter name, and DeepSpeed cannot resume a checkpoint across the switch): its class is
  swapped for a subclass whose ``__call__`` runs the module under ``torch.utils.checkpoint``. The
  module's own hooks (ZeRO-3 gathers parameters in them) run in the forward and in the
  recomputation, as they do when a parent calls ``checkpoint(block.__call__, …)``.
* **One running-statistics update per forward.** The recomputation runs BatchNorm in training mode
  again; its running mean/var and ``num_batches_tracked`` are restored after it, so a checkpointed
  run's statistics equal the same run's without checkpointing.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

_CLASSES: dict[type, type] = {}


@contextmanager
def _running_stats_kept(module: nn.Module):
    """Restore every batch-norm buffer of ``module`` on exit (the recomputation's updates undone)."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [[b.clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
             for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, bufs in zip(norms, saved):
                live = [b for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
                for b, s in zip(live, bufs):
                    b.copy_(s)


class Checkpointed:
    """Mixin put in front of a target's class: ``__call__`` under ``torch.utils.checkpoint``."""

    def __call__(self, *args, **kwargs):
        call = super().__call__
        if self.training and torch.is_grad_enabled():
            return checkpoint(call, *args, use_reentrant=False,
                              context_fn=lambda: (nullcontext(), _running_stats_kept(self)), **kwargs)
        return call(*args, **kwargs)

    def __reduce_ex__(self, protocol):
        """Pickle (``torch.save(model)``, spawned workers) through the model's own class, which is
        importable; the checkpointed subclass is made again on loading."""
        _, _, *rest = super().__reduce_ex__(protocol)
        return (_new_checkpointed, (type(self).__mro__[2],), *rest)


def _new_checkpointed(cls: type):
    return object.__new__(_checkpointed_class(cls))


def _checkpointed_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Checkpointed{cls.__name__}", (Checkpointed, cls), {"__module__": cls.__module__})
    return _CLASSES[cls]


def is_checkpointed(module: nn.Module) -> bool:
    return isinstance(module, Checkpointed)


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Checkpoint every ``model.checkpoint_targets()`` entry; returns how many were changed."""
    targets = getattr(model, "checkpoint_targets", None)
    if targets is None:
        raise ValueError(f"{type(model).__name__} does not declare checkpoint_targets()")
    n = 0
    for parent, name in targets():
        child = parent._modules[name]  # ModuleList/ModuleDict/Module all keep children here
        if not is_checkpointed(child):
            child.__class__ = _checkpointed_class(type(child))
            n += 1
    return n

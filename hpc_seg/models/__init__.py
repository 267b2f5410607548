"""Model registry: ``build_model(name, size=..., in_channels=..., num_classes=..., **overrides)``.

=============  =========================================  ===============================
name           sizes                                      notable overrides
=============  =========================================  ===============================
unetpp         tiny, small, base                          filters, deep_supervision
unet_aspp      tiny, small, base                          filters, deep_supervision, aspp_rate
transunet      tiny, small, r50-vit-b16, r50-vit-l16       depth, hidden, heads, mlp, attention,
                                                          img_size, pretrained (local file)
=============  =========================================  ===============================

Every model is a plain ``nn.Module`` returning logits; ``checkpoint_targets()`` lists the
submodules the engine may wrap with activation checkpointing.
"""

from __future__ import annotations

import inspect

import torch.nn as nn

from hpc_seg.errors import ConfigError
from hpc_seg.models import transunet, unet_aspp, unetpp

REGISTRY = {
    "unetpp": (unetpp.build, unetpp.SIZES),
    "unet_aspp": (unet_aspp.build, unet_aspp.SIZES),
    "transunet": (transunet.build, transunet.SIZES),
}
_CLASSES = {"unetpp": unetpp.UNetPlusPlus, "unet_aspp": unet_aspp.UNetASPP, "transunet": transunet.TransUNet}


def check_model_args(name: str, size: str, overrides: dict) -> None:
    """Raise ConfigError for an unknown name, size or override key (nothing is built)."""
    if name not in REGISTRY:
        raise ConfigError(f"unknown model '{name}' (available: {', '.join(sorted(REGISTRY))})")
    _, sizes = REGISTRY[name]
    if size not in sizes:
        raise ConfigError(f"unknown size '{size}' for model '{name}' (available: {', '.join(sizes)})")
    allowed = set(inspect.signature(_CLASSES[name].__init__).parameters) - {"self", "in_channels", "num_classes"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ConfigError(f"model '{name}': unknown override(s) {unknown} (allowed: {', '.join(sorted(allowed))})")


def build_model(name: str, size: str = "tiny", in_channels: int = 1, num_classes: int = 3,
                pretrained: str | None = None, **overrides) -> nn.Module:
    """Build a registered model; unknown names, sizes or override keys raise ConfigError."""
    check_model_args(name, size, overrides)
    if in_channels < 1 or num_classes < 1:
        raise ConfigError(f"in_channels and num_classes must be >= 1, got {in_channels}, {num_classes}")
    builder, _ = REGISTRY[name]
    model = builder(size, in_channels=in_channels, num_classes=num_classes, **overrides)
    if pretrained:  # .npz (ViT naming) is TransUNet-only; state dicts work for every model
        from hpc_seg.models.transunet_weights import load_pretrained

        load_pretrained(model, pretrained)
    return model


def build_from_config(cfg, plan, pretrained: bool = True) -> nn.Module:
    """Build from a :class:`hpc_seg.config.Config`'s model section; input channels and output
    channels come from the resolved preprocessing plan (``hpc_seg.preprocessing.plan``), the one place
    that ties them to the data and the loss (one logit for ``bce_dice``)."""
    return build_model(cfg.model.name, cfg.model.size, in_channels=plan.in_channels,
                       num_classes=plan.out_channels, pretrained=cfg.model.pretrained if pretrained else None,
                       **cfg.model.overrides)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["REGISTRY", "build_model", "check_model_args", "build_from_config", "count_parameters"]

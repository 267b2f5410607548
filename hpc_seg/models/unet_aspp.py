"""UNet_ASPP: the paper's UNet++ variant with residual nodes, pooled inter-level links and ASPP.

"Automatic Liver Tumor Segmentation" (the project's reference paper), building on
Zhou et al. 2018 (UNet++) and Chen et al. 2017 (DeepLab, atrous spatial pyramid pooling,
https://arxiv.org/abs/1706.05587).

* Every node is ``ResidualConvBlock``: ``y = relu(BN(H(relu(BN(H(x))))) + H(x))``.
* Nested dense skips at every level, as UNet++.
* From the second level on (i >= 1), node ``X[i][j]`` (j >= 1) also receives the max-pooled
  ``X[i-1][j]`` from the level above — "a UNet++ inside the UNet++".
* ASPP on ``X[0][4]``: atrous 3×3 conv (rate ``aspp_rate``, r2 by default) + 1×1 conv + 1×1 conv
  of the globally average-pooled map (broadcast back), summed, BN-ReLU, then the 1×1 classifier.

Args:
    in_channels, num_classes, filters, deep_supervision: as ``NestedUNet``.
    aspp_rate: dilation of the atrous branch.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from hpc_seg.models.common import ResidualConvBlock
from hpc_seg.models.unetpp import NestedUNet

SIZES = {
    "tiny": {"filters": [8, 16, 32, 64, 128]},
    "small": {"filters": [16, 32, 64, 128, 256]},
    "base": {"filters": [32, 64, 128, 256, 512]},  # the paper's widths (UNet++ defaults)
}


class ASPP(nn.Module):
    """Sum of an atrous conv, a 1×1 conv and a 1×1 conv of the global average pool."""

    def __init__(self, channels: int, rate: int = 2):
        super().__init__()
        self.atrous = nn.Conv2d(channels, channels, 3, padding=rate, dilation=rate, bias=False)
        self.conv = nn.Conv2d(channels, channels, 1, bias=False)
        self.pool_conv = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool_conv(F.adaptive_avg_pool2d(x, 1))  # (N, C, 1, 1), broadcast in the sum
        return F.relu(self.bn(self.atrous(x) + self.conv(x) + pooled))


class UNetASPP(NestedUNet):
    __doc__ = __doc__
    block = ResidualConvBlock

    def __init__(self, in_channels: int = 1, num_classes: int = 3, filters=(32, 64, 128, 256, 512),
                 deep_supervision: bool = False, aspp_rate: int = 2):
        super().__init__(in_channels, num_classes, filters, deep_supervision)
        self.aspp = ASPP(self.filters[0], aspp_rate)

    def _extra_in(self, i: int, j: int) -> int:
        return self.filters[i - 1] if i >= 1 else 0

    def _extra_inputs(self, X, i: int, j: int) -> list[torch.Tensor]:
        if i == 0:
            return []
        up = X[i - 1, j]
        pooled = F.max_pool2d(up, 2)
        if pooled.shape[-2:] != X[i, 0].shape[-2:]:
            pooled = F.adaptive_max_pool2d(up, X[i, 0].shape[-2:])
        return [pooled]

    def _head_features(self, X) -> list[torch.Tensor]:
        feats = super()._head_features(X)
        feats[-1] = self.aspp(feats[-1])  # ASPP after x0,4
        return feats


def build(size: str = "tiny", in_channels: int = 1, num_classes: int = 3, **overrides) -> UNetASPP:
    return UNetASPP(in_channels=in_channels, num_classes=num_classes, **{**SIZES[size], **overrides})

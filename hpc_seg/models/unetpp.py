"""UNet++ (nested U-Net) baseline, and the nested-skip machinery UNet_ASPP reuses.

Zhou, Rahman Siddiquee, Tajbakhsh, Liang. "UNet++: A Nested U-Net Architecture for Medical Image
Segmentation." DLMIA 2018. https://arxiv.org/abs/1807.10165

Node ``X[i][j]`` (level i = resolution 1/2^i, column j) is
``H([X[i][0], …, X[i][j-1], Up(X[i+1][j-1])])``; the output head reads ``X[0][4]``.

Args:
    in_channels: input channels (1 CT, k for 2.5D, 3 RGB).
    num_classes: output classes (logits, no activation).
    filters: channels per level, 5 values (level 0..4).
    deep_supervision: heads on X[0][1..4]; in training ``forward`` returns the 4 logits
        (the loss averages them), in eval their mean.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from hpc_seg.models.common import DoubleConv, check_input, crop_padding, pad_to_multiple, up_to

SIZES = {
    "tiny": {"filters": [8, 16, 32, 64, 128]},
    "small": {"filters": [16, 32, 64, 128, 256]},
    "base": {"filters": [32, 64, 128, 256, 512]},  # Zhou et al.'s configuration
}


class NestedUNet(nn.Module):
    """UNet++ with a pluggable node block; subclasses add inter-level links (see UNet_ASPP)."""

    depth = 5
    block = DoubleConv

    @property
    def size_multiple(self) -> int:
        """Heights and widths that are multiples of this need no padding: the graph is the same for
        all of them (so an ONNX export can take any such size)."""
        return 2 ** (self.depth - 1)

    def __init__(self, in_channels: int = 1, num_classes: int = 3, filters=(32, 64, 128, 256, 512),
                 deep_supervision: bool = False):
        super().__init__()
        if len(filters) != self.depth:
            raise ValueError(f"filters must have {self.depth} entries, got {list(filters)}")
        self.in_channels, self.num_classes = in_channels, num_classes
        self.filters, self.deep_supervision = list(filters), deep_supervision
        self.pool = nn.MaxPool2d(2)
        self.nodes = nn.ModuleDict()
        for j in range(self.depth):
            for i in range(self.depth - j):
                self.nodes[f"{i}_{j}"] = self.block(self._node_in(i, j), self.filters[i])
        n_heads = self.depth - 1 if deep_supervision else 1
        self.heads = nn.ModuleList(nn.Conv2d(self.filters[0], num_classes, 1) for _ in range(n_heads))

    def _node_in(self, i: int, j: int) -> int:
        if j == 0:
            return self.in_channels if i == 0 else self.filters[i - 1]
        return j * self.filters[i] + self.filters[i + 1] + self._extra_in(i, j)

    def _extra_in(self, i: int, j: int) -> int:
        return 0

    def _extra_inputs(self, X, i: int, j: int) -> list[torch.Tensor]:
        return []

    def _grid(self, x: torch.Tensor) -> dict:
        X: dict[tuple[int, int], torch.Tensor] = {}
        for i in range(self.depth):
            X[i, 0] = self.nodes[f"{i}_0"](x if i == 0 else self.pool(X[i - 1, 0]))
        for j in range(1, self.depth):
            for i in range(self.depth - j):  # top to bottom: X[i-1][j] exists for the pool links
                inputs = [X[i, k] for k in range(j)] + [up_to(X[i + 1, j - 1], X[i, 0])]
                X[i, j] = self.nodes[f"{i}_{j}"](torch.cat(inputs + self._extra_inputs(X, i, j), 1))
        return X

    def _head_features(self, X) -> list[torch.Tensor]:
        if self.deep_supervision:
            return [X[0, j] for j in range(1, self.depth)]
        return [X[0, self.depth - 1]]

    def forward(self, x: torch.Tensor):
        check_input(x, self.in_channels, type(self).__name__)
        x, pad = pad_to_multiple(x, 2 ** (self.depth - 1))
        feats = self._head_features(self._grid(x))
        logits = [head(f) for head, f in zip(self.heads, feats)]
        if self.deep_supervision:
            out = logits if self.training else torch.stack(logits).mean(0)
        else:
            out = logits[0]
        return crop_padding(out, pad)

    def checkpoint_targets(self) -> list[tuple[nn.Module, str]]:
        """(parent, attribute) pairs the engine may wrap with activation checkpointing."""
        return [(self.nodes, name) for name in self.nodes.keys() if not name.endswith("_0")]


class UNetPlusPlus(NestedUNet):
    __doc__ = __doc__


def build(size: str = "tiny", in_channels: int = 1, num_classes: int = 3, **overrides) -> UNetPlusPlus:
    return UNetPlusPlus(in_channels=in_channels, num_classes=num_classes, **{**SIZES[size], **overrides})

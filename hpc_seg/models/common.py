"""Building blocks shared by the architectures, and input checks/padding.

Models never apply an activation to their logits. Inputs whose height/width are not multiples
of the model's total stride are zero-padded (symmetrically) and the logits cropped back, so
any input size works (``pad_forward``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def check_input(x: torch.Tensor, in_channels: int, name: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{name}: expected input of shape (N, C, H, W), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name}: empty batch")
    if x.shape[1] != in_channels:
        raise ValueError(f"{name}: model expects {in_channels} input channels, got {x.shape[1]} "
                         f"(input shape {tuple(x.shape)})")


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    pad = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
    return (F.pad(x, pad) if any(pad) else x), pad


def crop_padding(y, pad: tuple[int, int, int, int]):
    if isinstance(y, (list, tuple)):
        return type(y)(crop_padding(t, pad) for t in y)
    left, right, top, bottom = pad
    if not any(pad):
        return y
    h, w = y.shape[-2:]
    return y[..., top:h - bottom, left:w - right]


class ConvBNReLU(nn.Sequential):
    """conv(k) → BN → ReLU."""

    def __init__(self, cin: int, cout: int, k: int = 3, dilation: int = 1):
        super().__init__(nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DoubleConv(nn.Sequential):
    """The VGG-style node of U-Net/UNet++: two conv-BN-ReLU layers."""

    def __init__(self, cin: int, cout: int):
        super().__init__(ConvBNReLU(cin, cout), ConvBNReLU(cout, cout))


class ResidualConvBlock(nn.Module):
    """The paper's residual node: ``y = relu(BN(H(relu(BN(H(x))))) + H(x))``.

    ``H`` are 3×3 convolutions; the first one's output ``H(x)`` is both the input of the
    inner branch and the shortcut, so the block changes channel count without a projection.
    """

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(h)))) + h)


def up_to(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Bilinear upsampling of ``x`` to ``ref``'s spatial size."""
    return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)

"""TransUNet: ResNet-50 hybrid + ViT encoder, cascaded-upsampling decoder with CNN skips,
optionally with spatial-channel attention (scSE) at every decoder stage.

Chen, Lu, Yu, Luo, Adeli, Wang, Lu, Yuille, Zhou. "TransUNet: Transformers Make Strong Encoders
for Medical Image Segmentation." 2021. https://arxiv.org/abs/2102.04306 (R50-ViT-B/16: 105.28 M
parameters at 224²). Attention: Roy, Navab, Wachinger. "Concurrent Spatial and Channel
Squeeze & Excitation in Fully Convolutional Networks." MICCAI 2018.

Layout follows the reference code (module names map onto its ``.npz`` weights, see
``transunet_weights.py``): ResNetV2 with weight-standardised convs and GroupNorm (root 7×7/2 +
max-pool, stages of ``resnet_blocks`` bottleneck units), a 1×1 patch embedding of the 1/16 map,
learnable position embeddings over that grid (interpolated for other input sizes), ``depth``
pre-norm transformer blocks, then ``conv_more`` and four decoder blocks (256, 128, 64, 16) that
upsample ×2 and concatenate the 1/8, 1/4, 1/2 CNN features.

Args:
    in_channels, num_classes: input channels / output classes (logits).
    img_size: the size the position embeddings are laid out for (224 reference).
    resnet_blocks: units per ResNet stage, e.g. (3, 4, 9); width: root width (64).
    hidden, depth, heads, mlp: ViT width, layers, heads, MLP width.
    decoder_channels: the cascaded decoder's widths.
    attention: add an scSE block after every decoder stage.
    dropout, attn_dropout: ViT dropouts.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from hpc_seg.models.common import check_input, crop_padding, pad_to_multiple

SIZES = {
    "tiny": dict(resnet_blocks=(1, 1, 1), width=8, hidden=32, depth=2, heads=2, mlp=64,
                 decoder_channels=(32, 16, 8, 8), img_size=64),
    # CPU budget size (kvasir_cpu recipe): 0.69 M parameters like unet_aspp/tiny, but most of its
    # compute at 1/4–1/16 resolution: ≈ 2.8× the samples/s of unet_aspp/tiny on 2 cores at 128²
    "small": dict(resnet_blocks=(2, 2, 2), width=16, hidden=64, depth=4, heads=4, mlp=128,
                  decoder_channels=(64, 32, 16, 16), img_size=128),
    "r50-vit-b16": dict(resnet_blocks=(3, 4, 9), width=64, hidden=768, depth=12, heads=12, mlp=3072,
                        decoder_channels=(256, 128, 64, 16), img_size=224),
    "r50-vit-l16": dict(resnet_blocks=(3, 4, 9), width=64, hidden=1024, depth=24, heads=16, mlp=4096,
                        decoder_channels=(256, 128, 64, 16), img_size=224),
}


class StdConv2d(nn.Conv2d):
    """Conv with weight standardisation (BiT ResNetV2)."""

    def forward(self, x):
        w = self.weight
        v, m = torch.var_mean(w, dim=[1, 2, 3], keepdim=True, unbiased=False)
        return F.conv2d(x, (w - m) / torch.sqrt(v + 1e-5), self.bias, self.stride, self.padding)


def _gn(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, c), c, eps=1e-6)


class Bottleneck(nn.Module):
    """Pre-activation-free ResNetV2 bottleneck as in TransUNet's ``PreActBottleneck``."""

    def __init__(self, cin: int, cout: int, cmid: int, stride: int = 1):
        super().__init__()
        self.conv1, self.gn1 = StdConv2d(cin, cmid, 1, bias=False), _gn(cmid)
        self.conv2, self.gn2 = StdConv2d(cmid, cmid, 3, stride, 1, bias=False), _gn(cmid)
        self.conv3, self.gn3 = StdConv2d(cmid, cout, 1, bias=False), _gn(cout)
        self.downsample = self.gn_proj = None
        if stride != 1 or cin != cout:
            self.downsample, self.gn_proj = StdConv2d(cin, cout, 1, stride, bias=False), _gn(cout)

    def forward(self, x):
        residual = x if self.downsample is None else self.gn_proj(self.downsample(x))
        y = F.relu(self.gn1(self.conv1(x)))
        y = F.relu(self.gn2(self.conv2(y)))
        return F.relu(residual + self.gn3(self.conv3(y)))


class ResNetV2(nn.Module):
    """Root (7×7/2, GN, ReLU) + max-pool + stages; returns the 1/16 map and [1/8, 1/4, 1/2] skips."""

    def __init__(self, in_channels: int, blocks=(3, 4, 9), width: int = 64):
        super().__init__()
        self.root = nn.Sequential(StdConv2d(in_channels, width, 7, 2, 3, bias=False), _gn(width), nn.ReLU(inplace=True))
        stages, cin = [], width
        for i, n in enumerate(blocks):
            cout, cmid = width * 4 * 2 ** i, width * 2 ** i
            units = [Bottleneck(cin if u == 0 else cout, cout, cmid, stride=(2 if i > 0 and u == 0 else 1))
                     for u in range(n)]
            stages.append(nn.Sequential(*units))
            cin = cout
        self.body = nn.ModuleList(stages)
        self.out_channels = cin
        self.skip_channels = [width * 4 * 2 ** (len(blocks) - 2), width * 4, width]

    def forward(self, x):
        x = self.root(x)
        skips = [x]
        x = F.max_pool2d(x, 3, 2, 1)
        for stage in self.body[:-1]:
            x = stage(x)
            skips.append(x)
        return self.body[-1](x), skips[::-1]


class TransformerBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp: int, dropout: float, attn_dropout: float):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
        self.attention_norm = nn.LayerNorm(hidden, eps=1e-6)
        self.attn = nn.MultiheadAttention(hidden, heads, dropout=attn_dropout, batch_first=True)
        self.ffn_norm = nn.LayerNorm(hidden, eps=1e-6)
        self.ffn = nn.Sequential(nn.Linear(hidden, mlp), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(mlp, hidden), nn.Dropout(dropout))

    def forward(self, x):
        h = self.attention_norm(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.ffn(self.ffn_norm(x))


class SCSE(nn.Module):
    """Concurrent spatial and channel squeeze-excitation: ``x·cSE(x) + x·sSE(x)``."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        mid = max(channels // reduction, 1)
        self.cse = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, mid, 1), nn.ReLU(inplace=True),
                                 nn.Conv2d(mid, channels, 1), nn.Sigmoid())
        self.sse = nn.Sequential(nn.Conv2d(channels, 1, 1), nn.Sigmoid())

    def forward(self, x):
        return x * self.cse(x) + x * self.sse(x)


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DecoderBlock(nn.Module):
    """Upsample ×2, concatenate the skip, two conv-BN-ReLU, optional scSE."""

    def __init__(self, cin: int, skip: int, cout: int, attention: bool):
        super().__init__()
        self.conv1, self.conv2 = conv_bn_relu(cin + skip, cout), conv_bn_relu(cout, cout)
        self.attention = SCSE(cout) if attention else nn.Identity()

    def forward(self, x, skip=None):
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        if skip is not None:
            x = torch.cat([x, skip], 1)
        return self.attention(self.conv2(self.conv1(x)))


class TransUNet(nn.Module):
    __doc__ = __doc__

    def __init__(self, in_channels: int = 1, num_classes: int = 3, img_size: int = 224,
                 resnet_blocks=(3, 4, 9), width: int = 64, hidden: int = 768, depth: int = 12,
                 heads: int = 12, mlp: int = 3072, decoder_channels=(256, 128, 64, 16),
                 attention: bool = False, dropout: float = 0.1, attn_dropout: float = 0.0):
        super().__init__()
        if len(resnet_blocks) != 3 or len(decoder_channels) != 4:
            raise ValueError("TransUNet needs 3 ResNet stages and 4 decoder channels")
        self.in_channels, self.num_classes, self.attention = in_channels, num_classes, attention
        self.img_size, self.hidden = img_size, hidden
        self.resnet = ResNetV2(in_channels, tuple(resnet_blocks), width)
        self.patch_embeddings = nn.Conv2d(self.resnet.out_channels, hidden, 1)
        self.grid = max(img_size // 16, 1)
        self.position_embeddings = nn.Parameter(torch.zeros(1, self.grid * self.grid, hidden))
        nn.init.trunc_normal_(self.position_embeddings, std=0.02)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(TransformerBlock(hidden, heads, mlp, dropout, attn_dropout) for _ in range(depth))
        self.encoder_norm = nn.LayerNorm(hidden, eps=1e-6)
        head = 512 if decoder_channels[0] >= 256 else decoder_channels[0] * 2
        self.conv_more = conv_bn_relu(hidden, head)
        skips = self.resnet.skip_channels + [0]
        ins = [head, *decoder_channels[:-1]]
        self.decoder = nn.ModuleList(DecoderBlock(i, s, o, attention) for i, s, o in zip(ins, skips, decoder_channels))
        self.segmentation_head = nn.Conv2d(decoder_channels[-1], num_classes, 3, padding=1)

    def _pos_embed(self, gh: int, gw: int) -> torch.Tensor:
        pe = self.position_embeddings
        if (gh, gw) == (self.grid, self.grid):
            return pe
        pe = pe.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        pe = F.interpolate(pe, size=(gh, gw), mode="bilinear", align_corners=False)
        return pe.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_channels, "TransUNet")
        x, pad = pad_to_multiple(x, 16)
        feat, skips = self.resnet(x)
        tokens = self.patch_embeddings(feat)
        n, c, gh, gw = tokens.shape
        h = self.dropout(tokens.flatten(2).transpose(1, 2) + self._pos_embed(gh, gw))
        for layer in self.layers:
            h = layer(h)
        h = self.encoder_norm(h).transpose(1, 2).reshape(n, c, gh, gw)
        y = self.conv_more(h)
        for block, skip in zip(self.decoder, skips + [None]):
            y = block(y, skip)
        return crop_padding(self.segmentation_head(y), pad)

    def checkpoint_targets(self) -> list[tuple[nn.Module, str]]:
        """Transformer blocks and decoder stages, for the engine's activation checkpointing."""
        return [(self.layers, str(i)) for i in range(len(self.layers))] + \
               [(self.decoder, str(i)) for i in range(len(self.decoder))]


def build(size: str = "r50-vit-b16", in_channels: int = 1, num_classes: int = 3, **overrides) -> TransUNet:
    return TransUNet(in_channels=in_channels, num_classes=num_classes, **{**SIZES[size], **overrides})


__all__ = ["TransUNet", "SCSE", "build", "SIZES"]

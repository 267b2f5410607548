"""Local pretrained weights for TransUNet: Google's ViT/R50+ViT ``.npz`` files (as the reference
TransUNet code loads them, e.g. ``R50+ViT-B_16.npz``), or our own ``.safetensors``/``.pt`` state
dicts. Nothing is ever downloaded: a missing file is an error naming the path.

The ``.npz`` mapping is one table (``_npz_entries``) used in both directions, so that
``export_npz`` (tests, conversions) and ``load_npz`` cannot drift apart. A root conv for other
than 3 input channels is made from the RGB kernel's channel mean, repeated (scaled by 3/C).
Position embeddings with a class token or another grid size are cropped/interpolated.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hpc_seg.errors import HpcSegError


def _conv(w):  # HWIO <-> OIHW
    return w.transpose(3, 2, 0, 1)


def _conv_inv(w):
    return w.transpose(2, 3, 1, 0)


def _npz_entries(model):
    """Yield (npz key, tensor, to_torch, to_npz) for every mapped parameter."""
    ident = (lambda a: a, lambda a: a)
    conv = (_conv, _conv_inv)
    r = model.resnet
    yield "conv_root/kernel", r.root[0].weight, *conv
    yield "gn_root/scale", r.root[1].weight, *ident
    yield "gn_root/bias", r.root[1].bias, *ident
    for b, stage in enumerate(r.body, 1):
        for u, unit in enumerate(stage, 1):
            pre = f"block{b}/unit{u}/"
            for n in (1, 2, 3):
                yield pre + f"conv{n}/kernel", getattr(unit, f"conv{n}").weight, *conv
                yield pre + f"gn{n}/scale", getattr(unit, f"gn{n}").weight, *ident
                yield pre + f"gn{n}/bias", getattr(unit, f"gn{n}").bias, *ident
            if unit.downsample is not None:
                yield pre + "conv_proj/kernel", unit.downsample.weight, *conv
                yield pre + "gn_proj/scale", unit.gn_proj.weight, *ident
                yield pre + "gn_proj/bias", unit.gn_proj.bias, *ident
    yield "embedding/kernel", model.patch_embeddings.weight, *conv
    yield "embedding/bias", model.patch_embeddings.bias, *ident
    yield "Transformer/encoder_norm/scale", model.encoder_norm.weight, *ident
    yield "Transformer/encoder_norm/bias", model.encoder_norm.bias, *ident
    hid = model.hidden
    for i, layer in enumerate(model.layers):
        pre = f"Transformer/encoderblock_{i}/"
        yield pre + "LayerNorm_0/scale", layer.attention_norm.weight, *ident
        yield pre + "LayerNorm_0/bias", layer.attention_norm.bias, *ident
        yield pre + "LayerNorm_2/scale", layer.ffn_norm.weight, *ident
        yield pre + "LayerNorm_2/bias", layer.ffn_norm.bias, *ident
        for j, dense in ((0, layer.ffn[0]), (1, layer.ffn[3])):
            yield pre + f"MlpBlock_3/Dense_{j}/kernel", dense.weight, lambda a: a.T, lambda a: a.T
            yield pre + f"MlpBlock_3/Dense_{j}/bias", dense.bias, *ident
        att = layer.attn
        heads = att.num_heads
        for k, name in enumerate(("query", "key", "value")):
            rows = slice(k * hid, (k + 1) * hid)
            yield (pre + f"MultiHeadDotProductAttention_1/{name}/kernel", att.in_proj_weight[rows],
                   lambda a: a.reshape(hid, hid).T, lambda a, h=heads: a.T.reshape(hid, h, hid // h))
            yield (pre + f"MultiHeadDotProductAttention_1/{name}/bias", att.in_proj_bias[rows],
                   lambda a: a.reshape(hid), lambda a, h=heads: a.reshape(h, hid // h))
        yield (pre + "MultiHeadDotProductAttention_1/out/kernel", att.out_proj.weight,
               lambda a: a.reshape(hid, hid).T, lambda a, h=heads: a.T.reshape(h, hid // h, hid))
        yield pre + "MultiHeadDotProductAttention_1/out/bias", att.out_proj.bias, *ident


def _adapt_root(w: np.ndarray, cin: int) -> np.ndarray:
    """(O, 3, H, W) RGB kernel → (O, cin, H, W): channel mean repeated, scaled by 3/cin."""
    if w.shape[1] == cin:
        return w
    return np.repeat(w.mean(axis=1, keepdims=True), cin, axis=1) * (w.shape[1] / cin)


def _adapt_pos(pe: np.ndarray, grid: int) -> np.ndarray:
    tokens = pe.shape[1]
    if tokens == grid * grid + 1:  # classification checkpoints carry a class token
        pe, tokens = pe[:, 1:], tokens - 1
    g = int(round(tokens ** 0.5))
    if g == grid:
        return pe
    t = torch.from_numpy(pe.reshape(1, g, g, -1)).permute(0, 3, 1, 2)
    t = F.interpolate(t, size=(grid, grid), mode="bilinear", align_corners=False)
    return t.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).numpy()


@torch.no_grad()
def load_npz(model, path: str | Path, strict_vit: bool = True) -> list[str]:
    """Copy weights from a Google ViT/R50+ViT ``.npz``; returns the npz keys not found."""
    path = Path(path)
    with np.load(path) as data:
        weights = {k: data[k] for k in data.files}
    missing = []
    for key, param, to_torch, _ in _npz_entries(model):
        if key not in weights:
            missing.append(key)
            continue
        arr = to_torch(weights[key])
        if key == "conv_root/kernel":
            arr = _adapt_root(arr, param.shape[1])
        if tuple(arr.shape) != tuple(param.shape):
            raise HpcSegError(f"{path}: '{key}' has shape {arr.shape}, model expects {tuple(param.shape)}")
        param.copy_(torch.from_numpy(np.ascontiguousarray(arr)).to(param.dtype))
    pos = "Transformer/posembed_input/pos_embedding"
    if pos in weights:
        model.position_embeddings.copy_(torch.from_numpy(_adapt_pos(weights[pos], model.grid)))
    else:
        missing.append(pos)
    if strict_vit and any(k.startswith("Transformer/") for k in missing):
        raise HpcSegError(f"{path}: transformer weights missing ({[k for k in missing if 'Transformer' in k][:3]}…); "
                          "is the model depth/hidden size that of the checkpoint?")
    return missing


@torch.no_grad()
def export_npz(model, path: str | Path) -> Path:
    """Write the model's encoder weights in the ``.npz`` naming (inverse of ``load_npz``)."""
    out = {key: from_torch(param.detach().cpu().numpy()) for key, param, _, from_torch in _npz_entries(model)}
    out["Transformer/posembed_input/pos_embedding"] = model.position_embeddings.detach().cpu().numpy()
    np.savez(path, **out)
    return Path(path)


def load_pretrained(model, path: str | Path) -> None:
    """Load local weights into ``model``: ``.npz`` (ViT naming) or ``.safetensors``/``.pt`` state dict."""
    path = Path(path)
    if not path.is_file():
        raise HpcSegError(f"{path}: pretrained weights file not found (weights are never downloaded)")
    if path.suffix == ".npz":
        load_npz(model, path)
        return
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("module", state.get("state_dict", state)) if isinstance(state, dict) else state
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise HpcSegError(f"{path}: state dict does not fit the model (missing {result.missing_keys[:3]}, "
                          f"unexpected {result.unexpected_keys[:3]})")

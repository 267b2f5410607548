"""Segment a CT with an hpc-seg ONNX export, with nothing but onnxruntime, numpy, scipy and nibabel.

    python examples/onnx_predict.py model.onnx ct.nii.gz pred.nii.gz

The preprocessing plan in the file's metadata says everything: window, normalisation, the 2.5D slice
stack, the model input size, the output activation. This script is hpc-seg's inference re-written
without torch (hpc_seg/preprocessing/plan.py ``model_input``, evaluation/inference.py); its labels
match ``hpc-seg predict model.onnx`` (tested: tests/evaluation/test_onnx.py).
"""

import json
import sys

import nibabel as nib
import numpy as np
import onnxruntime as ort
from nibabel.orientations import apply_orientation, io_orientation, ornt_transform
from scipy import ndimage

PLAN_VERSION = 1  # the plan layout this script reads (hpc_seg/preprocessing/plan.py PLAN_VERSION)


def resize_matrix(n_in: int, n_out: int, antialias: bool) -> np.ndarray:
    """(n_out, n_in) weights of PyTorch's bilinear resize (align_corners=False): a triangle filter,
    widened by the scale when shrinking with ``antialias`` (as ``F.interpolate(antialias=True)``)."""
    scale = n_in / n_out
    width = max(scale, 1.0) if antialias else 1.0
    centre = (np.arange(n_out) + 0.5) * scale
    if not antialias:  # plain bilinear: the source coordinate is clamped at the first pixel
        centre = np.maximum(centre, 0.5)
    taps = np.arange(n_in) + 0.5
    w = np.clip(1.0 - np.abs(taps[None, :] - centre[:, None]) / width, 0.0, None)
    return w / w.sum(1, keepdims=True)


def resize(x: np.ndarray, hw, antialias: bool) -> np.ndarray:
    """(..., H, W) → (..., h, w)."""
    ry, rx = resize_matrix(x.shape[-2], hw[0], antialias), resize_matrix(x.shape[-1], hw[1], antialias)
    return np.einsum("yh,...hw,xw->...yx", ry, x, rx)


def probabilities(session, plan: dict, volume: np.ndarray, batch: int = 16) -> np.ndarray:
    """(Z, Y, X) HU → (K, Z, Y, X) class probabilities on the volume's grid."""
    k = plan["slices"] if plan["mode"] == "2.5d" else 1
    depth, hw = volume.shape[0], volume.shape[1:]
    x = np.clip(volume.astype(np.float32), *plan["window"])
    x = (x - np.float32(plan["offset"][0])) / np.float32(max(plan["scale"][0], 1e-6))
    out = []
    for start in range(0, depth, batch):
        zs = np.arange(start, min(start + batch, depth))
        idx = np.clip(zs[:, None] + np.arange(k)[None, :] - k // 2, 0, depth - 1)  # edge slices repeated
        inp = resize(x[idx], plan["size"], antialias=True).astype(np.float32)
        logits = session.run(None, {"image": inp})[0].astype(np.float64)
        if plan["output"] == "sigmoid":
            p = 1.0 / (1.0 + np.exp(-logits))
            p = np.concatenate([1 - p, p], axis=1)
        else:
            e = np.exp(logits - logits.max(1, keepdims=True))
            p = e / e.sum(1, keepdims=True)
        out.append(resize(p, hw, antialias=False))
    return np.concatenate(out).transpose(1, 0, 2, 3)


def largest_liver(labels: np.ndarray, classes: list) -> np.ndarray:
    """``inference.postprocess``: the largest liver(+tumour) component; tumour only inside it."""
    organ = np.isin(labels, [classes.index(c) for c in ("liver", "tumour") if c in classes])
    comp, n = ndimage.label(organ)
    if n > 1:
        keep = 1 + int(np.argmax(ndimage.sum_labels(organ, comp, index=np.arange(1, n + 1))))
        labels = np.where(organ & (comp != keep), 0, labels)
    return labels


def main(model_path: str, ct_path: str, out_path: str) -> None:
    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    if "hpc_seg.plan" not in meta:
        sys.exit(f"{model_path}: no hpc-seg preprocessing plan in its metadata (not an 'hpc-seg export')")
    plan = json.loads(meta["hpc_seg.plan"])
    if plan.get("version") != PLAN_VERSION:
        sys.exit(f"{model_path}: preprocessing plan version {plan.get('version')}; this script reads {PLAN_VERSION}")
    if plan.get("crop"):
        sys.exit(f"{model_path}: a cascade's stage 2 (it sees crops around {plan['crop']['around']}); "
                 "this script runs single-stage models")
    settings = {"tta": False, "postprocess": False, **json.loads(meta.get("hpc_seg.inference", "{}"))}
    img = nib.load(ct_path)
    canon = nib.as_closest_canonical(img)
    volume = np.rint(np.asanyarray(canon.dataobj)).transpose(2, 1, 0)  # RAS, (Z, Y, X)
    probs = probabilities(session, plan, volume)
    if settings["tta"]:  # the mean over the four in-plane mirrorings
        for axes in ((2,), (1,), (1, 2)):
            probs += np.flip(probabilities(session, plan, np.flip(volume, axes)), [a + 1 for a in axes])
        probs /= 4
    labels = probs.argmax(0).astype(np.uint8)
    if settings["postprocess"] and "liver" in plan["classes"]:
        labels = largest_liver(labels, plan["classes"])
    back = ornt_transform(io_orientation(canon.affine), io_orientation(img.affine))
    grid = apply_orientation(labels.transpose(2, 1, 0), back).astype(np.uint8)
    nib.save(nib.Nifti1Image(grid, img.affine), out_path)
    print(f"wrote {out_path}: classes {plan['classes']}, voxels {np.bincount(grid.ravel()).tolist()}")


if __name__ == "__main__":
    main(*sys.argv[1:4])

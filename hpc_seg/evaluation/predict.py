"""``hpc-seg predict model.safetensors /data/new_ct.nii.gz --out pred.nii.gz`` — a raw CT in, labels out.

The input is read and checked like a conversion (4D, empty, corrupt, NaN → clear error naming the
file), reoriented to RAS for the model, and the label map (the model's class indices; LiTS: 0
background, 1 liver, 2 tumour) is mapped back to the input's voxel order and written with the
**input's affine and header** (uint8), so it opens aligned on the CT in ITK-SNAP or 3D Slicer. Any
voxel spacing is accepted: slices are resized to the model's input size exactly as in training.
``--probs FILE.zarr`` also stores the class probabilities (float16, (K, Z, Y, X) in RAS order, one
chunk per slice). Post-processing follows the model's class names (``inference.postprocess``).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, io_orientation, ornt_transform

from hpc_seg.ingest.nifti_io import ct_to_int16, load_nifti, to_canonical
from hpc_seg.errors import HpcSegError
from hpc_seg.evaluation.inference import postprocess as liver_postprocess
from hpc_seg.evaluation.inference import predict_labels, predict_probs
from hpc_seg.evaluation.model_io import device_and_dtype, inference_settings, load_for_eval


def to_input_grid(labels_zyx: np.ndarray, canonical_affine: np.ndarray, input_affine: np.ndarray) -> np.ndarray:
    """(Z, Y, X) RAS labels → the input file's voxel order (inverse of the conversion's reorientation)."""
    ras_xyz = labels_zyx.transpose(2, 1, 0)
    t = ornt_transform(io_orientation(canonical_affine), io_orientation(input_affine))
    return apply_orientation(ras_xyz, t)


def _write_nifti(labels_in_grid: np.ndarray, affine: np.ndarray, out_path: Path, header=None) -> Path:
    """uint8 labels with ``affine`` (and the input's header when given), atomically."""
    if header is not None:
        header = header.copy()
        header.set_data_dtype(np.uint8)
        header.set_slope_inter(1.0, 0.0)
    seg = nib.Nifti1Image(labels_in_grid.astype(np.uint8), affine, header)
    if header is None:
        seg.set_qform(affine, code=1)
        seg.set_sform(affine, code=1)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp" + "".join(out_path.suffixes))
    nib.save(seg, str(tmp))
    tmp.replace(out_path)
    return out_path


def save_case_prediction(out_dir: Path, case_id: str, pred: np.ndarray, case_attrs: dict) -> Path:
    """A store case's (Z, Y, X) prediction in its source's form: NIfTI on the original voxel grid
    (CT; the original affine) or a PNG mask at the source image size (RGB; 0/255 when binary)."""
    from PIL import Image

    from hpc_seg.storage.atomic import atomic_write_bytes

    if "affine_original" in case_attrs:
        canonical, original = np.asarray(case_attrs["affine_canonical"]), np.asarray(case_attrs["affine_original"])
        return _write_nifti(to_input_grid(pred, canonical, original), original, out_dir / f"{case_id}.nii.gz")
    mask = pred[0].astype(np.uint8)
    if mask.max(initial=0) <= 1:
        mask = mask * 255
    import io

    buf = io.BytesIO()
    Image.fromarray(mask, mode="L").save(buf, format="PNG")
    return atomic_write_bytes(out_dir / f"{case_id}.png", buf.getvalue())


def predict_file(source, in_path, out_path, tta: bool | None = None, postprocess: bool | None = None,
                 probs_path=None, cpu: bool = False) -> Path:
    """Segment a NIfTI CT; ``tta``/``postprocess`` None: as the model's config says (``inference``)."""
    in_path, out_path = Path(in_path), Path(out_path)
    model, cfg, plan = load_for_eval(source, prefer_gpu=not cpu)
    tta, postprocess = inference_settings(cfg, tta, postprocess)
    if plan.modality != "CT":
        raise HpcSegError(f"{source}: a model for {plan.modality} images ({plan.kind}) cannot segment the CT "
                          f"volume {in_path}")
    img = load_nifti(in_path)
    ct = to_canonical(img, in_path)
    data = ct_to_int16(ct.data, in_path)
    device, amp = device_and_dtype(prefer_gpu=not cpu, model=model)
    if probs_path:
        probs = predict_probs(model, plan, data[None], device, amp, tta=tta)
        labels = probs.argmax(0).astype(np.uint8)
    else:  # argmax where the model ran: only uint8 labels reach the host (not 2.5 GB of float32 at 512²×800)
        probs, labels = None, predict_labels(model, plan, data[None], device, amp, tta=tta).labels
    if postprocess:
        labels = liver_postprocess(labels, plan.classes)
    out = to_input_grid(labels, ct.affine_canonical, img.affine).astype(np.uint8)
    if out.shape != img.shape:
        raise HpcSegError(f"{in_path}: internal error, prediction shape {out.shape} != input {img.shape}")
    _write_nifti(out, img.affine, out_path, header=img.header)
    if probs_path:
        _save_probs(probs, ct.spacing, Path(probs_path))
    return out_path


def _save_probs(probs: np.ndarray, spacing, path: Path) -> None:
    import shutil

    import zarr

    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    k, z, y, x = probs.shape
    arr = zarr.create_array(str(tmp), shape=probs.shape, chunks=(1, 1, y, x), dtype="float16",
                            dimension_names=("c", "z", "y", "x"))
    arr[...] = probs.astype(np.float16)
    arr.attrs["spacing_zyx"] = [float(s) for s in spacing]
    arr.attrs["orientation"] = "RAS"
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)

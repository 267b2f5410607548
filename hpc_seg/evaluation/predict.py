"""``hpc-seg predict MODEL INPUT --out OUT`` — a raw CT in (a NIfTI file or a DICOM series folder),
labels out (NIfTI, or a DICOM Segmentation object for a DICOM series), with volumes beside them.

The input is read and checked like a conversion (4D, empty, corrupt, NaN, values that are not
Hounsfield units → a clear error naming the file; a DICOM folder with the same reader and checks as
``convert ircadb``, reformats and localizers of another orientation left out and reported),
reoriented to RAS for the model, and the label map (the model's class indices; LiTS: 0 background,
1 liver, 2 tumour) is mapped back to the input's own voxel order: a NIfTI output keeps the **input's
affine and header** (uint8), a DICOM-SEG references the series' own slices. Any voxel spacing is
accepted: slices are resized to the model's input size exactly as in training. ``--probs FILE.zarr``
also stores the class probabilities (float16, (K, Z, Y, X) in RAS order, one chunk per slice).
Post-processing follows the model's class names (``inference.postprocess``). ``OUT`` + ``.json``
holds the volumes (``hpc_seg.metrics.volumes``). An existing output is refused without ``overwrite``.
A folder of cases is ``hpc_seg.evaluation.batch``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, io_orientation, ornt_transform

from hpc_seg import __version__
from hpc_seg.errors import HpcSegError, InputDataError
from hpc_seg.evaluation.inference import postprocess as liver_postprocess
from hpc_seg.evaluation.cascade import Cascade, case_labels, load_model
from hpc_seg.evaluation.inference import predict_probs
from hpc_seg.evaluation.model_io import device_and_dtype, inference_settings
from hpc_seg.ingest.dicom_io import Series, is_series_folder, load_dicom_ct
from hpc_seg.ingest.nifti_io import CanonicalVolume, ct_to_int16, load_nifti, to_canonical
from hpc_seg.metrics.volumes import case_volumes

FORMATS = ("nifti", "dicom-seg")
AIR_HU = -500.0  # every CT holds air (outside the body, lungs, bowel) well below this


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


@dataclass
class CaseInput:
    """A CT read for prediction: the canonical volume and what its output needs (the input grid)."""

    path: Path
    canon: CanonicalVolume
    affine: np.ndarray  # of the input grid: the NIfTI's, or the series' RAS affine
    shape: tuple
    header: object = None  # the NIfTI's header (kept on the output); None for DICOM
    series: Series | None = None

    @property
    def left_out(self) -> list[str]:
        return self.series.left_out if self.series is not None else []


def case_name(path: Path) -> str:
    """The case id of an input: a NIfTI file's name without .nii(.gz), a series folder's name."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def require_hu(data: np.ndarray, path: Path) -> None:
    """Refuse what is not a CT in Hounsfield units (a label map, an MR image, unrescaled values)."""
    lo, hi = float(data.min()), float(data.max())
    if lo > AIR_HU or hi - lo < 200:
        raise InputDataError(path, f"values {lo:g}..{hi:g} do not look like a CT in Hounsfield units (no voxel "
                                   f"below {AIR_HU:g} HU, i.e. no air): a label map, an MR image or unrescaled values?")


def read_input(path: str | Path, series_uid: str | None = None) -> CaseInput:
    """A NIfTI file or a DICOM series folder → CaseInput (errors name the file and the problem)."""
    path = Path(path)
    if path.is_dir():
        if not is_series_folder(path) and not any(p.is_dir() for p in path.iterdir()):
            raise InputDataError(path, "no DICOM files in this folder")
        canon, series = load_dicom_ct(path, series_uid)
        case = CaseInput(path, canon, series.image.affine, series.image.shape, None, series)
    else:
        if series_uid is not None:
            raise InputDataError(path, "--series picks a series of a DICOM folder; this is a file")
        if _is_dicom_file(path):
            raise InputDataError(path, "one DICOM file is one slice: pass the folder that holds the whole series")
        img = load_nifti(path)
        canon = to_canonical(img, path)
        canon.data = ct_to_int16(canon.data, path)
        case = CaseInput(path, canon, np.asarray(img.affine), img.shape, img.header)
    require_hu(case.canon.data, path)
    return case


def _is_dicom_file(path: Path) -> bool:
    from pydicom.misc import is_dicom

    return path.is_file() and not path.name.lower().endswith((".nii", ".nii.gz")) and is_dicom(path)


SUFFIXES = {"nifti": (".nii.gz", ".nii"), "dicom-seg": (".dcm",)}


def check_output(out: Path, fmt: str, source: Path | None = None) -> None:
    """Before anything runs: the output's name fits its format, and it is neither a folder nor the input."""
    out = Path(out)
    if out.is_dir():
        raise HpcSegError(f"--out {out}: is a folder; one CT writes one file (a folder of cases writes a folder)")
    if not out.name.lower().endswith(SUFFIXES[fmt]):
        raise HpcSegError(f"--out {out}: a {fmt} output ends in {' or '.join(SUFFIXES[fmt])}")
    if source is not None and out.resolve() == Path(source).resolve():
        raise HpcSegError(f"--out {out}: is the input itself")


def output_format(out: Path, fmt: str | None) -> str:
    """``--format``, else from the output's name: ``.dcm`` → DICOM-SEG, anything else NIfTI."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise HpcSegError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        return fmt
    return "dicom-seg" if Path(out).suffix.lower() == ".dcm" else "nifti"


def sidecar(out: Path) -> Path:
    """The JSON beside an output: its full name + ``.json`` (``pred.nii.gz.json``, ``pred.dcm.json``:
    a NIfTI and a DICOM-SEG of one case never share one)."""
    out = Path(out)
    return out.with_name(out.name + ".json")


class Predictor:
    """A model loaded once, with its plan, settings and device, for any number of cases."""

    def __init__(self, source, tta: bool | None = None, postprocess: bool | None = None, cpu: bool = False):
        self.source = str(source)
        self.model, self.cfg, self.plan = load_model(source, prefer_gpu=not cpu)
        if self.plan.modality != "CT":
            raise HpcSegError(f"{source}: a model for {self.plan.modality} images ({self.plan.kind}) cannot "
                              "segment CT volumes")
        self.tta, self.postprocess = inference_settings(self.cfg, tta, postprocess)
        self.device, self.amp = device_and_dtype(prefer_gpu=not cpu, model=self.model)
        self.plan_digest = hashlib.sha256(self.plan.to_json().encode()).hexdigest()
        self.fingerprint = {"model": self.source, "model_sha256": _file_digest(Path(source)),
                            "plan_sha256": self.plan_digest, "tta": self.tta, "postprocess": self.postprocess,
                            "hpc_seg": __version__}

    def labels(self, case: CaseInput, with_probs: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """(Z, Y, X) RAS labels (and probabilities when asked) of one case."""
        data = case.canon.data[None]
        if with_probs and isinstance(self.model, Cascade):
            raise HpcSegError(f"{self.source}: --probs is not available for a cascade (its probabilities live in "
                              "two grids: the case's and the organ box's)")
        if with_probs:
            probs = predict_probs(self.model, self.plan, data, self.device, self.amp, tta=self.tta)
            labels = probs.argmax(0).astype(np.uint8)
        else:  # argmax where the model ran: only uint8 labels reach the host (not 2.5 GB of float32 at 512²×800)
            probs, labels = None, case_labels(self.model, self.plan, data, self.device, self.amp, tta=self.tta).labels
        if self.postprocess:
            labels = liver_postprocess(labels, self.plan.classes)
        return labels, probs

    def write(self, case: CaseInput, labels: np.ndarray, out: Path, fmt: str) -> dict:
        """The labels in the input's own grid as ``fmt``, and the JSON of volumes beside; returns that JSON."""
        grid = to_input_grid(labels, case.canon.affine_canonical, case.affine).astype(np.uint8)
        if grid.shape != tuple(case.shape):
            raise HpcSegError(f"{case.path}: internal error, prediction shape {grid.shape} != input {case.shape}")
        if fmt == "dicom-seg":
            self._write_seg(case, grid, out)
        else:
            _write_nifti(grid, case.affine, out, header=case.header)
        info = {"case": case_name(case.path), "input": str(case.path), "output": str(out), "format": fmt,
                **self.fingerprint, "series_uid": case.series.uid if case.series else None,
                "left_out": case.left_out, **case_volumes(labels, case.canon.spacing, list(self.plan.classes))}
        from hpc_seg.storage.atomic import atomic_write_bytes

        atomic_write_bytes(sidecar(out), (json.dumps(info, indent=1) + "\n").encode())
        return info

    def _write_seg(self, case: CaseInput, grid: np.ndarray, out: Path) -> None:
        from hpc_seg.ingest.dicom_seg import write_seg

        require_series(case)
        write_seg(grid.transpose(2, 1, 0), [s.ds for s in case.series.slices], list(self.plan.classes), out,
                  model_name=self.cfg.model.name, version=__version__, plan_digest=self.plan_digest,
                  where=case.path)


def _file_digest(path: Path) -> str | None:
    """SHA-256 of an exported model file (a run directory's checkpoint is named by ``model`` instead)."""
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def require_series(case: CaseInput) -> None:
    """A DICOM-SEG needs a series to reference, with the UIDs highdicom references (checked before
    the model loads and minutes of inference)."""
    from hpc_seg.ingest.dicom_seg import seg_sources

    if case.series is None:
        raise InputDataError(case.path, "a DICOM-SEG needs a DICOM series as input (it references the source "
                                        "slices); a NIfTI input has none: write NIfTI (--out X.nii.gz)")
    seg_sources([s.ds for s in case.series.slices[:1]], case.path)


def refuse_existing(*paths, overwrite: bool = False) -> None:
    for p in paths:
        if p is not None and Path(p).exists() and not overwrite:
            raise HpcSegError(f"{p} exists; pass --overwrite to replace it")


def predict_file(source, in_path, out_path, tta: bool | None = None, postprocess: bool | None = None,
                 probs_path=None, cpu: bool = False, fmt: str | None = None, series_uid: str | None = None,
                 overwrite: bool = False) -> tuple[Path, dict]:
    """Segment one CT (NIfTI file or DICOM series folder); ``tta``/``postprocess`` None: as the
    model's config says (``inference``). Returns the output path and the volumes written beside it."""
    out_path = Path(out_path)
    fmt = output_format(out_path, fmt)
    check_output(out_path, fmt, in_path)
    refuse_existing(out_path, sidecar(out_path), probs_path, overwrite=overwrite)
    case = read_input(in_path, series_uid)
    if fmt == "dicom-seg":  # before the model loads and minutes of inference
        require_series(case)
    predictor = Predictor(source, tta, postprocess, cpu)
    labels, probs = predictor.labels(case, with_probs=bool(probs_path))
    info = predictor.write(case, labels, out_path, fmt)
    if probs_path:
        _save_probs(probs, case.canon.spacing, Path(probs_path))
    return out_path, info


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

"""Convert LiTS17 / MSD Task03 / Kvasir-SEG / phantom sources into the hpc-seg Zarr store.

Commands::

    hpc-seg convert lits   /data/LiTS17        /scratch/lits.zarr   --workers 8
    hpc-seg convert msd    /data/Task03_Liver  /scratch/msd.zarr
    hpc-seg convert kvasir /data/Kvasir-SEG    /scratch/kvasir.zarr

Idempotent: complete cases are skipped; half-written ones are rewritten. A bad case (corrupt
file, mismatched volume/segmentation, labels out of range, NaN voxels, missing segmentation,
unreadable JPEG, mask size mismatch) is skipped and reported with its file and problem; the
command then exits with status 1, leaving every good case converted.
"""

from __future__ import annotations

import multiprocessing as mp
import re
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hpc_seg.data import store as zstore
from hpc_seg.data.index import case_stats, write_index
from hpc_seg.data.nifti_io import load_ct_pair, load_rgb_pair
from hpc_seg.errors import HpcSegError, InputDataError

NIFTI_RE = r"\.nii(\.gz)?$"


@dataclass(frozen=True)
class CaseSource:
    case_id: str
    image: Path | None
    label: Path | None
    kind: str  # "ct" or "rgb"


@dataclass
class ConversionReport:
    store: Path
    converted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already complete
    failed: dict[str, str] = field(default_factory=dict)  # case_id -> "file: problem"

    @property
    def ok(self) -> bool:
        return not self.failed


def _require_dir(src: Path, expected: str) -> None:
    if not src.is_dir():
        raise InputDataError(src, f"input directory not found (expected {expected})")


def discover_lits(src: Path) -> list[CaseSource]:
    """``volume-N.nii[.gz]`` + ``segmentation-N.nii[.gz]`` (searched recursively)."""
    _require_dir(src, "LiTS17 layout: volume-N.nii + segmentation-N.nii")
    vols, segs = {}, {}
    for p in sorted(src.rglob("*")):
        m = re.match(r"^(volume|segmentation)-(\d+)" + NIFTI_RE, p.name)
        if m and p.is_file():
            (vols if m.group(1) == "volume" else segs)[int(m.group(2))] = p
    if not vols and not segs:
        raise InputDataError(src, "no volume-N.nii[.gz] files found (expected LiTS17 layout: "
                                  "volume-N.nii + segmentation-N.nii)")
    return [CaseSource(f"lits_{n:04d}", vols.get(n), segs.get(n), "ct")
            for n in sorted(set(vols) | set(segs))]


def discover_msd(src: Path) -> list[CaseSource]:
    """MSD Task03_Liver: ``imagesTr/liver_N.nii.gz`` + ``labelsTr/liver_N.nii.gz``."""
    _require_dir(src, "MSD layout: imagesTr/ + labelsTr/")
    img_dir, lab_dir = src / "imagesTr", src / "labelsTr"
    if not img_dir.is_dir() or not lab_dir.is_dir():
        raise InputDataError(src, "not an MSD task directory (imagesTr/ and labelsTr/ expected)")

    def scan(d: Path) -> dict[int, Path]:
        out = {}
        for p in d.iterdir():  # MSD archives carry macOS "._liver_N" files: ignored by the regex
            m = re.match(r"^[A-Za-z]+_(\d+)" + NIFTI_RE, p.name)
            if m and p.is_file():
                out[int(m.group(1))] = p
        return out

    imgs, labs = scan(img_dir), scan(lab_dir)
    if not imgs and not labs:
        raise InputDataError(img_dir, "no liver_N.nii.gz files found")
    return [CaseSource(f"msd_{n:04d}", imgs.get(n), labs.get(n), "ct") for n in sorted(set(imgs) | set(labs))]


def discover_kvasir(src: Path) -> list[CaseSource]:
    """Kvasir-SEG: ``images/NAME.jpg`` + ``masks/NAME.jpg``."""
    _require_dir(src, "Kvasir-SEG layout: images/ + masks/")
    img_dir, mask_dir = src / "images", src / "masks"
    if not img_dir.is_dir() or not mask_dir.is_dir():
        raise InputDataError(src, "not a Kvasir-SEG directory (images/ and masks/ expected)")
    exts = {".jpg", ".jpeg", ".png"}
    imgs = {p.stem: p for p in img_dir.iterdir() if p.suffix.lower() in exts}
    masks = {p.stem: p for p in mask_dir.iterdir() if p.suffix.lower() in exts}
    if not imgs and not masks:
        raise InputDataError(img_dir, "no .jpg images found")
    return [CaseSource(stem, imgs.get(stem), masks.get(stem), "rgb") for stem in sorted(set(imgs) | set(masks))]


DISCOVER = {"lits": discover_lits, "phantom": discover_lits, "msd": discover_msd, "kvasir": discover_kvasir}


def _load_case(src: CaseSource, num_classes: int):
    if src.image is None:
        raise InputDataError(src.label, "label has no matching image/volume file")
    if src.label is None:
        raise InputDataError(src.image, "volume has no matching segmentation/mask file")
    if src.kind == "rgb":
        rgb, mask = load_rgb_pair(src.image, src.label)
        image = rgb.transpose(2, 0, 1)[:, None]  # (3, 1, H, W)
        meta = {"source": {"image": str(src.image), "label": str(src.label)}, "spacing_unit": None}
        return image, mask[None], (1.0, 1.0, 1.0), meta
    ct, seg = load_ct_pair(src.image, src.label, num_classes)
    meta = {
        "source": {"image": str(src.image), "label": str(src.label)},
        "affine_original": ct.affine_original.tolist(),
        "affine_canonical": ct.affine_canonical.tolist(),
        "orientation": "RAS",
        "source_shape_xyz": list(ct.data.shape[::-1]),
        "spacing_unit": "millimeter",
    }
    return ct.data[None], seg.data, ct.spacing, meta


def convert_case(src: CaseSource, store_path: str, num_classes: int) -> tuple[str, str, dict | None]:
    """Worker: convert one case. Returns (case_id, 'ok'|'skipped'|'failed', stats|error)."""
    if zstore.case_complete(store_path, src.case_id):
        return src.case_id, "skipped", None
    try:
        image, label, spacing, meta = _load_case(src, num_classes)
    except InputDataError as exc:
        return src.case_id, "failed", {"error": str(exc)}
    stats = case_stats(image, label, num_classes, spacing)
    unit = meta.pop("spacing_unit")
    zstore.write_case(store_path, src.case_id, image, label, {**meta, "case_id": src.case_id,
                      "stats": stats}, spacing, unit)
    return src.case_id, "ok", None


def _single_threaded_worker() -> None:
    """One core per worker process: the pool, not threads inside each worker, gives parallelism."""
    import numcodecs
    import zarr

    numcodecs.blosc.set_nthreads(1)
    zarr.config.set({"threading.max_workers": 1})


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]convert"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("{task.description}"), transient=False)


def convert(dataset: str, src: str | Path, out: str | Path, workers: int = 1,
            show_progress: bool = True) -> ConversionReport:
    """Convert every case of ``src`` into the store ``out``; returns a report (see module doc)."""
    if dataset not in DISCOVER:
        raise HpcSegError(f"unknown dataset '{dataset}' (choose from {', '.join(sorted(DISCOVER))})")
    sources = DISCOVER[dataset](Path(src))
    root = zstore.create_or_open_store(out, dataset)
    num_classes = len(zstore.CLASSES[dataset])
    report = ConversionReport(Path(out))
    pool = None
    if workers > 1:
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                   initializer=_single_threaded_worker)
    try:
        with _progress() if show_progress else _NullProgress() as progress:
            task = progress.add_task("", total=len(sources))
            if pool is None:
                results = (convert_case(s, str(out), num_classes) for s in sources)
            else:
                futures = [pool.submit(convert_case, s, str(out), num_classes) for s in sources]
                results = (f.result() for f in as_completed(futures))
            for case_id, status, info in results:
                if status == "failed":
                    report.failed[case_id] = info["error"]
                else:
                    (report.converted if status == "ok" else report.skipped).append(case_id)
                progress.update(task, advance=1, description=case_id)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    rebuild_index(out, root)
    return report


def rebuild_index(out: str | Path, root=None) -> Path:
    """Gather the stats of every complete case into ``index.json``."""
    root = root if root is not None else zstore.open_store(out, mode="r")
    meta = root.attrs["hpc_seg"]
    cases = {}
    for cid in zstore.list_cases(root):
        attrs = root["cases"][cid].attrs["hpc_seg"]
        cases[cid] = {"stats": attrs["stats"], "source": attrs.get("source")}
    return write_index(out, meta["dataset"], meta["classes"], cases)


class _NullProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *a, **k):
        return 0

    def update(self, *a, **k):
        pass


def case_arrays(store_path: str | Path, case_id: str) -> tuple[np.ndarray, np.ndarray]:
    """Read a whole case back as numpy (image (C,Z,Y,X), label (Z,Y,X))."""
    root = zstore.open_store(store_path)
    g = root["cases"][case_id]
    return g["image"][...], g["label"][...]

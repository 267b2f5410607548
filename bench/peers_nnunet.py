"""nnU-Net v2 as hpc-seg's peer (``bench/peers.py``): its raw format written from an hpc-seg store,
``nnUNetv2_plan_and_preprocess``, training on a wall-clock budget (``bench/nnunet_ext``), its
predictor, and its predictions read back onto the store's grid for hpc-seg's metric code.

The raw dataset holds exactly the cases given (hpc-seg's training split, and its validation split
where it has one), written from the same store hpc-seg trains on: RGB images as 8-bit PNG
(``channel_names`` R, G, B; masks 0/1 PNG), CT as NIfTI with the store's canonical affine (HU as
stored). ``splits_final.json`` makes nnU-Net's fold 0 hpc-seg's train/val split; without
validation cases nnU-Net trains on fold ``all`` (every case, validated on them too).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
RUNNER = HERE / "nnunet_ext" / "run.py"  # its Python API with the budget trainer (run.py says why)


def environment(scratch: Path) -> dict:
    """nnU-Net's three folders in ``scratch``, data-augmentation
    workers sized for this machine (half its cores: the other half trains)."""
    env = dict(os.environ)
    for key, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"), ("nnUNet_results", "results")):
        (scratch / sub).mkdir(parents=True, exist_ok=True)
        env[key] = str(scratch / sub)
    env["nnUNet_n_proc_DA"] = str(max(1, (os.cpu_count() or 2) // 2))
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def dataset_name(dataset_id: int, task: str) -> str:
    return f"Dataset{dataset_id:03d}_{task.capitalize()}"


def _rgb(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8:
        raise ValueError(f"an RGB image must be 8-bit in the store, got {image.dtype}")
    return np.ascontiguousarray(image[:, 0].transpose(1, 2, 0))


def write_case(store, cid: str, images: Path, labels: Path | None, key: str) -> str:
    """One store case as nnU-Net input ``images/<key>_0000<ext>`` (+ ``labels/<key><ext>``); the extension."""
    from PIL import Image

    g = store.root["cases"][cid]
    image = g["image"][...]
    images.mkdir(parents=True, exist_ok=True)
    if image.shape[0] == 3 and image.shape[1] == 1:
        Image.fromarray(_rgb(image), "RGB").save(images / f"{key}_0000.png")
        if labels is not None:
            labels.mkdir(parents=True, exist_ok=True)
            Image.fromarray(g["label"][0].astype(np.uint8), "L").save(labels / f"{key}.png")
        return ".png"
    import nibabel as nib

    affine = np.asarray(g.attrs["hpc_seg"]["affine_canonical"], dtype=np.float64)
    nib.save(nib.Nifti1Image(image[0].transpose(2, 1, 0), affine), images / f"{key}_0000.nii.gz")
    if labels is not None:
        labels.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(g["label"][...].transpose(2, 1, 0).astype(np.uint8), affine),
                 labels / f"{key}.nii.gz")
    return ".nii.gz"


def case_key(cid: str) -> str:
    """nnU-Net's case identifier: no dots (its file-ending split) and no trailing ``_0000``-like part."""
    return "c_" + cid.replace(".", "_")


def write_raw(store, cases: list[str], raw: Path, dataset_id: int, task: str) -> Path:
    """``DatasetNNN_Task/imagesTr``, ``labelsTr``, ``dataset.json`` of ``cases``."""
    folder = raw / dataset_name(dataset_id, task)
    ending = None
    for cid in cases:
        ending = write_case(store, cid, folder / "imagesTr", folder / "labelsTr", case_key(cid))
    classes = list(store.info["classes"])
    channels = {"0": "R", "1": "G", "2": "B"} if ending == ".png" else {"0": "CT"}
    meta = {"channel_names": channels, "labels": {name: i for i, name in enumerate(classes)},
            "numTraining": len(cases), "file_ending": ending,
            "overwrite_image_reader_writer": "NaturalImage2DIO" if ending == ".png" else "SimpleITKIO"}
    (folder / "dataset.json").write_text(json.dumps(meta, indent=1))
    return folder


def write_splits(preprocessed: Path, dataset_id: int, task: str, train: list[str], val: list[str]) -> None:
    """Fold 0 = hpc-seg's split (nnU-Net's own 5-fold split would train on 80 % of the training cases)."""
    folder = preprocessed / dataset_name(dataset_id, task)
    split = [{"train": [case_key(c) for c in train], "val": [case_key(c) for c in val]}]
    (folder / "splits_final.json").write_text(json.dumps(split, indent=1))


def _run(cmd: list[str], env: dict, log: Path) -> float:
    t0 = time.time()
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{cmd[0]} failed (exit {proc.returncode}); log {log}:\n{tail}")
    return time.time() - t0


def plan_and_preprocess(env: dict, dataset_id: int, log: Path) -> float:
    procs = str(max(1, os.cpu_count() or 1))
    return _run([str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id), "-c", "2d",
                 "--verify_dataset_integrity", "-np", procs, "-npfp", procs], env, log)


def train(env: dict, dataset_id: int, fold: str, minutes: float, device: str, log: Path,
          snapshots: tuple[float, ...] = ()) -> float:
    env = {**env, "HPC_SEG_PEER_MINUTES": str(minutes), "HPC_SEG_PEER_SNAPSHOTS": ",".join(map(str, snapshots))}
    return _run([sys.executable, str(RUNNER), "train", str(dataset_id), fold, "--device", device], env, log)


def model_folder(env: dict, dataset_id: int, task: str, fold: str) -> Path:
    return (Path(env["nnUNet_results"]) / dataset_name(dataset_id, task) / "nnUNetTrainerBudget__nnUNetPlans__2d"
            / f"fold_{fold}")


def predict(env: dict, dataset_id: int, task: str, fold: str, images: Path, out: Path, device: str, mirror: bool,
            log: Path, checkpoint: str = "checkpoint_final.pth") -> float:
    cmd = [sys.executable, str(RUNNER), "predict", str(model_folder(env, dataset_id, task, fold).parent), fold,
           str(images), str(out), "--checkpoint", checkpoint, "--device", device]
    return _run(cmd + (["--mirror"] if mirror else []), env, log)


def read_prediction(out: Path, cid: str, ending: str) -> np.ndarray:
    """A prediction back on the store's (Z, Y, X) grid."""
    path = out / f"{case_key(cid)}{ending}"
    if ending == ".png":
        from PIL import Image

        return np.asarray(Image.open(path), dtype=np.uint8)[None]
    import nibabel as nib

    return np.asarray(nib.load(path).dataobj, dtype=np.uint8).transpose(2, 1, 0)

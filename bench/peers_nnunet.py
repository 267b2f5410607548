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
    keys = [case_key(c) for c in cases]
    if len(set(keys)) != len(keys):
        raise ValueError(f"two cases share an nnU-Net identifier: {sorted(k for k in keys if keys.count(k) > 1)}")
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


# ---------------------------------------------------------------- one nnU-Net system of bench/peers.py
def _images(store, cases: list[str], folder: Path) -> tuple[Path, str]:
    """The cases as nnU-Net input in ``folder/images`` (rewritten when it holds other cases); the extension."""
    import shutil

    images = folder / "images"
    keys = {case_key(c) for c in cases}
    have = {p.name[:p.name.rindex("_0000")] for p in images.glob("*_0000.*")} if images.is_dir() else set()
    if have != keys:
        shutil.rmtree(images, ignore_errors=True)
        for c in cases:
            write_case(store, c, images, None, case_key(c))
    return images, (".png" if any(images.glob("*.png")) else ".nii.gz")


def score(env: dict, ctx: dict, store_path: Path, cases: list[str], folder: Path, mirror: bool,
          checkpoint: str = "checkpoint_final.pth", postprocess: bool = False) -> tuple[dict, float]:
    """nnU-Net's labels of ``cases`` (predicted once per checkpoint and mirroring) scored by hpc-seg's
    code; ``postprocess``: after hpc-seg's liver post-processing. Returns (figures, predict seconds)."""
    from hpc_seg.evaluation.inference import postprocess as liver_postprocess
    from hpc_seg.evaluation.score import score_labels
    from hpc_seg.ingest.catalog import Store

    store = Store.open(store_path)
    images, ending = _images(store, cases, folder)
    out = folder / f"pred-{checkpoint.split('.')[0]}{'-mirrored' if mirror else ''}"
    done = out.is_dir() and all((out / f"{case_key(c)}{ending}").is_file() for c in cases)
    if not done:
        seconds = predict(env, ctx["id"], ctx["task"], ctx["fold"], images, out, ctx["device"], mirror, ctx["log"],
                          checkpoint)
        (out / "seconds.json").write_text(json.dumps({"seconds": seconds}))  # a rerun reports what it took
    seconds = json.loads((out / "seconds.json").read_text())["seconds"] if (out / "seconds.json").is_file() else 0.0
    names = list(ctx["plan"].classes)
    read = (lambda c: liver_postprocess(read_prediction(out, c, ending), names)) if postprocess else (
        lambda c: read_prediction(out, c, ending))
    return score_labels(store, ctx["plan"], cases, read), seconds


def _system(folder: Path, pre_s: float, train_s: float) -> dict:
    timing = json.loads((folder / "timing.json").read_text())
    speed = timing["train_iterations"] * timing["batch_size"] / max(timing["train_seconds"], 1e-9)  # as hpc-seg's
    return {"minutes": {"preprocessing": round(pre_s / 60, 2), "training": round(timing["train_seconds"] / 60, 2),
                        "train_command": round(train_s / 60, 2)},
            "epochs": timing["epochs"], "iterations": timing["train_iterations"], "batch_size": timing["batch_size"],
            "patch_size": timing["patch_size"], "samples_per_s": round(speed, 2),
            "pixels_per_s": round(speed * float(np.prod(timing["patch_size"]))),
            "validation_minutes": round(timing["validation_seconds"] / 60, 2), "last_lr": timing.get("last_lr")}


def prepare(env: dict, store, split: dict, dataset_id: int, task: str, log: Path) -> float:
    """Raw dataset + plan and preprocess, once per work directory (its seconds remembered)."""
    done = Path(env["nnUNet_preprocessed"]) / "prepared.json"
    cases = split["train"] + split["val"]
    if done.is_file():
        rec = json.loads(done.read_text())
        if rec.get("cases") != cases:
            raise SystemExit(f"{done}: nnU-Net was prepared from other cases; use another --work or delete it")
        return rec["seconds"]
    t0 = time.time()
    write_raw(store, cases, Path(env["nnUNet_raw"]), dataset_id, task)
    plan_and_preprocess(env, dataset_id, log)
    write_splits(Path(env["nnUNet_preprocessed"]), dataset_id, task, split["train"], split["val"])
    seconds = time.time() - t0
    done.write_text(json.dumps({"seconds": seconds, "cases": cases}))
    return seconds


def _curve(env: dict, ctx: dict, folder: Path, curve_set, cases: list[str], work: Path, target: str) -> list:
    """Snapshots and the final checkpoint scored on the curve set without mirroring."""
    timing = json.loads((folder / "timing.json").read_text())
    points = [(name, snap["minutes"]) for name, snap in timing["snapshots"].items()]
    points.append(("checkpoint_final.pth", timing["train_seconds"] / 60))
    curve = []
    for chk, at in points:
        res, _ = score(env, ctx, curve_set[1], cases, work / f"eval-nnunet-{ctx['minutes']:g}min-{curve_set[0]}",
                       False, checkpoint=chk)
        curve.append({"minutes": round(at, 2), "iou": res["per_class"][target]["iou"], "checkpoint": chk})
    return curve


def run(args, cfg, work: Path, evals: dict, split: dict, plan, minutes: float, curve_set, dataset_id: int):
    """Train nnU-Net for ``minutes`` (once per work directory and budget); (system, results): its
    figures on every evaluation set (and, where the recipe post-processes, after hpc-seg's
    post-processing beside) and its snapshot curve."""
    from hpc_seg.ingest.catalog import Store

    store = Store.open(cfg.data.store)
    if list(store.info["classes"]) != list(plan.classes):  # nnU-Net's labels are the store's values
        raise SystemExit(f"{cfg.data.store}: classes {store.info['classes']} are not the plan's {plan.classes}")
    scratch = work / "nnunet"
    env = environment(scratch)
    env["nnUNet_results"] = str(scratch / f"results-{minutes:g}min")
    Path(env["nnUNet_results"]).mkdir(parents=True, exist_ok=True)
    ctx = {"id": dataset_id, "task": args.task, "fold": "0" if split["val"] else "all", "device": args.device,
           "log": scratch / f"nnunet-{minutes:g}min.log", "plan": plan, "minutes": minutes}
    pre_s = prepare(env, store, split, dataset_id, args.task, scratch / "nnunet-preprocess.log")
    folder = model_folder(env, dataset_id, args.task, ctx["fold"])
    if not (folder / "timing.json").is_file():  # timing.json: written last
        train_s = train(env, dataset_id, ctx["fold"], minutes, args.device, ctx["log"], snapshots=(0.25, 0.5, 0.75))
        (folder / "command.json").write_text(json.dumps({"seconds": train_s}))
    train_s = json.loads((folder / "command.json").read_text())["seconds"] if (folder / "command.json").is_file() else 0.0
    system, results, seconds = _system(folder, pre_s, train_s), {}, 0.0
    for name, (path, sp) in evals.items():
        cases = cases_of(path, sp, cfg.data.split_seed, args.limit)
        folder_e = work / f"eval-nnunet-{minutes:g}min-{name}"
        res, s = score(env, ctx, path, cases, folder_e, cfg.inference.tta)
        results[name], seconds = figures(res), seconds + s
        results[name].update(tta=cfg.inference.tta, postprocess=False)
        if cfg.inference.postprocess:
            pp, _ = score(env, ctx, path, cases, folder_e, cfg.inference.tta, postprocess=True)
            results[name]["with_hpc_seg_postprocess"] = figures(pp)
    system["minutes"]["inference"] = round(seconds / 60, 2)
    system["curve"] = _curve(env, ctx, folder, curve_set, curve_set[3], work, args.target)
    return system, results


def cases_of(store: Path, split: str, seed: int, limit: int | None) -> list[str]:
    """The cases of a store's split (``all``: every case), the first ``limit`` of them."""
    from hpc_seg.ingest.catalog import Store

    s = Store.open(store)
    return (s.case_ids if split == "all" else s.split(seed)[split])[:limit]


def figures(res: dict) -> dict:
    """What the peers JSON keeps of a ``metrics.json``-like result."""
    out = {}
    for name in (res["per_case"][0]["per_class"] if res["per_case"] else res["per_class"]):  # + liver+tumour
        rows = [r["per_class"].get(name) or {} for r in res["per_case"]]
        dice = [r["dice"] for r in rows if r.get("dice") is not None]
        iou = [r["iou"] for r in rows if r.get("iou") is not None]
        out[name] = {"mean_dice_per_case": sum(dice) / len(dice) if dice else None,
                     "mean_iou_per_case": sum(iou) / len(iou) if iou else None}
    return {"per_class": res["per_class"], "per_case_mean": out, "cases": res["cases"],
            "lesions": res.get("lesions"), "note": res.get("note")}

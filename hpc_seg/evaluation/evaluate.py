"""``hpc-seg evaluate RUN_DIR|model.safetensors --data STORE --split test --out eval/`` (1 GPU or CPU).

``--save-predictions`` also writes ``OUT/predictions/<case>.nii.gz`` on each case's original NIfTI
grid (as ``hpc-seg predict`` does) or ``<case>.png`` masks at the source image size (RGB).
The model's preprocessing plan (inside the model file or run directory) decides the input;
any store of the same task is accepted: classes are matched by name, a store marking fewer
classes than the model (a LiTS model on CHAOS: no tumour) is scored with the missing classes
counted as the class they lie in (``metrics.json`` ``note`` says so), and cases that annotate
only some classes get no figure for the others (``hpc_seg.preprocessing.labels``). Other channels,
modality or classes are refused, naming both sides.

Whole cases from the Zarr store, slice-wise inference, metrics over the whole evaluation
(``SegmentationMetrics``) plus per-case LiTS figures (Dice, IoU, VOE, RVD, ASSD, MSSD in mm).
Argmax and the PR histogram run on the device the model runs on (GPU or CPU, the same code):
only uint8 labels and small count vectors reach the host (docs/evaluation.md).
Liver-tumour models also get lesion detection (``lesions``: pooled; ``per_case[].lesions``) and
volumes predicted vs reference (``per_case[].volumes_ml``) on cases that mark their tumours
(``hpc_seg.metrics.lesions``, ``hpc_seg.metrics.volumes``).
Writes ``OUT/metrics.json`` (``mean_iou``, ``per_class``, ``per_case``, …), ``OUT/per_case.csv``,
``OUT/pr_curve.png``, ``OUT/overlays.png`` (worst/median/best case) and, from a run directory,
``OUT/training_curves.png``; prints a rich table and the throughput (volumes/s).
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

import numpy as np

from hpc_seg.ingest.catalog import SPLITS, Store
from hpc_seg.preprocessing.labels import case_label_map, merged_note, store_label_lut
from hpc_seg.errors import HpcSegError
from hpc_seg.evaluation.inference import postprocess as liver_postprocess
from hpc_seg.evaluation.cascade import case_labels, load_model
from hpc_seg.evaluation.model_io import device_and_dtype, inference_settings
from hpc_seg.evaluation.onnx_io import OnnxModel
from hpc_seg.evaluation.predict import save_case_prediction
from hpc_seg.evaluation.score import add_case, summarise
from hpc_seg.metrics import SegmentationMetrics, plot_pr_curve
from hpc_seg.models import count_parameters
from hpc_seg.storage.atomic import atomic_write_json, atomic_write_text


def _cases(store: Store, plan, split: str) -> list[str]:
    if split == "all":
        return store.case_ids
    if split not in SPLITS:
        raise HpcSegError(f"unknown split '{split}' (train, val, test or all)")
    return store.split(plan.split_seed)[split]


def evaluate(source, store, split: str = "test", out="eval", tag: str = "best", tta: bool | None = None,
             postprocess: bool | None = None, limit: int | None = None, cpu: bool = False,
             save_predictions: bool = False) -> dict:
    """Score a model on a store's split with the model's own preprocessing plan. Each case is
    predicted from its image alone; its label is read only afterwards, for the metrics.
    ``tta``/``postprocess`` None: as the model's config says (``inference`` section)."""
    out = Path(out)
    model, cfg, plan = load_model(source, tag, prefer_gpu=not cpu)
    tta, postprocess = inference_settings(cfg, tta, postprocess)
    store = Store.open(store)  # opened once; handed to everything below
    info, index = store.info, store.index
    lut = store_label_lut(plan, info, store)  # store label value → model class (same task, by name)
    cases = _cases(store, plan, split)[:limit]
    if not cases:
        raise HpcSegError(f"{store}: split '{split}' has no cases")
    names = list(plan.classes)
    device, amp = device_and_dtype(prefer_gpu=not cpu, model=model)
    metrics = SegmentationMetrics(len(names), names)
    extra, t0, shown = {}, time.perf_counter(), {}
    for cid in cases:
        extra[cid], shown[cid] = _score_case(store.root["cases"][cid], cid, model, plan, metrics, lut, index, info,
                                             device, amp, tta, postprocess, out if save_predictions else None)
    seconds = time.perf_counter() - t0
    res = summarise(metrics, extra, cases)
    res.update({"source": str(source), "store": store.path, "split": split, "cases": len(cases),
                "seconds": seconds, "volumes_per_s": len(cases) / seconds, "device": str(device), "runtime": getattr(model, "provider", "torch"),
                "tta": tta, "postprocess": postprocess, "model": cfg.model.name, "size": cfg.model.size,
                "overrides": cfg.model.overrides, "params": _params(model),
                "name": cfg.name, "plan": plan.to_dict(), "store_classes": list(info["classes"]),
                "note": merged_note(plan, info["classes"])})
    _write(out, res, shown, names, source)
    return res


def _params(model) -> int | None:
    """Trainable parameters; None for an ONNX graph (its initialisers mix weights and BatchNorm statistics)."""
    return None if isinstance(model, OnnxModel) else count_parameters(model)


def _score_case(g, cid: str, model, plan, metrics: SegmentationMetrics, lut: np.ndarray, index: dict, info: dict,
                device, amp, tta: bool, postprocess: bool, out: Path | None) -> tuple[dict, tuple]:
    """Predict one case from its image, then read its label and score it: the counts into
    ``metrics``; returns its LiTS figures and the slice the overlays show. Argmax and the PR
    histogram run on ``device``; only uint8 labels and (2, bins) counts come to the host."""
    names = list(plan.classes)
    image = g["image"][...]
    lmap = case_label_map(plan, index, cid, info["classes"])  # from the index (what it annotates), not its voxels
    pred = case_labels(model, plan, image, device, amp, tta=tta, score_classes=metrics.pr_sources(lmap),
                       bins=metrics.pr_bins)
    labels = liver_postprocess(pred.labels, names) if postprocess else pred.labels
    if out is not None:
        save_case_prediction(out / "predictions", cid, labels, dict(g.attrs["hpc_seg"]))
    label = lut.astype(np.uint8)[g["label"][...]]  # read after the prediction: nothing before it depends on it
    figures = add_case(metrics, cid, labels, label, lmap, index["cases"][cid]["stats"]["spacing"], names,
                       pr_counts=pred.pr_counts(label, metrics.pr_class))
    z = int(np.argmax((label > 0).sum(axis=(1, 2)))) if label.any() else label.shape[0] // 2
    return figures, (z, image[:, z], label[z], labels[z])  # one slice per case for the overlays, not volumes


def _write(out: Path, res: dict, shown: dict, names: list[str], source) -> None:
    from hpc_seg.evaluation import report

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "metrics.json", res)
    buf = io.StringIO()
    fields = ["dice", "iou", "voe", "rvd", "assd_mm", "mssd_mm"]
    keys = list(res["per_case"][0]["per_class"]) if res["per_case"] else []
    writer = csv.writer(buf)
    writer.writerow(["case"] + [f"{k}_{f}" for k in keys for f in fields])
    for row in res["per_case"]:
        writer.writerow([row["case"]] + [row["per_class"][k].get(f) for k in keys for f in fields])
    atomic_write_text(out / "per_case.csv", buf.getvalue())
    if res["pr_curve"] and res["pr_curve"]["positives"]:
        plot_pr_curve(res["pr_curve"], out / "pr_curve.png")
    report.overlays(shown, res, names, out / "overlays.png", modality=res["plan"]["modality"])
    run_dir = Path(source)
    if run_dir.is_dir() and (run_dir / "metrics.jsonl").is_file():
        report.training_curves({run_dir.name: run_dir}, out / "training_curves.png")


def print_summary(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table("class", "IoU", "Dice", "precision", "recall", "Dice/case",
              title=f"{res['name']} on {res['split']} ({res['cases']} cases, {res['volumes_per_s']:.2f} volumes/s, "
                    f"{res['device']})")
    fmt = (lambda v: "-" if v is None else f"{v:.4f}")
    for name, f in res["per_class"].items():
        t.add_row(name, fmt(f["iou"]), fmt(f["dice"]), fmt(f["precision"]), fmt(f["recall"]),
                  fmt(res["dice_per_case"].get(name)))
    t.add_row("mean", fmt(res["mean_iou"]), fmt(res["mean_dice"]), "", "", "")
    t.add_row("mean (fg)", fmt(res["mean_iou_foreground"]), fmt(res["mean_dice_foreground"]), "", "", "")
    Console().print(t)
    if res.get("lesions"):
        les = res["lesions"]
        Console().print(f"lesions: {les['detected']}/{les['reference']} detected (recall {fmt(les['recall'])}), "
                        f"precision {fmt(les['precision'])}, {les['false_positives']} false positive(s); "
                        f"IoU ≥ 0.5: recall {fmt(les['recall_iou50'])}, precision {fmt(les['precision_iou50'])}")
    if res.get("note"):
        Console().print(f"[yellow]note:[/] {res['note']}")

"""Figures (matplotlib, PNG) and the multi-run comparison of the paper's §7.3.

    hpc-seg compare eval/unetpp eval/unet_aspp eval/transunet eval/transunet_attn --out report/

``compare`` reads each evaluation's ``metrics.json`` (and, when the evaluation came from a run
directory, that run's ``metrics.jsonl`` and ``final.json``) and writes ``report.md`` (table: loss,
IoU/Dice per class, params, throughput, training peak GPU memory where logged), ``iou_per_class.png`` and
``training_curves.png``.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from hpc_seg.storage.atomic import atomic_write_bytes, atomic_write_text


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    _plt().close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def _case_score(row: dict, names: list[str]) -> float:
    fg = [row["per_class"][n]["dice"] for n in names[1:] if row["per_class"][n]["dice"] is not None]
    return float(np.mean(fg)) if fg else 1.0


# Where each orientation letter of a radiological axial view sits: axes fractions at the edge
# midpoints, aligned so that the letter stays inside the image.
EDGE_LETTERS = {"R": (0.02, 0.5, "left", "center"), "L": (0.98, 0.5, "right", "center"),
                "A": (0.5, 0.98, "center", "top"), "P": (0.5, 0.02, "center", "bottom")}


def radiological(slice_yx: np.ndarray) -> np.ndarray:
    """A stored axial CT slice (Y, X) → the array that ``imshow(origin="upper")`` shows as clinicians
    read it: anterior up, the patient's right on the image's left.

    The store is RAS+ as (Z, Y, X) (``ingest.nifti_io.to_canonical``): Y increases towards the
    patient's anterior, X towards the patient's right. Row 0 is drawn at the top, so it must be
    the largest Y (most anterior); column 0 is drawn at the left, so it must be the largest X
    (the patient's right): both in-plane axes are reversed.
    """
    return np.asarray(slice_yx)[::-1, ::-1]


def display_slice(img_cyx: np.ndarray, masks: list, modality: str) -> tuple[np.ndarray, list]:
    """One case's slice, image (C, Y, X) and masks (Y, X) or None → the arrays ``overlays`` draws with
    ``origin="upper"``. CT: windowed to [-100, 400] HU, in radiological view. Other modalities
    (RGB photos) have no patient axes and rows already run top to bottom: drawn as stored."""
    img_cyx = np.asarray(img_cyx)
    if modality == "CT":
        return radiological(np.clip(img_cyx[0], -100, 400)), [None if m is None else radiological(m) for m in masks]
    return (img_cyx[0] if img_cyx.shape[0] == 1 else img_cyx.transpose(1, 2, 0)), list(masks)


def orientation_letters(ax) -> None:
    """R, L, A, P at the edge midpoints of axes showing a ``radiological`` slice."""
    for letter, (x, y, ha, va) in EDGE_LETTERS.items():
        ax.text(x, y, letter, transform=ax.transAxes, ha=ha, va=va, color="yellow", fontsize=8, fontweight="bold")


def overlays(shown: dict, res: dict, names: list[str], path: Path, *, modality: str) -> Path | None:
    """Worst / median / best case (mean foreground Dice): image, ground truth, prediction.

    ``shown``: case → (z, image (C, Y, X), label (Y, X), prediction (Y, X)) of one slice;
    ``modality``: the plan's (``CT`` slices are drawn in radiological view with R/L/A/P letters).
    """
    rows = sorted(res["per_case"], key=lambda r: _case_score(r, names))
    if not rows:
        return None
    picks = {"worst": rows[0], "median": rows[len(rows) // 2], "best": rows[-1]}
    plt = _plt()
    fig, axes = plt.subplots(len(picks), 3, figsize=(9, 3 * len(picks)), squeeze=False)
    for r, (what, row) in enumerate(picks.items()):
        z, img, label, pred = shown[row["case"]]  # the case's slice with most foreground
        img, masks = display_slice(img, [None, label, pred], modality)
        for c, (title, mask) in enumerate(zip(("image", "ground truth", "prediction"), masks)):
            ax = axes[r, c]
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, origin="upper")
            if mask is not None:
                ax.imshow(np.ma.masked_equal(mask, 0), cmap="autumn", alpha=0.5, vmin=1, vmax=len(names) - 1,
                          origin="upper")
            if modality == "CT":
                orientation_letters(ax)
            ax.set_title(f"{what} {row['case']} z={z}: {title}" if c == 0 else title, fontsize=8)
            ax.axis("off")
    return _save(fig, path)


def _records(run_dir: Path) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.is_file() else []


def training_curves(runs: dict[str, Path], path: Path) -> Path:
    """Loss per step and validation mean IoU of one or several runs."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, run in runs.items():
        recs = _records(run)
        tr = [(r["step"], r["loss"]) for r in recs if r["type"] == "train" and r["loss"] is not None]
        va = [(r["step"], r["mean_iou"]) for r in recs if r["type"] == "val" and r["mean_iou"] is not None]
        if tr:
            a.plot(*zip(*tr), label=name)
        if va:
            b.plot(*zip(*va), marker="o", label=name)
    a.set(xlabel="step", ylabel="training loss", title="loss")
    b.set(xlabel="step", ylabel="mean IoU", title="validation mean IoU")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def compare(evals: list[str | Path], out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, runs, recs_of = [], {}, {}
    for e in evals:
        p = Path(e) / "metrics.json"
        if not p.is_file():
            from hpc_seg.errors import HpcSegError

            raise HpcSegError(f"{e}: no metrics.json (run 'hpc-seg evaluate' first)")
        m = json.loads(p.read_text())
        label = Path(e).name
        src = Path(m.get("source", ""))
        recs = _records(src) if src.is_dir() else []
        if recs:
            runs[label] = src
        train = [r for r in recs if r["type"] == "train"]
        recs_of[label] = train
        rows.append((label, m, train[-1] if train else {}))
    names = list(rows[0][1]["per_class"])
    head = ["run", "model", "params (M)", "final loss", "mean IoU", "mean IoU (fg)"] + \
        [f"IoU {n}" for n in names[1:]] + [f"Dice {n}" for n in names[1:]] + \
        ["train samples/s", "train peak GPU memory (GiB)", "eval volumes/s"]
    fmt = (lambda v, d=4: "-" if v is None else f"{v:.{d}f}")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, m, last in rows:
        cells = [label, f"{m['model']}/{m['size']}", fmt(m["params"] / 1e6, 2), fmt(last.get("loss")),
                 fmt(m["mean_iou"]), fmt(m["mean_iou_foreground"])]
        cells += [fmt(m["per_class"][n]["iou"]) for n in names[1:]] + [fmt(m["per_class"][n]["dice"]) for n in names[1:]]
        peak = max((r.get("peak_mem_gb") or 0.0 for r in recs_of[label]), default=0.0) or None
        cells += [fmt(last.get("samples_per_s"), 1), fmt(peak, 2), fmt(m["volumes_per_s"], 2)]
        lines.append("| " + " | ".join(cells) + " |")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.5 + 1.6 * len(names), 3.6))
    width = 0.8 / len(rows)
    for i, (label, m, _) in enumerate(rows):
        vals = [m["per_class"][n]["iou"] or 0.0 for n in names]
        ax.bar(np.arange(len(names)) + i * width, vals, width, label=label)
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names)
    ax.set(ylabel="IoU", ylim=(0, 1), title="IoU per class")
    ax.legend(fontsize=7)
    _save(fig, out / "iou_per_class.png")
    md = ["# Comparison", "", *lines, "", "![IoU per class](iou_per_class.png)"]
    if runs:
        training_curves(runs, out / "training_curves.png")
        md += ["", "![training curves](training_curves.png)"]
    return atomic_write_text(out / "report.md", "\n".join(md) + "\n")

"""Per-case CPU time of ``hpc-seg evaluate`` before and after the device-side rewrite, in one run.

One synthetic CT case (512²×200, 0.74×0.74×1.5 mm: a lobulated liver with hyperdense tumours in
fat, noise) is prepared into a store; both code paths then score it with the same model. Before:
faithful copies of the old functions (``OLD CODE``): float32 probabilities (K, Z, Y, X) copied to
the host, numpy argmax, PR histogram and counts on the host, six whole-volume distance transforms.
After: the package's functions as ``evaluate`` calls them (argmax and PR bins on the model's
device, distance transforms cropped), then the real ``evaluate._score_case`` once more; every
figure of the three is compared (``metrics_identical``). The model is a fixed intensity classifier
standing in for a trained network (smoothed HU → liver near 60, tumour near 120): it predicts
where a trained model does — the liver, with edge errors — which sets the distance-transform boxes.

    python bench/eval_speed.py                          # → bench/results/eval_speed.json (≈ 2-3 min, 2 cores)
    python bench/eval_speed.py --toy --out /tmp/e.json  # 64²×16 (the test)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
STAGES = {  # what each timed stage holds
    "read": "image and label from the Zarr store",
    "inference": "model input, forward, probabilities on the case grid (before: and their float32 copy to the host)",
    "labels_and_histograms": "argmax to uint8, the PR-score bins and histogram (after: on the model's device)",
    "postprocess": "largest connected liver component (host, unchanged)",
    "counts_update": "SegmentationMetrics.add_labels: confusion and per-case counts (before: the old update, "
                     "also the PR histogram and the probability merge)",
    "case_metrics": "per-case Dice/IoU/VOE/RVD and the surface distances (the distance transforms)"}


# ================================================================ OLD CODE (before the rewrite)
# Copied unchanged from hpc_seg/eval/inference.py, hpc_seg/metrics/__init__.py and
# hpc_seg/eval/case_metrics.py at commit 7141b1e (paths as they were then), for the comparison only.

@torch.no_grad()
def old_predict_probs(model, plan, image, device=torch.device("cpu"), amp_dtype=None, tta=False, batch_size=16):
    from hpc_seg.preprocessing.plan import model_input, probabilities, to_case_grid
    from hpc_seg.preprocessing.slices import stack as _stack  # the same formula (tests/preprocessing/test_slices.py)

    k = plan.slices if plan.mode == "2.5d" else 1
    model = model.to(device).eval()
    depth, (h, w) = image.shape[1], image.shape[2:]
    out = np.zeros((plan.num_classes, depth, h, w), np.float32)

    def probs_of(x):
        return probabilities(plan, model(x))

    for start in range(0, depth, batch_size):
        zs = range(start, min(start + batch_size, depth))
        x = model_input(plan, np.stack([_stack(image, z, k) for z in zs])).to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            p = probs_of(x)
            if tta:
                p = (p + probs_of(x.flip(-1)).flip(-1) + probs_of(x.flip(-2)).flip(-2)
                     + probs_of(x.flip(-1, -2)).flip(-1, -2)) / 4
        out[:, start:start + len(zs)] = to_case_grid(p.float(), (h, w)).permute(1, 0, 2, 3).cpu().numpy()
    return out


def old_metrics_class():
    from hpc_seg.metrics import SegmentationMetrics

    class OldSegmentationMetrics(SegmentationMetrics):
        @torch.no_grad()
        def update(self, logits, target, case_ids=None, pred=None, probs=None, label_maps=None):
            if probs is not None:
                probs = probs.float()
            elif logits is not None and logits.dim() == target.dim() + 1:
                probs = logits.float().softmax(1)
            if pred is None:
                pred = probs.argmax(1) if probs is not None else logits
            keep_pr = None
            if label_maps is not None:
                label_maps = label_maps.long().cpu()
                pred = torch.gather(label_maps, 1, pred.long().cpu().flatten(1)).view(pred.shape)
                if probs is not None:
                    from hpc_seg.preprocessing.labels import merge_probabilities

                    probs = merge_probabilities(probs.cpu(), label_maps)
                if self.pr_class is not None:
                    keep_pr = label_maps[:, self.pr_class] == self.pr_class
            if pred.shape != target.shape:
                raise ValueError(f"metrics: prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
            c = self.num_classes
            t, p = target.long().cpu(), pred.long().cpu()
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= c):
                raise ValueError(f"metrics: target values outside [0, {c - 1}]")
            self.confusion += torch.bincount((t * c + p).flatten(), minlength=c * c).reshape(c, c)
            if case_ids is not None:
                for i, cid in enumerate(case_ids):
                    self._old_add_case(str(cid), t[i], p[i])
                    if label_maps is not None:
                        self.annotated[str(cid)] = sorted(set(label_maps[i].tolist()))
            if probs is not None and self.pr_class is not None:
                prob, tt = probs[:, self.pr_class].cpu(), t
                if keep_pr is not None:
                    prob, tt = prob[keep_pr], t[keep_pr]
                prob = prob.flatten()
                bins = (prob * self.pr_bins).long().clamp_(0, self.pr_bins - 1)
                positive = (tt.flatten() == self.pr_class).long()
                self.pr_hist += torch.bincount(positive * self.pr_bins + bins,
                                               minlength=2 * self.pr_bins).reshape(2, self.pr_bins)

        def _old_add_case(self, cid, t, p):
            c = self.num_classes
            cm = torch.bincount((t * c + p).flatten(), minlength=c * c).reshape(c, c)
            tp = cm.diag()
            counts = torch.stack([tp, cm.sum(0) - tp, cm.sum(1) - tp], 1)
            self.per_case[cid] = self.per_case.get(cid, torch.zeros(c, 3, dtype=torch.int64)) + counts

    return OldSegmentationMetrics


def _old_surface(mask):
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1))


def old_surface_distances(pred, gt, spacing):
    if not pred.any() or not gt.any():
        return None, None
    sp, sg = _old_surface(pred), _old_surface(gt)
    dt_gt = ndimage.distance_transform_edt(~sg, sampling=spacing)
    dt_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)
    d = np.concatenate([dt_gt[sp], dt_pred[sg]])
    return float(d.mean()), float(d.max())


def _old_figures(p, g, spacing, surfaces):
    """The overlap figures are unchanged (the package's own); only the surface distances ran whole-volume."""
    from hpc_seg.evaluation.case_metrics import _figures

    fig = _figures(p, g, spacing, False)
    if surfaces:
        fig["assd_mm"], fig["mssd_mm"] = old_surface_distances(p, g, spacing)
    return fig


def old_case_metrics(pred, gt, spacing, class_names, annotated=None):
    out = {name: (_old_figures(pred == c, gt == c, spacing, c > 0) if annotated is None or c in annotated
                  else dict.fromkeys(("dice", "iou", "voe", "rvd", "precision", "recall", "voxels_gt",
                                      "voxels_pred", "assd_mm", "mssd_mm")))
           for c, name in enumerate(class_names)}
    if class_names[1:] == ["liver", "tumour"]:
        out["liver+tumour"] = _old_figures(pred >= 1, gt >= 1, spacing, True)
    return out
# ================================================================ END OF OLD CODE


class Timer(dict):
    @contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        yield
        self[stage] = self.get(stage, 0.0) + time.perf_counter() - t0


class IntensityModel(torch.nn.Module):
    """Smoothed HU of the middle slice → logits (background 0, liver near 60 HU, tumour near 120)."""

    def __init__(self, plan):
        super().__init__()
        self.offset, self.scale, self.k = float(plan.offset[0]), float(plan.scale[0]), plan.in_channels

    def forward(self, x):
        hu = x[:, self.k // 2:self.k // 2 + 1] * self.scale + self.offset
        hu = torch.nn.functional.avg_pool2d(hu, 3, 1, 1, count_include_pad=False)
        return torch.cat([torch.zeros_like(hu), 4 - ((hu - 60) / 15) ** 2, 4 - ((hu - 120) / 20) ** 2], 1)


def _span(coord: np.ndarray, lo: float, hi: float) -> slice:
    idx = np.flatnonzero((coord >= lo) & (coord <= hi))
    return slice(int(idx[0]), int(idx[-1]) + 1)


def make_case(size: int, depth: int, seed: int = 0):
    """(X, Y, Z) int16 HU volume, uint8 label, spacing: a lobulated liver with tumours in fat."""
    rng = np.random.default_rng(seed)
    sp = (380.0 / size, 380.0 / size, 300.0 / depth)
    xs, ys, zs = ((np.arange(n) - n / 2 + 0.5) * s for n, s in zip((size, size, depth), sp))
    vol = np.full((size, size, depth), -1000, np.float32)
    body = (xs[:, None] / 170) ** 2 + (ys[None, :] / 125) ** 2 < 1
    vol[body] = -30
    box = (_span(xs, -60, 170), _span(ys, -90, 110), _span(zs, -120, 120))
    x, y, z = np.ix_(xs[box[0]], ys[box[1]], zs[box[2]])
    field = np.minimum(((x - 60) / 85) ** 2 + ((y - 10) / 70) ** 2 + (z / 80) ** 2,
                       ((x + 10) / 45) ** 2 + ((y - 30) / 35) ** 2 + ((z - 20) / 40) ** 2)
    for _ in range(3):  # low-frequency bumps: a lobulated surface, not an ellipsoid
        c = rng.uniform((-20, -40, -50), (120, 60, 50))
        field = field - 0.3 * np.exp(-(((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / 30 ** 2))
    label = np.zeros(vol.shape, np.uint8)
    liver = (field < 1) & body[box[0], box[1]][..., None]
    label[box][liver] = 1
    inside = np.argwhere(liver)
    for _ in range(3):
        cx, cy, cz = inside[rng.integers(len(inside))]
        r = rng.uniform(8, 22)
        blob = ((x - x[cx, 0, 0]) ** 2 + (y - y[0, cy, 0]) ** 2 + ((z - z[0, 0, cz]) * 1.2) ** 2 < r * r) & liver
        label[box][blob] = 2
    vol[label == 1], vol[label == 2] = 60, 120
    vol += rng.standard_normal(vol.shape, dtype=np.float32) * 12
    return np.clip(np.rint(vol), -1024, 3071).astype(np.int16), label, sp


def make_store(work: Path, size: int, depth: int):
    import nibabel as nib

    from hpc_seg.ingest.prepare import prepare

    vol, label, sp = make_case(size, depth)
    (src := work / "nifti").mkdir(parents=True, exist_ok=True)
    for name, arr in (("volume", vol), ("segmentation", label)):  # the LiTS layout, RAS already
        nib.save(nib.Nifti1Image(arr, np.diag([*sp, 1.0])), src / f"{name}-0.nii")
    done = prepare("lits", src, work / "store.zarr", val=0.0, test=0.0, show_progress=False)
    assert done.report.ok, done.report.failed
    return work / "store.zarr", done.plan


def score_before(ctx, cid, timer):
    """The old ``evaluate`` loop body, stage by stage."""
    from hpc_seg.evaluation.inference import postprocess as keep_largest

    g, lmap = ctx["root"]["cases"][cid], ctx["lmap"]
    with timer("read"):
        image = g["image"][...]
    with timer("inference"):
        probs = old_predict_probs(ctx["model"], ctx["plan"], image, ctx["device"], ctx["amp"], tta=ctx["tta"])
    with timer("labels_and_histograms"):
        pred = probs.argmax(0).astype(np.uint8)
    with timer("postprocess"):
        pred = keep_largest(pred, ctx["names"])
    with timer("read"):
        label = ctx["lut"][g["label"][...]]
    with timer("counts_update"):  # in the old update: PR histogram, label-map merge and counts, all host
        ctx["metrics"].update(None, torch.from_numpy(label)[None], case_ids=[cid], label_maps=torch.tensor([lmap]),
                              pred=torch.from_numpy(pred.astype(np.int64))[None], probs=torch.from_numpy(probs)[None])
    with timer("case_metrics"):
        return old_case_metrics(np.asarray(lmap, np.uint8)[pred], label, ctx["spacing"], ctx["names"],
                                annotated=set(lmap))


def score_after(ctx, cid, timer):
    """``evaluate._score_case`` stage by stage, with the package's functions."""
    from hpc_seg.evaluation.case_metrics import case_metrics
    from hpc_seg.evaluation.inference import LabelPrediction, add_batch, batch_probabilities
    from hpc_seg.evaluation.inference import postprocess as keep_largest
    from hpc_seg.metrics import index_dtype

    g, m, plan, lmap = ctx["root"]["cases"][cid], ctx["metrics"], ctx["plan"], ctx["lmap"]
    with timer("read"):
        image = g["image"][...]
    sources, shape = m.pr_sources(lmap), image.shape[1:]
    labels = np.zeros(shape, np.uint8)
    scores = torch.zeros(shape, dtype=index_dtype(2 * m.pr_bins), device=ctx["device"]) if sources else None
    batches = batch_probabilities(ctx["model"], plan, image, ctx["device"], ctx["amp"], tta=ctx["tta"])
    while True:
        with timer("inference"):
            start, p = next(batches, (None, None))
        if p is None:
            break
        with timer("labels_and_histograms"):
            add_batch(labels, scores, start, p, sources, m.pr_bins)
    with timer("postprocess"):
        labels = keep_largest(labels, ctx["names"])
    with timer("read"):
        label = ctx["lut"].astype(np.uint8)[g["label"][...]]
    with timer("labels_and_histograms"):
        counts = LabelPrediction(labels, scores, m.pr_bins).pr_counts(label, m.pr_class)
    with timer("counts_update"):
        m.add_labels(torch.from_numpy(labels)[None], torch.from_numpy(label)[None], case_ids=[cid],
                     label_maps=torch.tensor([lmap]), pr_counts=counts)
    with timer("case_metrics"):
        return case_metrics(np.asarray(lmap, np.uint8)[labels], label, ctx["spacing"], ctx["names"],
                            annotated=set(lmap))


def same(a, b, path="") -> list[str]:
    """Where two result trees differ (floats to 1e-9 relative)."""
    if isinstance(a, dict) and isinstance(b, dict) and set(a) == set(b):
        return [d for k in a for d in same(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in same(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float):
        return [] if abs(a - b) <= 1e-9 * max(abs(a), abs(b), 1e-12) else [f"{path}: {a} != {b}"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"[:200]]


def context(store: Path, plan, size: int, cpu: bool, metrics_cls):
    from hpc_seg.config import load_config
    from hpc_seg.storage import store as zstore
    from hpc_seg.ingest.index import read_index
    from hpc_seg.preprocessing.labels import case_label_map, store_label_lut
    from hpc_seg.evaluation.model_io import device_and_dtype

    plan = plan.resolve(load_config(None, ["data.mode=2.5d", f"data.size=[{size},{size}]"]).data)
    info, index = zstore.store_info(store), read_index(store)
    device, amp = device_and_dtype(prefer_gpu=not cpu)
    names, cid = list(plan.classes), sorted(index["cases"])[0]
    return {"cid": cid, "root": zstore.open_store(store), "plan": plan, "model": IntensityModel(plan), "device": device,
            "amp": amp, "tta": False, "lut": store_label_lut(plan, info, store), "names": names, "index": index,
            "info": info, "lmap": case_label_map(plan, index, cid, info["classes"]),
            "spacing": index["cases"][cid]["stats"]["spacing"], "metrics": metrics_cls(len(names), names)}


def run_once(ctx, scorer) -> tuple[dict, dict]:
    """(results with the case's figures, seconds per stage) of one scorer on the one case."""
    timer = Timer()
    figures = scorer(ctx, ctx["cid"], timer)
    res = ctx["metrics"].compute()
    res["per_case"][0]["per_class"] = figures
    return res, {**dict.fromkeys(STAGES, 0.0), **timer}


def real_score_case(ctx, cid, timer):
    """The real ``evaluate._score_case`` (post-processing on), timed as a whole."""
    from hpc_seg.evaluation.evaluate import _score_case

    c = ctx
    with timer("total"):
        return _score_case(c["root"]["cases"][cid], cid, c["model"], c["plan"], c["metrics"], c["lut"], c["index"],
                           c["info"], c["device"], c["amp"], c["tta"], True, None)[0]["per_class"]


def summary(args, ctx, runs: dict, prepare_s: float) -> dict:
    (before, tb), (after, ta), (real, _) = runs["before"], runs["after"], runs["real"]
    diffs = same(before, after) + same(after, real)
    r2 = (lambda d: {k: round(v, 2) for k, v in d.items()})
    return {"what": "per-case seconds of hpc-seg evaluate, old code path (before) and new (after), one run",
            "case": {"shape_zyx": [args.depth, args.size, args.size],
                     "spacing_zyx_mm": [round(s, 3) for s in ctx["spacing"]], "voxels": args.depth * args.size ** 2},
            "model": f"IntensityModel stand-in, input {args.model_size}², 2.5D (3 slices), no TTA; post-processing on",
            "device": str(ctx["device"]), "cpu_threads": torch.get_num_threads(),
            "load_average_1min_at_end": round(os.getloadavg()[0], 2),  # other work on the machine skews the times
            "before_s": r2({**tb, "total": sum(tb.values())}), "after_s": r2({**ta, "total": sum(ta.values())}),
            "after_score_case_s": round(runs["real"][1]["total"], 2), "prepare_store_s": round(prepare_s, 1),
            "speedup_total": round(sum(tb.values()) / sum(ta.values()), 1),
            "metrics_identical": not diffs, "differences": diffs[:10],
            "liver_tumour_dice": {k: round(after["per_case"][0]["per_class"][k]["dice"] or 0, 4)
                                  for k in ("liver", "tumour")}, "stages": STAGES}


def report(out: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table("stage", "before s", "after s", "speed-up",
              title=f"evaluate, one {out['case']['shape_zyx']} case on {out['device']} ({out['cpu_threads']} threads)")
    b, a = out["before_s"], out["after_s"]
    for k in (*STAGES, "total"):
        t.add_row(k, f"{b[k]:.2f}", f"{a[k]:.2f}", f"{b[k] / a[k]:.1f}×" if a[k] > 0 else "-")
    t.add_row("evaluate._score_case", "", f"{out['after_score_case_s']:.2f}", "")
    Console().print(t)
    Console().print(f"metrics identical: {out['metrics_identical']}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=512, help="in-plane voxels")
    ap.add_argument("--depth", type=int, default=200, help="slices")
    ap.add_argument("--model-size", type=int, default=128, help="the model's input size (the plan's data.size)")
    ap.add_argument("--toy", action="store_true", help="64²×16, model size 32 (the test)")
    ap.add_argument("--cpu", action="store_true", help="stay on the CPU when a GPU is present")
    ap.add_argument("--work", default=None, help="where to write the store (default: a temporary folder)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "eval_speed.json"))
    args = ap.parse_args(argv)
    if args.toy:
        args.size, args.depth, args.model_size = 64, 16, 32
    from hpc_seg.metrics import SegmentationMetrics
    from hpc_seg.storage.atomic import atomic_write_json

    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        t0 = time.perf_counter()
        store, plan = make_store(Path(tmp), args.size, args.depth)
        prepare_s = time.perf_counter() - t0
        runs = {"before": run_once(context(store, plan, args.model_size, args.cpu, old_metrics_class()), score_before)}
        for name, scorer in (("after", score_after), ("real", real_score_case)):
            ctx = context(store, plan, args.model_size, args.cpu, SegmentationMetrics)
            runs[name] = run_once(ctx, scorer)
    out = summary(args, ctx, runs, prepare_s)
    atomic_write_json(args.out, out)
    report(out)
    return out


if __name__ == "__main__":
    main()

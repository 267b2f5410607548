"""The faster evaluation path gives the figures the straightforward computation gives: cropped
distance transforms, argmax and PR histograms on the model's device, and the benchmark script."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from hpc_seg.evaluation.case_metrics import case_metrics, surface_distances
from hpc_seg.evaluation.inference import first_argmax, postprocess, predict_labels, predict_probs
from hpc_seg.metrics import SegmentationMetrics, pr_histogram, score_bins

ROOT = Path(__file__).resolve().parents[2]
NAMES = ["background", "liver", "tumour"]


def whole_volume_surface_distances(pred, gt, spacing):
    """The uncropped computation: both distance transforms over the whole volume."""
    if not pred.any() or not gt.any():
        return None, None
    st = ndimage.generate_binary_structure(pred.ndim, 1)
    sp, sg = pred & ~ndimage.binary_erosion(pred, st), gt & ~ndimage.binary_erosion(gt, st)
    d = np.concatenate([ndimage.distance_transform_edt(~sg, sampling=spacing)[sp],
                        ndimage.distance_transform_edt(~sp, sampling=spacing)[sg]])
    return float(d.mean()), float(d.max())


def blob(rng, shape, threshold, sigma=(1.0, 2.5, 2.5)):
    return ndimage.gaussian_filter(rng.standard_normal(shape), sigma) > threshold


def mask_pairs(rng, shape=(20, 44, 36)):
    yield blob(rng, shape, 0.15), blob(rng, shape, 0.15)  # several components each
    a = np.zeros(shape, bool)
    a[:6, :10, 30:] = True  # touches three faces of the volume
    yield a, np.roll(a, 3, axis=2) | blob(rng, shape, 0.25)
    one, far = np.zeros(shape, bool), np.zeros(shape, bool)
    one[0, 0, 0], far[-1, -1, -1] = True, True  # single voxels in opposite corners
    yield one, far
    full = np.ones(shape, bool)
    yield full, blob(rng, shape, 0.1)  # a mask that fills the volume: its surface is the border
    small = np.zeros(shape, bool)
    small[9:11, 20:23, 17:19] = True
    yield small, small.copy()  # identical: all distances 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cropped_surface_distances_equal_the_whole_volume_ones(seed):
    rng = np.random.default_rng(seed)
    spacing = (2.5, 0.7, 0.9)  # anisotropic, as CT
    for pred, gt in mask_pairs(rng):
        got, want = surface_distances(pred, gt, spacing), whole_volume_surface_distances(pred, gt, spacing)
        assert got == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert surface_distances(np.zeros((4, 4, 4), bool), np.ones((4, 4, 4), bool), spacing) == (None, None)


def test_first_argmax_is_argmax_with_ties():
    rng = np.random.default_rng(0)
    for k in (2, 3, 5):
        p = rng.integers(0, 4, size=(3, k, 7, 9)).astype(np.float32)  # many ties
        assert np.array_equal(first_argmax(torch.from_numpy(p)).numpy(), p.argmax(1).astype(np.uint8))


def test_pr_histogram_matches_numpy_histogram():
    rng = np.random.default_rng(1)
    bins = 1000
    p = np.concatenate([rng.random(20000), np.arange(bins + 1) / bins, [0.0, 1.0]]).astype(np.float32)
    positive = rng.random(p.size) < p
    got = pr_histogram(score_bins(torch.from_numpy(p), bins), torch.from_numpy(positive), bins).numpy()
    scaled = p * np.float32(bins)  # the float32 product the threshold k/bins is compared on
    for row, sel in ((0, ~positive), (1, positive)):
        assert np.array_equal(got[row], np.histogram(scaled[sel], bins=bins, range=(0, bins))[0])


def test_metrics_take_precomputed_pr_counts_like_probabilities():
    """``add_labels(pr_counts=…)`` with counts made where the probabilities are gives what
    ``add_probs`` gives; a case not annotating the PR class contributes none either way."""
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(2, 3, 9, 11, generator=g).softmax(1)
    target = torch.randint(0, 3, (2, 9, 11), generator=g)
    for lmap in ([0, 1, 2], [0, 1, 1]):
        maps = torch.tensor([lmap, lmap])
        a, b = SegmentationMetrics(3, NAMES), SegmentationMetrics(3, NAMES)
        a.add_probs(probs, target, case_ids=["x", "y"], label_maps=maps)
        src = b.pr_sources(lmap)
        counts = None if src is None else pr_histogram(score_bins(probs[:, src].sum(1), b.pr_bins), target == 2,
                                                       b.pr_bins)
        b.add_labels(probs.argmax(1), target, case_ids=["x", "y"], label_maps=maps, pr_counts=counts)
        assert torch.equal(a.pr_hist, b.pr_hist) and torch.equal(a.confusion, b.confusion)
        assert a.compute() == b.compute()
    assert SegmentationMetrics(3, NAMES).pr_sources([0, 1, 1]) is None
    with pytest.raises(ValueError, match="pr_counts"):
        SegmentationMetrics(3, NAMES, pr_class=None).add_labels(target, target, pr_counts=torch.zeros(2, 1000))


def tiny_model_file(store: Path, path: Path) -> Path:
    """A random tiny UNet_ASPP (as ``hpc-seg export`` writes it) whose last layer is scaled and
    centred so that its predictions mix all three classes and its probabilities spread."""
    import yaml
    from safetensors.torch import save

    from hpc_seg.config import load_config, to_dict
    from hpc_seg.storage import store as zstore
    from hpc_seg.preprocessing.plan import model_input, read_plan
    from hpc_seg.preprocessing.slices import stack
    from hpc_seg.models import build_from_config

    cfg = load_config(None, [f"data.store={store}", "data.size=[64,64]", "data.mode=2.5d"])
    plan = read_plan(store, cfg.data.split_seed).resolve(cfg.data, cfg.loss.kind)
    torch.manual_seed(0)
    model = build_from_config(cfg, plan, pretrained=False).eval()
    last = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.out_channels == 3][-1]
    root = zstore.open_store(store)
    img = root["cases"][sorted(n for n, _ in root["cases"].groups())[0]]["image"][...]
    with torch.no_grad():
        last.weight *= 30
        last.bias *= 30
        logits = model(model_input(plan, np.stack([stack(img, z, 3) for z in range(img.shape[1])])))
        last.bias -= logits.transpose(0, 1).reshape(3, -1).median(1).values
    meta = {"config": yaml.safe_dump(to_dict(cfg), sort_keys=False), "plan": plan.to_json()}
    path.write_bytes(save({k: v.contiguous() for k, v in model.state_dict().items()}, metadata=meta))
    return path


def reference(model, plan, store, cases, tta: bool, post: bool) -> tuple[np.ndarray, np.ndarray, dict]:
    """Host float probabilities, numpy argmax, np.bincount / np.histogram, whole-volume distances."""
    from hpc_seg.storage import store as zstore
    from hpc_seg.ingest.index import read_index

    root, index = zstore.open_store(store), read_index(store)
    confusion, hist, per_case = np.zeros((3, 3), np.int64), np.zeros((2, 1000), np.int64), {}
    for cid in cases:
        g = root["cases"][cid]
        probs = predict_probs(model, plan, g["image"][...], tta=tta)
        pred = probs.argmax(0).astype(np.uint8)
        pred = postprocess(pred, NAMES) if post else pred
        label = g["label"][...].astype(np.int64)  # the phantom store's classes are the model's
        confusion += np.bincount((label * 3 + pred).ravel(), minlength=9).reshape(3, 3)
        tumour = label == 2
        for row, sel in ((0, ~tumour), (1, tumour)):
            hist[row] += np.histogram(probs[2][sel] * np.float32(1000), bins=1000, range=(0, 1000))[0]
        spacing = index["cases"][cid]["stats"]["spacing"]
        per_case[cid] = {name: whole_volume_surface_distances(m(pred), m(label), spacing)
                         for name, m in (("liver", lambda a: a == 1), ("tumour", lambda a: a == 2),
                                         ("liver+tumour", lambda a: a >= 1))}
    return confusion, hist, per_case


@pytest.mark.parametrize("tta,post", [(False, False), (True, True)])
def test_evaluate_matches_the_straightforward_computation(phantom_store, tmp_path, tta, post):
    from hpc_seg.evaluation.evaluate import evaluate
    from hpc_seg.evaluation.model_io import load_for_eval

    source = tiny_model_file(phantom_store, tmp_path / "m.safetensors")
    res = evaluate(source, phantom_store, split="all", out=tmp_path / "eval", cpu=True, tta=tta, postprocess=post)
    model, _, plan = load_for_eval(source)
    confusion, hist, distances = reference(model, plan, phantom_store, [r["case"] for r in res["per_case"]], tta, post)
    assert (confusion.sum(0) > 0).all() and hist[1].sum() > 0  # every class predicted, tumours present
    for i, name in enumerate(NAMES):
        f = res["per_class"][name]
        assert (f["tp"], f["fp"], f["fn"]) == (confusion[i, i], confusion[:, i].sum() - confusion[i, i],
                                               confusion[i].sum() - confusion[i, i])
    m = SegmentationMetrics(3, NAMES)
    m.pr_hist = torch.from_numpy(hist)
    assert res["pr_curve"] == m.pr_curve()
    for row in res["per_case"]:
        for name, want in distances[row["case"]].items():
            fig = row["per_class"][name]
            got = (fig["assd_mm"], fig["mssd_mm"])
            assert got == want if want[0] is None else got == pytest.approx(want, rel=1e-12)
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["pr_curve"] == res["pr_curve"]


def test_predict_labels_keeps_predict_probs_labels(phantom_store, tmp_path):
    """The device path and the host probabilities agree voxel for voxel, with and without TTA."""
    from hpc_seg.storage import store as zstore
    from hpc_seg.evaluation.model_io import load_for_eval

    model, _, plan = load_for_eval(tiny_model_file(phantom_store, tmp_path / "m.safetensors"))
    root = zstore.open_store(phantom_store)
    image = root["cases"][sorted(n for n, _ in root["cases"].groups())[1]]["image"][...]
    for tta in (False, True):
        probs = predict_probs(model, plan, image, tta=tta, batch_size=5)
        got = predict_labels(model, plan, image, tta=tta, batch_size=5, score_classes=[2])
        assert got.labels.dtype == np.uint8 and np.array_equal(got.labels, probs.argmax(0))
        assert np.array_equal(got.score_bins.numpy(), np.minimum(probs[2] * np.float32(1000), 999).astype(int))
    assert predict_labels(model, plan, image, score_classes=None).pr_counts(image[0], 2) is None


def test_case_metrics_match_the_whole_volume_computation():
    rng = np.random.default_rng(3)
    shape, spacing = (16, 40, 40), (2.0, 0.8, 0.8)
    liver = blob(rng, shape, 0.0)
    gt = liver.astype(np.uint8) + (liver & blob(rng, shape, 0.1))
    pred = np.roll(gt, 2, axis=1)
    pred[0, :5, :5] = 2  # a false positive at the volume border
    m = case_metrics(pred, gt, spacing, NAMES)
    for name, sel in (("liver", lambda a: a == 1), ("tumour", lambda a: a == 2), ("liver+tumour", lambda a: a >= 1)):
        want = whole_volume_surface_distances(sel(pred), sel(gt), spacing)
        assert want[0] is not None and (m[name]["assd_mm"], m[name]["mssd_mm"]) == pytest.approx(want, rel=1e-12)


def test_eval_speed_bench_toy(tmp_path):
    """bench/eval_speed.py at 64²×16: both code paths run and give the same figures."""
    out = tmp_path / "es.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "eval_speed.py"), "--toy", "--cpu",
                        "--work", str(tmp_path), "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["metrics_identical"] and not res["differences"]
    for side in ("before_s", "after_s"):
        assert set(res[side]) == {"read", "inference", "labels_and_histograms", "postprocess", "counts_update",
                                  "case_metrics", "total"}
        assert res[side]["total"] > 0
    assert res["case"]["shape_zyx"] == [16, 64, 64] and res["liver_tumour_dice"]["liver"] > 0.5

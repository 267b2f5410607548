"""Export from ZeRO shards, whole-volume evaluation, NIfTI prediction, metrics oracle, compare."""

import json

import nibabel as nib
import numpy as np
import pytest
from scipy.spatial.distance import cdist

from hpc_seg.cli import main
from hpc_seg.ingest.nifti_io import load_nifti, to_canonical
from hpc_seg.evaluation.case_metrics import _surface, case_metrics
from hpc_seg.evaluation.predict import to_input_grid
from tests.conftest import shared_path
from tests.runs import run_train

SETS = ["data.size=[64,64]", "train.max_steps=12", "train.lr=0.01", "train.val_every_steps=0",
        "checkpoint.every_steps=0", "train.val_max_cases=null", "data.mode=2.5d"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, phantom_store):
    """Runs on 2 ranks with ZeRO-2 and ZeRO-3 (phantom slices are 64×64: no resize)."""
    runs = {}
    for stage in (2, 3):
        run = tmp_path_factory.mktemp(f"z{stage}") / "run"
        r = run_train(run, phantom_store, SETS + [f"deepspeed.zero_stage={stage}"])
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        runs[stage] = run
    return runs


@pytest.mark.parametrize("stage", [2, 3])
def test_export_and_evaluate_match_in_training_validation(trained, phantom_store, tmp_path, stage, capsys):
    run = trained[stage]
    model = tmp_path / "model.safetensors"
    assert main(["export", str(run), "--out", str(model), "--tag", "latest"]) == 0
    assert main(["evaluate", str(model), "--data", str(phantom_store), "--split", "val", "--out",
                 str(tmp_path / "eval"), "--cpu"]) == 0
    res = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    val = json.loads((run / "final.json").read_text())["last_validation"]
    assert res["mean_iou"] == pytest.approx(val["mean_iou"], abs=1e-6)
    for name in ("background", "liver", "tumour"):
        assert res["per_class"][name]["iou"] == pytest.approx(val[f"iou_{name}"], abs=1e-6)
    assert {"mean_iou", "per_class", "per_case"} <= set(res)
    row = res["per_case"][0]
    assert "case" in row and {"dice", "iou", "voe", "rvd", "assd_mm", "mssd_mm"} <= set(row["per_class"]["liver"])
    for f in ("per_case.csv", "overlays.png"):
        assert (tmp_path / "eval" / f).is_file()
    # straight from the run directory too (no export step, no DeepSpeed engine)
    assert main(["evaluate", str(run), "--data", str(phantom_store), "--split", "val", "--out",
                 str(tmp_path / "eval2"), "--cpu", "--tag", "latest"]) == 0
    res2 = json.loads((tmp_path / "eval2" / "metrics.json").read_text())
    assert res2["mean_iou"] == pytest.approx(res["mean_iou"], abs=1e-7)
    assert (tmp_path / "eval2" / "training_curves.png").is_file()


def test_predict_nifti_keeps_input_grid(trained, phantom_dir, tmp_path):
    model = tmp_path / "m.safetensors"
    assert main(["export", str(trained[2]), "--out", str(model)]) == 0
    for n in range(6):
        src = phantom_dir / f"volume-{n}.nii.gz"
        out = tmp_path / f"pred-{n}.nii.gz"
        assert main(["predict", str(model), str(src), "--out", str(out), "--cpu"]) == 0
        a, b = nib.load(src), nib.load(out)
        assert b.shape == a.shape and np.allclose(b.affine, a.affine) and b.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(b.dataobj))) <= {0, 1, 2}
        assert nib.aff2axcodes(b.affine) == nib.aff2axcodes(a.affine)


def test_reorientation_round_trip_all_orientations(phantom_dir):
    rng = np.random.default_rng(0)
    for n in range(6):
        img = load_nifti(phantom_dir / f"volume-{n}.nii.gz")
        ct = to_canonical(img, "x")
        labels = rng.integers(0, 3, size=ct.data.shape).astype(np.uint8)
        back = to_input_grid(labels, ct.affine_canonical, img.affine)
        again = to_canonical(nib.Nifti1Image(back, img.affine), "y").data
        assert np.array_equal(again, labels)


def test_bad_inputs(trained, phantom_store, phantom_dir, synthetic_rgb, tmp_path, capsys):
    model = tmp_path / "m.safetensors"
    assert main(["export", str(trained[2]), "--out", str(model)]) == 0
    four_d = tmp_path / "4d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4, 2), np.int16), np.eye(4)), four_d)
    assert main(["predict", str(model), str(four_d), "--out", str(tmp_path / "p.nii.gz"), "--cpu"]) == 2
    assert "4d.nii.gz" in capsys.readouterr().err
    assert not (tmp_path / "p.nii.gz").exists()
    # a checkpoint with missing shards
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(trained[3], broken)
    tag = (broken / "checkpoints" / "latest").read_text().strip()
    next((broken / "checkpoints" / tag).glob("*optim_states.pt")).unlink()
    assert main(["export", str(broken), "--out", str(tmp_path / "x.safetensors"), "--tag", "latest"]) == 2
    assert "missing" in capsys.readouterr().err
    # weights from another model/config
    other = tmp_path / "other"
    shutil.copytree(trained[2], other)
    cfg = (other / "config.yaml").read_text().replace("name: unet_aspp", "name: unetpp")
    (other / "config.yaml").write_text(cfg)
    assert main(["export", str(other), "--out", str(tmp_path / "y.safetensors")]) == 2
    assert "do not fit" in capsys.readouterr().err
    # a CT model on an RGB (Kvasir) store
    from hpc_seg.ingest.prepare import prepare

    prepare("kvasir", synthetic_rgb, tmp_path / "kv.zarr", show_progress=False)
    assert main(["evaluate", str(model), "--data", str(tmp_path / "kv.zarr"), "--split", "all",
                 "--out", str(tmp_path / "e")]) == 2
    assert "holds kvasir data" in capsys.readouterr().err
    # a store that is not there
    assert main(["evaluate", str(model), "--data", str(tmp_path / "nope.zarr"), "--out", str(tmp_path / "e")]) == 2


@pytest.mark.shared_data
def test_case_metrics_oracle_on_real_lits_masks():
    seg = nib.load(shared_path("lits-tiny") / "segmentation-0.nii")
    gt = np.rint(seg.get_fdata()).astype(np.uint8)
    spacing = tuple(float(z) for z in seg.header.get_zooms())
    pred = gt.copy()
    pred[:, :, :10][pred[:, :, :10] == 1] = 0  # drop liver in the first slices
    pred = np.roll(pred, 2, axis=0)  # and shift by two voxels
    m = case_metrics(pred, gt, spacing, ["background", "liver", "tumour"])
    for c, name in ((1, "liver"), (2, "tumour")):
        p, g = pred == c, gt == c
        inter = (p & g).sum()
        assert m[name]["dice"] == pytest.approx(2 * inter / (p.sum() + g.sum()))
        assert m[name]["voe"] == pytest.approx(1 - inter / (p | g).sum())
        assert m[name]["rvd"] == pytest.approx((p.sum() - g.sum()) / g.sum())
        sp = np.argwhere(_surface(p)) * spacing  # brute force over surface points, in mm
        sg = np.argwhere(_surface(g)) * spacing
        d = cdist(sp, sg)
        both = np.concatenate([d.min(1), d.min(0)])
        assert m[name]["assd_mm"] == pytest.approx(both.mean(), rel=1e-6)
        assert m[name]["mssd_mm"] == pytest.approx(both.max(), rel=1e-6)
    empty = case_metrics(np.zeros_like(gt), np.zeros_like(gt), spacing, ["background", "liver", "tumour"])
    assert empty["tumour"]["dice"] is None and empty["tumour"]["assd_mm"] is None


def test_compare_renders(trained, phantom_store, tmp_path):
    evals = []
    for stage, run in trained.items():
        out = tmp_path / f"zero{stage}"
        assert main(["evaluate", str(run), "--data", str(phantom_store), "--split", "test", "--out", str(out),
                     "--cpu", "--tag", "latest"]) == 0
        evals.append(str(out))
    assert main(["compare", *evals, "--out", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| zero2 |" in md and "| zero3 |" in md and "IoU tumour" in md
    for png in ("iou_per_class.png", "training_curves.png"):
        assert (tmp_path / "report" / png).read_bytes()[:4] == b"\x89PNG"


def test_inference_settings_travel_with_the_model(trained, phantom_store, tmp_path):
    """``inference.tta`` in the run's config is what evaluate does unless told otherwise; the mirror
    TTA (all four in-plane flips, a group) makes the prediction exactly flip-equivariant."""
    import shutil

    import yaml

    from hpc_seg.evaluation.inference import predict_probs
    from hpc_seg.evaluation.model_io import inference_settings, load_for_eval

    run = tmp_path / "run"
    shutil.copytree(trained[2], run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["inference"] = {"tta": True, "postprocess": False}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))

    def ev(name, *flags):
        assert main(["evaluate", str(run), "--data", str(phantom_store), "--split", "val", "--out",
                     str(tmp_path / name), "--cpu", "--tag", "latest", *flags]) == 0
        return json.loads((tmp_path / name / "metrics.json").read_text())

    default, on, off = ev("default"), ev("on", "--tta"), ev("off", "--no-tta")
    assert default["tta"] is True and off["tta"] is False
    assert default["mean_iou"] == on["mean_iou"] != off["mean_iou"]
    # the settings are the model's: loaded with it from the run directory and from its export
    model, loaded, plan = load_for_eval(run, "latest")
    assert inference_settings(loaded, None, None) == (True, False)
    assert inference_settings(loaded, False, True) == (False, True)  # the caller's word wins
    exported = tmp_path / "model.safetensors"
    assert main(["export", str(run), "--out", str(exported), "--tag", "latest"]) == 0
    model_x, loaded_x, plan_x = load_for_eval(exported)
    assert inference_settings(loaded_x, None, None) == (True, False) and plan_x.to_dict() == plan.to_dict()
    image = (np.random.default_rng(0).normal(0, 300, (1, 5, 64, 64))).astype(np.int16)
    p = predict_probs(model, plan, image, tta=True)
    np.testing.assert_allclose(predict_probs(model_x, plan_x, image, tta=True), p, atol=1e-6)
    plain = predict_probs(model, plan, image, tta=False)
    for axes in ((-1,), (-2,), (-1, -2)):
        flipped = np.ascontiguousarray(np.flip(image, axes))
        q = predict_probs(model, plan, flipped, tta=True)
        np.testing.assert_allclose(np.flip(q, axes), p, atol=1e-5)
        # without TTA the trained model is not equivariant: the check above can tell the difference
        gap = np.abs(np.flip(predict_probs(model, plan, flipped, tta=False), axes) - plain).max()
        assert gap > 1e-3, (axes, gap)


def test_predict_with_and_without_probabilities_writes_the_same_labels(trained, phantom_dir, tmp_path):
    """Without --probs the argmax runs where the model ran (uint8 to the host); with it, on the host
    over the stored probabilities: the labels must not depend on which."""
    model = tmp_path / "m.safetensors"
    assert main(["export", str(trained[2]), "--out", str(model)]) == 0
    src = phantom_dir / "volume-2.nii.gz"
    plain, probs = tmp_path / "plain.nii.gz", tmp_path / "with.nii.gz"
    assert main(["predict", str(model), str(src), "--out", str(plain), "--cpu"]) == 0
    assert main(["predict", str(model), str(src), "--out", str(probs), "--cpu", "--probs", str(tmp_path / "p.zarr")]) == 0
    a, b = np.asarray(nib.load(plain).dataobj), np.asarray(nib.load(probs).dataobj)
    assert np.array_equal(a, b) and a.any()


def test_lesion_figures_and_volumes_in_metrics_json(trained, phantom_store, phantom_dir, tmp_path):
    """``lesions`` (pooled and per case) and ``volumes_ml`` agree with the saved predictions and the
    reference files: components counted again, millilitres from the NIfTI headers."""
    from hpc_seg.metrics.lesions import sum_lesions
    from hpc_seg.metrics.volumes import components

    out = tmp_path / "e"
    assert main(["evaluate", str(trained[2]), "--data", str(phantom_store), "--split", "all", "--out", str(out),
                 "--cpu", "--tag", "latest", "--save-predictions", "--no-postprocess"]) == 0
    res = json.loads((out / "metrics.json").read_text())
    rows = res["per_case"]
    assert res["lesions"] == sum_lesions([r["lesions"] for r in rows])
    assert res["lesions"]["reference"] > 0 and res["lesions"]["cases"] == len(rows)
    for row in rows:
        n = int(row["case"].split("_")[-1])
        pred = nib.load(out / "predictions" / f"{row['case']}.nii.gz")
        ref = np.asarray(nib.load(phantom_dir / f"segmentation-{n}.nii.gz").dataobj)
        ml = float(np.prod(pred.header.get_zooms()[:3])) / 1000
        p = np.asarray(pred.dataobj)
        assert row["lesions"]["reference"] == components(ref == 2)[1]
        assert row["lesions"]["predicted"] == components(p == 2)[1]
        vol = row["volumes_ml"]
        assert vol["tumour_ml"]["predicted"] == pytest.approx((p == 2).sum() * ml, abs=1e-3)
        assert vol["liver_ml"]["reference"] == pytest.approx((ref >= 1).sum() * ml, abs=1e-3)
        assert vol["liver_ml"]["abs_error"] == pytest.approx(abs((p >= 1).sum() - (ref >= 1).sum()) * ml, abs=1e-3)

"""A liver → tumour cascade as one model: trained in one run (stage 2 on crops around the reference
organ), exported to one file, evaluated and predicted (stage 2 on stage 1's organ); the
preprocessing-plan contract with the crop (predict on a case's NIfTI == evaluate's saved prediction)."""

import json

import nibabel as nib
import numpy as np
import pytest

from hpc_seg.cli import main
from hpc_seg.config import load_config
from hpc_seg.errors import ConfigError
from tests.runs import run_train

SETS = ["data.size=[48,48]", "train.max_steps=6", "train.lr=0.01", "train.val_every_steps=0",
        "checkpoint.every_steps=0", "data.mode=2.5d", "model.name=unet_aspp", "cascade.enabled=true",
        "cascade.stage2={data.size: [32, 32], train.max_steps: 5, data.crop_margin: 0.2}"]


@pytest.fixture(scope="module")
def cascade(tmp_path_factory, phantom_store):
    d = tmp_path_factory.mktemp("cascade")
    r = run_train(d / "run", phantom_store, SETS, nproc=1)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return d / "run"


def test_one_run_trains_both_stages(cascade):
    one, two = (json.loads((cascade / s / "final.json").read_text()) for s in ("stage1", "stage2"))
    assert one["step"] == 6 and two["step"] == 5
    plan1, plan2 = (json.loads((cascade / s / "plan.json").read_text()) for s in ("stage1", "stage2"))
    assert "crop" not in plan1 and plan1["size"] == [48, 48]  # a whole-slice plan reads as before
    assert plan2["crop"] == {"around": ["liver", "tumour"], "margin": 0.2} and plan2["size"] == [32, 32]
    import yaml

    assert yaml.safe_load((cascade / "config.yaml").read_text())["cascade"]["enabled"] is True


def test_a_finished_stage_is_not_trained_again(cascade, phantom_store):
    before = (cascade / "stage1" / "final.json").stat().st_mtime_ns
    r = run_train(cascade, phantom_store, SETS, nproc=1)
    assert r.returncode == 2 and "pass --resume latest to go on" in r.stderr  # never silently continued
    r = run_train(cascade, phantom_store, SETS, nproc=1, resume="latest")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (cascade / "stage1" / "final.json").stat().st_mtime_ns == before
    r = run_train(cascade, phantom_store, SETS[:-1] + ["cascade.stage2={data.size: [32, 32], train.max_steps: 7, "
                                                      "data.crop_margin: 0.2}"], nproc=1, resume="latest")
    assert r.returncode == 0, r.stderr[-2000:]  # more stage-2 steps: stage 2 resumes, stage 1 stays
    assert (cascade / "stage1" / "final.json").stat().st_mtime_ns == before
    assert json.loads((cascade / "stage2" / "final.json").read_text())["step"] == 7
    r = run_train(cascade, phantom_store, SETS + ["train.lr=0.02"], nproc=1, resume="latest")
    assert r.returncode == 2 and "stage1: finished with other settings (train.lr: 0.01 → 0.02" in r.stderr


def test_export_one_file_evaluate_and_predict_agree(cascade, phantom_store, phantom_dir, tmp_path, capsys):
    model = tmp_path / "cascade.safetensors"
    assert main(["export", str(cascade), "--out", str(model), "--tag", "latest"]) == 0
    assert not list(tmp_path.glob("*stage*")), "one file holds both stages"
    from safetensors import safe_open

    with safe_open(str(model), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert any(k.startswith("stage1.") for k in keys) and any(k.startswith("stage2.") for k in keys)
    assert json.loads(meta["plan_stage2"])["crop"]["margin"] == 0.2 and "crop" not in json.loads(meta["plan"])
    for source, out in ((model, tmp_path / "e_file"), (cascade, tmp_path / "e_dir")):
        assert main(["evaluate", str(source), "--data", str(phantom_store), "--split", "all", "--out", str(out),
                     "--cpu", "--tag", "latest", "--save-predictions"]) == 0
    a, b = (json.loads((tmp_path / e / "metrics.json").read_text()) for e in ("e_file", "e_dir"))
    assert a["mean_iou"] == pytest.approx(b["mean_iou"], abs=1e-7) and "lesions" in a
    for n in (1, 4):  # the plan contract, crop included: predict on the source file = evaluate's prediction
        out = tmp_path / f"p{n}.nii.gz"
        assert main(["predict", str(model), str(phantom_dir / f"volume-{n}.nii.gz"), "--out", str(out), "--cpu"]) == 0
        saved = np.asarray(nib.load(tmp_path / "e_file" / "predictions" / f"lits_{n:04d}.nii.gz").dataobj)
        assert np.array_equal(np.asarray(nib.load(out).dataobj), saved)


def test_cascade_labels_lie_in_the_stage1_organ_box(cascade):
    from hpc_seg.evaluation.cascade import Cascade, cascade_labels, load_model
    from hpc_seg.evaluation.inference import postprocess, predict_labels
    from hpc_seg.ingest.catalog import Store
    from hpc_seg.preprocessing.crop import class_mask, crop_box, organ_box

    model, cfg, plan = load_model(cascade, "latest", prefer_gpu=False)
    assert isinstance(model, Cascade)
    store = Store.open(cfg.data.store)
    image = store.root["cases"][store.case_ids[0]]["image"][...]
    import torch

    first = postprocess(predict_labels(model.stage1, model.plan1, image, torch.device("cpu")).labels, plan.classes)
    labels = cascade_labels(model, image, torch.device("cpu"), None, False)
    box = organ_box(class_mask(first, plan.classes, ["liver", "tumour"]))
    inside = np.zeros(labels.shape, bool)
    if box is not None:
        inside[crop_box(box, labels.shape, 0.2)] = True
    assert not labels[~inside].any()  # nothing outside stage 1's box


def test_bad_cascade_configs_and_exports(cascade, phantom_dir, tmp_path, capsys):
    with pytest.raises(ConfigError, match="cascade.stage2.*unknown key 'data.sizes'"):
        load_config(None, ["cascade.enabled=true", "cascade.stage2={data.sizes: [1, 2]}"])
    with pytest.raises(ConfigError, match="cannot set 'cascade.enabled'"):
        load_config(None, ["cascade.enabled=true", "cascade.stage2={cascade.enabled: true}"])
    assert main(["export", str(cascade), "--out", str(tmp_path / "c.onnx"), "--tag", "latest"]) == 2
    assert "a cascade exports to one .safetensors file" in capsys.readouterr().err
    assert main(["export", str(cascade / "stage2"), "--out", str(tmp_path / "s2.safetensors"), "--tag", "latest"]) == 2
    assert "a cascade's stage 2" in capsys.readouterr().err and not (tmp_path / "s2.safetensors").exists()
    assert main(["predict", str(cascade / "stage2"), str(phantom_dir / "volume-0.nii.gz"), "--out",
                 str(tmp_path / "y.nii.gz"), "--cpu"]) == 2
    assert "sees crops around ['liver', 'tumour'] (a cascade's stage 2)" in capsys.readouterr().err


def test_cascade_geometry_with_oracle_stages():
    """Stages that echo their input (image = labels): the cascade's output is exactly the labels inside
    the box of stage 1's main organ components grown by the margin, background outside; a stray
    false-positive speck is neither in the box nor in the output."""
    import dataclasses

    import torch

    from hpc_seg.evaluation.cascade import Cascade, cascade_labels
    from hpc_seg.preprocessing.crop import crop_box, organ_box
    from hpc_seg.preprocessing.plan import PreprocessingPlan
    from tests.evaluation.test_postprocess import LabelEcho

    labels = np.zeros((12, 40, 48), np.uint8)
    labels[3:9, 10:30, 12:36] = 1
    labels[5:7, 15:20, 20:25] = 2
    labels[0, 0, 0:2] = 1  # a speck stage 1 "finds" far from the liver: under a tenth of its size
    assert organ_box(labels[1:] > 0) == ((2, 8), (10, 30), (12, 36))  # the liver's box without the speck
    cut = crop_box(((3, 9), (10, 30), (12, 36)), labels.shape, 0.2)
    p1 = PreprocessingPlan(kind="t", modality="CT", classes=("background", "liver", "tumour"), channels=1,
                           split_seed=0, train_cases=1, train_digest="", mode="2d", size=(40, 48))
    p2 = dataclasses.replace(p1, size=(cut[1].stop - cut[1].start, cut[2].stop - cut[2].start),
                             crop={"around": ["liver", "tumour"], "margin": 0.2})  # no resize: exact echo
    out = cascade_labels(Cascade(LabelEcho(3), p1, LabelEcho(3), p2), labels[None].astype(np.int16),
                         torch.device("cpu"), None, False)
    inside = np.zeros(labels.shape, bool)
    inside[cut] = True
    assert np.array_equal(out[inside], labels[inside]) and not out[~inside].any()
    assert out[0, 0, 0] == 0 and (out == 2).sum() == (labels == 2).sum()

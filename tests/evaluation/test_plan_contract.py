"""The preprocessing contract end to end: evaluate never reads labels before predicting, predict
and evaluate --save-predictions agree voxel for voxel, one-logit binary models, models and run
directories without a plan refused with what to do."""

import json
import os
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from hpc_seg.cli import main
from hpc_seg.ingest.prepare import prepare
from tests.runs import BIN, ROOT, run_train

SETS = ["data.size=[48,48]", "train.max_steps=6", "train.val_every_steps=0", "checkpoint.every_steps=0",
        "data.normalize=zscore", "deepspeed.zero_stage=1"]


@pytest.fixture(scope="module")
def zscore_run(tmp_path_factory, phantom_store):
    run = tmp_path_factory.mktemp("zscore") / "run"
    r = run_train(run, phantom_store, SETS, nproc=1)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert json.loads((run / "plan.json").read_text())["normalize"] == "zscore"
    return run


def _zero_label_copy(phantom_dir, dst):
    dst.mkdir()
    for vol in sorted(phantom_dir.glob("volume-*.nii.gz")):
        shutil.copy(vol, dst / vol.name)
        seg = nib.load(phantom_dir / vol.name.replace("volume", "segmentation"))
        nib.save(nib.Nifti1Image(np.zeros(seg.shape, np.uint8), seg.affine, seg.header),
                 dst / vol.name.replace("volume", "segmentation"))
    return dst


def test_evaluate_ignores_labels_and_predict_agrees(zscore_run, phantom_store, phantom_dir, tmp_path):
    model = tmp_path / "m.safetensors"
    assert main(["export", str(zscore_run), "--out", str(model), "--tag", "latest"]) == 0
    zero = tmp_path / "zero.zarr"
    assert prepare("lits", _zero_label_copy(phantom_dir, tmp_path / "zero-src"), zero, show_progress=False).plan
    for store, out in ((phantom_store, "a"), (zero, "b")):
        assert main(["evaluate", str(model), "--data", str(store), "--split", "all", "--out", str(tmp_path / out),
                     "--cpu", "--save-predictions"]) == 0
    for n in range(6):
        a = nib.load(tmp_path / "a" / "predictions" / f"lits_{n:04d}.nii.gz")
        b = nib.load(tmp_path / "b" / "predictions" / f"lits_{n:04d}.nii.gz")
        src = nib.load(phantom_dir / f"volume-{n}.nii.gz")
        assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))  # labels never used to predict
        assert a.shape == src.shape and np.allclose(a.affine, src.affine)  # the case's original grid
    for n in (1, 4):
        out = tmp_path / f"p{n}.nii.gz"
        assert main(["predict", str(model), str(phantom_dir / f"volume-{n}.nii.gz"), "--out", str(out), "--cpu"]) == 0
        saved = nib.load(tmp_path / "a" / "predictions" / f"lits_{n:04d}.nii.gz")
        assert np.array_equal(np.asarray(nib.load(out).dataobj), np.asarray(saved.dataobj))
    res = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert res["plan"]["normalize"] == "zscore" and res["plan"]["train_cases"] >= 1


def test_models_without_plan_are_refused(zscore_run, phantom_store, tmp_path, capsys):
    old = tmp_path / "old-run"
    shutil.copytree(zscore_run, old)
    (old / "plan.json").unlink()
    assert main(["evaluate", str(old), "--data", str(phantom_store), "--out", str(tmp_path / "e"), "--cpu",
                 "--tag", "latest"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no plan.json" in err and "retrain" in err and "plan-from-store" not in err
    assert main(["export", str(old), "--out", str(tmp_path / "x.safetensors"), "--tag", "latest"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no plan.json" in err and "retrain" in err
    assert not (tmp_path / "x.safetensors").exists()
    with pytest.raises(SystemExit) as gone:  # the 0.1 compatibility option is gone: a usage error
        main(["export", str(old), "--out", str(tmp_path / "x.safetensors"), "--plan-from-store", str(phantom_store)])
    assert gone.value.code == 2 and "--plan-from-store" in capsys.readouterr().err
    fixed = tmp_path / "fixed.safetensors"
    assert main(["export", str(zscore_run), "--out", str(fixed), "--tag", "latest"]) == 0
    capsys.readouterr()  # the export's own progress output
    # an export without an embedded plan (as made before plans existed)
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(fixed), framework="pt") as f:
        meta = dict(f.metadata())
    meta.pop("plan")
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(str(fixed)), str(bare), metadata=meta)
    assert main(["evaluate", str(bare), "--data", str(phantom_store), "--out", str(tmp_path / "e"), "--cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no embedded preprocessing plan" in err and "re-export" in err
    meta["plan"] = json.dumps({**json.loads(load_meta(fixed)["plan"]), "version": 0})
    save_file(load_file(str(fixed)), str(bare), metadata=meta)
    assert main(["evaluate", str(bare), "--data", str(phantom_store), "--out", str(tmp_path / "e"), "--cpu"]) == 2
    assert "plan version 0, this hpc-seg reads version 1" in capsys.readouterr().err


def load_meta(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def test_one_logit_binary_model_writes_png_masks(synthetic_rgb, tmp_path):
    store = tmp_path / "rgb.zarr"
    prepare("kvasir", synthetic_rgb, store, show_progress=False)
    run = tmp_path / "run"
    r = run_train(run, store, ["data.kind=kvasir", "data.mode=2d", "loss.kind=bce_dice", "train.max_steps=4",
                               "train.val_every_steps=0", "checkpoint.every_steps=0", "deepspeed.zero_stage=0"],
                  nproc=1)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    plan = json.loads((run / "plan.json").read_text())
    assert plan["output"] == "sigmoid" and plan["normalize"] == "rgb"
    assert main(["evaluate", str(run), "--data", str(store), "--split", "all", "--out", str(tmp_path / "e"),
                 "--cpu", "--tag", "latest", "--save-predictions"]) == 0
    pngs = sorted((tmp_path / "e" / "predictions").glob("*.png"))
    assert len(pngs) == 8
    mask = np.asarray(Image.open(pngs[0]))
    assert mask.shape == (96, 128) and set(np.unique(mask)) <= {0, 255}  # the source image size
    res = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert set(res["per_class"]) == {"background", "polyp"}


def test_distributed_launch_without_prepared_store_names_prepare(tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}
    r = subprocess.run([str(BIN / "hpc-seg"), "train", "--config", "tiny_cpu.yaml", "--run-dir", str(tmp_path / "r"),
                        "--set", f"data.store={tmp_path / 'none.zarr'}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "hpc-seg prepare phantom" in r.stderr and "2 ranks" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "none.zarr").exists()

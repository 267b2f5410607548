"""ONNX export with the plan inside, run through onnxruntime: the same labels as the PyTorch export on
a real CT, probabilities within 1e-4, no DeepSpeed in the process, bad files refused in one line."""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from hpc_seg.cli import main
from hpc_seg.evaluation.inference import predict_probs
from hpc_seg.evaluation.model_io import load_for_eval
from hpc_seg.ingest.nifti_io import ct_to_int16, load_nifti, to_canonical
from hpc_seg.preprocessing.plan import PLAN_VERSION
from tests.conftest import FIXTURES
from tests.runs import ROOT, run_train

CT = FIXTURES / "totalseg-ct" / "ct.nii.gz"  # a real CT (TotalSegmentator, Apache-2.0)
SETS = ["data.size=[48,48]", "train.max_steps=8", "train.lr=0.01", "train.val_every_steps=0",
        "checkpoint.every_steps=0", "data.mode=2.5d", "model.name=unet_aspp"]


@pytest.fixture(scope="module")
def exports(tmp_path_factory, phantom_store):
    """One trained run exported both ways (48² input: every CT slice is resized by the plan)."""
    d = tmp_path_factory.mktemp("onnx")
    r = run_train(d / "run", phantom_store, SETS, nproc=1)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    for name in ("m.safetensors", "m.onnx"):
        assert main(["export", str(d / "run"), "--out", str(d / name)]) == 0
    return d


def test_one_file_with_the_plan_and_a_dynamic_batch(exports):
    path = exports / "m.onnx"
    assert not list(exports.glob("*.data")), "weights must be inside the file"
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    meta = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    assert meta == props and meta["hpc_seg.plan_version"] == str(PLAN_VERSION)
    plan = json.loads(meta["hpc_seg.plan"])
    assert plan["size"] == [48, 48] and plan["mode"] == "2.5d"
    assert set(json.loads(meta["hpc_seg.inference"])) >= {"tta", "postprocess"}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"
    for n in (1, 5):
        out = session.run(None, {"image": np.zeros((n, 3, 48, 48), np.float32)})[0]
        assert out.shape == (n, 3, 48, 48)


def test_onnx_predicts_the_labels_of_the_pytorch_export_on_a_real_ct(exports, tmp_path):
    a, b = tmp_path / "torch.nii.gz", tmp_path / "onnx.nii.gz"
    assert main(["predict", str(exports / "m.safetensors"), str(CT), "--out", str(a), "--cpu"]) == 0
    assert main(["predict", str(exports / "m.onnx"), str(CT), "--out", str(b), "--cpu"]) == 0
    la, lb = np.asarray(nib.load(a).dataobj), np.asarray(nib.load(b).dataobj)
    assert la.shape == lb.shape == nib.load(CT).shape
    assert (la == lb).mean() >= 0.9999 and np.unique(la).size > 1
    image = ct_to_int16(to_canonical(load_nifti(CT), CT).data, CT)[None]
    (tm, _, plan), (om, _, _) = load_for_eval(exports / "m.safetensors"), load_for_eval(exports / "m.onnx")
    gap = np.abs(predict_probs(tm, plan, image) - predict_probs(om, plan, image)).max()
    assert gap < 1e-4, gap


def test_predict_from_onnx_imports_no_deepspeed(exports, tmp_path):
    code = ("import sys\nfrom hpc_seg.cli import main\n"
            f"assert main(['predict', {str(exports / 'm.onnx')!r}, {str(CT)!r}, '--out', "
            f"{str(tmp_path / 'p.nii.gz')!r}, '--cpu']) == 0\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'deepspeed'))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"


def _rewrite(src, dst, **props):
    model = onnx.load(str(src))
    kept = {p.key: p.value for p in model.metadata_props}
    kept.update({k.replace("__", "."): v for k, v in props.items() if v is not None})
    for k in [k for k, v in props.items() if v is None]:
        kept.pop(k.replace("__", "."), None)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, kept)
    onnx.save(model, str(dst))


def test_bad_onnx_files_are_refused_in_one_line(exports, tmp_path, capsys):
    out = ["--out", str(tmp_path / "p.nii.gz"), "--cpu"]
    bare = tmp_path / "bare.onnx"
    _rewrite(exports / "m.onnx", bare, hpc_seg__plan=None)
    plan = json.loads({p.key: p.value for p in onnx.load(str(exports / "m.onnx")).metadata_props}["hpc_seg.plan"])
    old = tmp_path / "old.onnx"
    _rewrite(exports / "m.onnx", old, hpc_seg__plan=json.dumps({**plan, "version": 0}))
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    for path, words in ((bare, "without hpc-seg's preprocessing plan"), (old, "plan version 0"),
                        (junk, "not a readable ONNX model")):
        assert main(["predict", str(path), str(CT), *out]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err and str(path) in err, err
    assert not (tmp_path / "p.nii.gz").exists()


def test_evaluate_an_onnx_export_gives_the_pytorch_figures(exports, phantom_store, tmp_path):
    res = {}
    for name in ("m.safetensors", "m.onnx"):
        out = tmp_path / name
        assert main(["evaluate", str(exports / name), "--data", str(phantom_store), "--out", str(out), "--cpu"]) == 0
        res[name] = json.loads((out / "metrics.json").read_text())
    assert res["m.onnx"]["mean_iou"] == pytest.approx(res["m.safetensors"]["mean_iou"], abs=1e-4)

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
import yaml

from hpc_seg.cli import main
from hpc_seg.evaluation.inference import predict_probs
from hpc_seg.evaluation.model_io import load_for_eval
from hpc_seg.ingest.nifti_io import ct_to_int16, load_nifti, to_canonical
from hpc_seg.preprocessing.plan import PLAN_VERSION
from tests.runs import ROOT

from tests.evaluation.conftest import CT  # the model: the ``exports`` fixture (tests/evaluation/conftest.py)


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


BLOCK = """import runpy, sys
class Block:  # the docs' promise: onnxruntime, numpy, scipy and nibabel only
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "hpc_seg", "deepspeed", "zarr"):
            raise ImportError(f"{name} is not available to this user")
sys.meta_path.insert(0, Block())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("settings", [None, {"tta": True, "postprocess": True}])
def test_the_docs_example_segments_like_predict_without_torch(exports, tmp_path, settings):
    model = exports / "m.onnx"
    if settings:  # the same graph with other inference settings in its metadata
        proto = onnx.load(str(model))
        props = {p.key: p.value for p in proto.metadata_props}
        config = yaml.safe_load(props["hpc_seg.config"])
        config["inference"] = settings
        onnx.helper.set_model_props(proto, {**props, "hpc_seg.inference": json.dumps(settings),
                                            "hpc_seg.config": yaml.safe_dump(config)})
        model = tmp_path / "m.onnx"
        onnx.save(proto, str(model))
    ours, theirs = tmp_path / "hpc_seg.nii.gz", tmp_path / "example.nii.gz"
    assert main(["predict", str(model), str(CT), "--out", str(ours), "--cpu"]) == 0
    r = subprocess.run([sys.executable, "-c", BLOCK, str(ROOT / "examples" / "onnx_predict.py"), str(model), str(CT),
                        str(theirs)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"PLAN_VERSION = {PLAN_VERSION}" in (ROOT / "examples" / "onnx_predict.py").read_text()
    a, b = nib.load(ours), nib.load(theirs)
    la, lb = np.asarray(a.dataobj), np.asarray(b.dataobj)
    assert la.shape == lb.shape and np.allclose(a.affine, b.affine) and np.unique(la).size > 1
    assert (la == lb).mean() >= 0.9999, (la == lb).mean()


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
    _rewrite(exports / "m.onnx", old, hpc_seg__plan=json.dumps({**plan, "version": 0}), hpc_seg__plan_version="0")
    mixed = tmp_path / "mixed.onnx"
    _rewrite(exports / "m.onnx", mixed, hpc_seg__plan=json.dumps({**plan, "version": 0}))
    settings = tmp_path / "settings.onnx"
    _rewrite(exports / "m.onnx", settings, hpc_seg__inference=json.dumps({"tta": True, "postprocess": True}))
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    for path, words in ((bare, "without hpc-seg's preprocessing plan"), (old, "plan version 0"),
                        (mixed, "metadata says plan version 1"),
                        (settings, "disagrees with the embedded config's inference section"),
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


def _plan(rgb: bool, one_logit: bool):
    from hpc_seg.preprocessing.plan import PreprocessingPlan

    classes = ("background", "polyp") if rgb or one_logit else ("background", "liver", "tumour")
    return PreprocessingPlan(kind="kvasir" if rgb else "lits", modality="RGB" if rgb else "CT", classes=classes,
                             channels=3 if rgb else 1, split_seed=0, train_cases=1, train_digest="-",
                             window=None if rgb else (-100.0, 400.0), mode="2d" if rgb else "2.5d",
                             slices=1 if rgb else 3, size=(40, 40), output="sigmoid" if one_logit else "softmax")


@pytest.mark.parametrize("name,rgb,one_logit", [("transunet", False, False), ("unetpp", False, True),
                                                ("unet_aspp", True, True), ("transunet", True, False)])
def test_every_model_kind_exports_and_matches_torch(name, rgb, one_logit, tmp_path):
    """Random batches of 5 (the export saw batch 1) through each model family, CT and RGB, softmax and
    one-logit; TransUNet at a size other than its default (its position embeddings are resized)."""
    import torch

    from hpc_seg.config import load_config
    from hpc_seg.evaluation.onnx_io import export_onnx, load_onnx
    from hpc_seg.models import build_from_config

    plan = _plan(rgb, one_logit)
    cfg = load_config(None, [f"model.name={name}", "model.size=tiny", "model.pretrained=null"])
    torch.manual_seed(0)
    model = build_from_config(cfg, plan, pretrained=False).eval()
    path = export_onnx(model, cfg, plan, tmp_path / "m.onnx")
    onnx_model, _, back = load_onnx(path, prefer_gpu=False)
    assert back == plan and onnx_model.provider == "CPUExecutionProvider"
    x = torch.randn(5, plan.in_channels, *plan.size)
    with torch.no_grad():
        ref = model(x)
    got = onnx_model(x)
    assert got.shape == ref.shape == (5, plan.out_channels, *plan.size)
    assert float((got - ref).abs().max()) < 1e-4


def test_a_graph_that_does_not_fit_its_plan_is_refused(tmp_path):
    import dataclasses

    from hpc_seg.config import load_config
    from hpc_seg.errors import PlanError
    from hpc_seg.evaluation.onnx_io import export_onnx, load_onnx
    from hpc_seg.models import build_from_config

    plan = _plan(False, False)
    cfg = load_config(None, ["model.name=unet_aspp", "model.size=tiny"])
    model = build_from_config(cfg, plan, pretrained=False)
    path = export_onnx(model, cfg, dataclasses.replace(plan, output="sigmoid", classes=plan.classes[:2]),
                       tmp_path / "m.onnx")  # a 3-channel graph beside a one-logit plan
    with pytest.raises(PlanError, match="channels"):
        load_onnx(path, prefer_gpu=False)


@pytest.mark.parametrize("name,size,dynamic", [("unetpp", 48, True), ("unet_aspp", 48, True),
                                               ("unet_aspp", 40, False), ("transunet", 48, False)])
def test_spatial_sizes_dynamic_where_the_architecture_allows(name, size, dynamic, tmp_path):
    """UNet++/UNet_ASPP pad to a multiple of 16: a plan size that is one traces a graph for every such
    size (checked against torch at 64×96); otherwise, and for TransUNet, the plan's size is fixed."""
    import dataclasses

    import torch

    from hpc_seg.config import load_config
    from hpc_seg.evaluation.onnx_io import export_onnx, load_onnx
    from hpc_seg.models import build_from_config

    plan = dataclasses.replace(_plan(False, False), size=(size, size))
    cfg = load_config(None, [f"model.name={name}", "model.size=tiny", "model.pretrained=null"])
    torch.manual_seed(0)
    model = build_from_config(cfg, plan, pretrained=False).eval()
    path = export_onnx(model, cfg, plan, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["hpc_seg.size_multiple"] == ("16" if dynamic else "0")
    assert session.get_inputs()[0].shape[2:] == (["height", "width"] if dynamic else [size, size])
    load_onnx(path, prefer_gpu=False)  # the plan check accepts a dynamic graph
    if dynamic:
        x = torch.randn(2, plan.in_channels, 64, 96)
        with torch.no_grad():
            ref = model(x).numpy()
        got = session.run(None, {"image": x.numpy()})[0]
        assert got.shape == ref.shape and np.abs(got - ref).max() < 1e-4

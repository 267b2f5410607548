"""One small trained model, exported both ways, shared by the tests that predict on the real CT fixture."""

import pytest

from hpc_seg.cli import main
from tests.conftest import FIXTURES
from tests.runs import run_train

CT = FIXTURES / "totalseg-ct" / "ct.nii.gz"  # a real CT (TotalSegmentator, Apache-2.0), 122×101×30 at 3 mm
SETS = ["data.size=[48,48]", "train.max_steps=8", "train.lr=0.01", "train.val_every_steps=0",
        "checkpoint.every_steps=0", "data.mode=2.5d", "model.name=unet_aspp"]


@pytest.fixture(scope="session")
def exports(tmp_path_factory, phantom_store):
    """One trained run exported as m.safetensors and m.onnx (48² input: every CT slice is resized by the
    plan). Tests read these files and write elsewhere."""
    d = tmp_path_factory.mktemp("exports")
    r = run_train(d / "run", phantom_store, SETS, nproc=1)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    for name in ("m.safetensors", "m.onnx"):
        assert main(["export", str(d / "run"), "--out", str(d / name)]) == 0
    return d

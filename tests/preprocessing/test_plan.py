"""The preprocessing plan: computed from training cases only, versioned, resolved with a config,
kept in store metadata that plain zarr-python reads without warnings; old layouts refused."""

import json
import warnings

import numpy as np
import pytest
import torch
import zarr

from hpc_seg.cli import main
from hpc_seg.config import load_config
from tests.conftest import case_arrays
from hpc_seg.errors import PlanError
from hpc_seg.preprocessing.plan import PreprocessingPlan, model_input, probabilities, read_plan
from hpc_seg.ingest.split import read_split
from hpc_seg.errors import StoreError


def test_plan_statistics_come_from_training_cases_only(phantom_store):
    plan, split = read_plan(phantom_store, 0), read_split(phantom_store, 0)
    vals = np.concatenate([case_arrays(phantom_store, c)[0][0][case_arrays(phantom_store, c)[1] > 0]
                           for c in split["train"]]).astype(np.float64)
    assert plan.foreground["voxels"] == vals.size
    assert plan.foreground["mean"] == pytest.approx(vals.mean(), rel=1e-9)
    assert plan.foreground["std"] == pytest.approx(vals.std(), rel=1e-9)
    everything = np.concatenate([case_arrays(phantom_store, c)[0][0][case_arrays(phantom_store, c)[1] > 0]
                                 for c in sum(split.values(), [])]).astype(np.float64)
    assert everything.mean() != pytest.approx(vals.mean(), rel=1e-6)  # val/test voxels would change it
    assert plan.train_cases == len(split["train"]) and plan.split_seed == 0 and plan.mode is None and plan.size is None


def test_resolve_with_config_zscore_and_minmax(phantom_store):
    plan = read_plan(phantom_store, 0)
    d = load_config(None, [f"data.store={phantom_store}", "data.normalize=zscore", "data.size=[32,32]"]).data
    z = plan.resolve(d)
    assert z.mode == "2.5d" and z.in_channels == 3 and z.size == (32, 32)
    assert z.offset[0] == pytest.approx(np.clip(plan.foreground["mean"], -100, 400))
    assert z.scale[0] == pytest.approx(plan.foreground["std"])
    raw = np.tile(np.array([[-1000, 0], [60, 2000]], np.int16), (1, 3, 16, 16))  # (1, 3, 32, 32)
    x = model_input(z, raw)
    expected = (np.clip(raw.astype(np.float32), -100, 400) - z.offset[0]) / z.scale[0]
    assert np.allclose(x.numpy(), expected, atol=1e-6)
    again = PreprocessingPlan.from_dict(json.loads(z.to_json()))
    assert again == z


def test_impossible_pairs_refused(phantom_store):
    plan = read_plan(phantom_store, 0)
    d = load_config(None, []).data
    with pytest.raises(PlanError, match="bce_dice is for binary tasks"):
        plan.resolve(d, "bce_dice")
    with pytest.raises(PlanError, match="version 99.*reads version 1"):
        PreprocessingPlan.from_dict({**plan.to_dict(), "version": 99}, source="x.json")
    rgb = PreprocessingPlan("kvasir", "RGB", ("background", "polyp"), 3, 0, 1, "d", normalize="rgb")
    with pytest.raises(PlanError, match="'2d' for kvasir"):
        rgb.resolve(d)
    one = rgb.resolve(load_config(None, ["data.mode=2d", "loss.kind=bce_dice"]).data, "bce_dice")
    assert one.out_channels == 1 and one.num_classes == 2
    p = probabilities(one, torch.full((1, 1, 2, 2), 2.0))  # one logit → [1 - σ, σ]
    assert p.shape == (1, 2, 2, 2) and float(p[0, 1, 0, 0]) == pytest.approx(float(torch.sigmoid(torch.tensor(2.0))))
    assert torch.allclose(p.sum(1), torch.ones(1, 2, 2))


def test_metadata_lists_without_warnings_and_is_cheap(phantom_store):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        root = zarr.open_group(str(phantom_store), mode="r")
        names = [n for n, _ in root.members(max_depth=None)]
        assert "meta/index" in names and "meta/plans/seed0" in names and "meta/splits/seed0" in names
        assert root["meta/plans/seed0"].attrs["hpc_seg_meta"]["version"] == 1
    assert not any(p.suffix == ".json" and p.name != "zarr.json" for p in phantom_store.iterdir())


def test_old_layout_refused_with_both_versions(phantom_store, tmp_path, capsys):
    import shutil

    old = tmp_path / "old.zarr"
    shutil.copytree(phantom_store, old)
    meta = json.loads((old / "zarr.json").read_text())
    meta["attributes"]["hpc_seg"]["format"] = "hpc-seg/zarr-v1"
    (old / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="layout hpc-seg/zarr-v1, this hpc-seg reads hpc-seg/zarr-v3 and hpc-seg/zarr-v2"):
        read_split(old, 0)
    assert main(["inspect", str(old)]) == 2
    assert "hpc-seg prepare" in capsys.readouterr().err


def test_missing_plan_names_the_command(phantom_store):
    with pytest.raises(PlanError, match="hpc-seg split .* --seed 77"):
        read_plan(phantom_store, 77)

"""How a cascade decides what each stage does (no training here: configs and run files only)."""

import json
import os

import pytest
import yaml

from hpc_seg.config import load_config, to_dict
from hpc_seg.config.cascade import stage_configs
from hpc_seg.errors import HpcSegError
from hpc_seg.training.stages import _action, _saved_differences


def _stage2(*sets):
    cfg = load_config(None, ["cascade.enabled=true", "data.store=outputs/x.zarr", *sets])
    return dict(stage_configs(cfg))["stage2"]


def _saved(tmp_path, cfg, step=None, latest=False):
    d = tmp_path / "stage2"
    d.mkdir(exist_ok=True)
    (d / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    if step is not None:
        (d / "final.json").write_text(json.dumps({"step": step}))
    if latest:
        (d / "checkpoints").mkdir(exist_ok=True)
        (d / "checkpoints" / "latest").write_text("step00000001")
    return d


def test_paths_written_absolute_by_submit_are_the_same_run(tmp_path):
    cfg = _stage2()
    absolute = _stage2(f"data.store={os.path.abspath('outputs/x.zarr')}")
    assert _saved_differences(_saved(tmp_path, absolute), cfg) == ([], [])


def test_a_changed_crop_is_a_changed_input(tmp_path):
    d = _saved(tmp_path, _stage2())
    refused, _ = _saved_differences(d, _stage2("cascade.organ=[liver]"))
    assert any(x.startswith("data.crop_around") for x in refused)
    _, warned = _saved_differences(d, _stage2("cascade.stage2={data.crop_margin: 0.3}"))
    assert any(x.startswith("data.crop_margin") for x in warned)


def test_actions(tmp_path):
    cfg = _stage2()
    assert _action(tmp_path / "stage2", cfg, None) == "start"
    d = _saved(tmp_path, cfg, latest=True)
    with pytest.raises(HpcSegError, match="pass --resume latest"):
        _action(d, cfg, None)
    assert _action(d, cfg, "latest") == "resume"
    _saved(tmp_path, cfg, step=cfg.train.max_steps, latest=True)
    assert _action(d, cfg, "latest") == "skip"
    with pytest.raises(HpcSegError, match="finished with other settings .*train.lr"):
        _action(d, _stage2("train.lr=0.5"), "latest")
    with pytest.raises(HpcSegError, match="trained with another model or input .*model.name"):
        _action(d, _stage2("cascade.stage2={model.name: unetpp}"), "latest")

import pytest

from hpc_seg.config import CONFIG_DIR, load_config, to_dict
from hpc_seg.config.loader import apply_overrides
from hpc_seg.errors import ConfigError


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_and_shipped_configs_load():
    cfg = load_config()
    assert cfg.loss.dice_weight == 0.3 and cfg.loss.ce_weight == 0.7
    from hpc_seg.jobs.grid import expand_grid, is_grid, load_grid

    for path in CONFIG_DIR.rglob("*.yaml"):
        if is_grid(path):
            name, base, axes = load_grid(path)
            for _, overrides in expand_grid(axes):
                load_config(base, overrides)
        else:
            load_config(path)


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, "bad.yaml", "data:\n  windw: [-100, 400]\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "data.windw" in str(e.value) and str(p) in str(e.value)


def test_unknown_section(tmp_path):
    p = write(tmp_path, "bad.yaml", "trian:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="'trian'"):
        load_config(p)


@pytest.mark.parametrize("text,key", [
    ("data:\n  batch_size: 'eight'\n", "data.batch_size"),
    ("data:\n  batch_size: 8.5\n", "data.batch_size"),
    ("data:\n  size: [128, 'x']\n", "data.size[1]"),
    ("data:\n  augment:\n    flip: 1\n", "data.augment.flip"),
    ("data:\n  mode: 4d\n", "data.mode"),
    ("loss:\n  dice_weight: true\n", "loss.dice_weight"),
    ("inference:\n  tta: 'yes please'\n", "inference.tta"),
])
def test_wrong_type_names_key(tmp_path, text, key):
    p = write(tmp_path, "bad.yaml", text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert key in str(e.value) and "bad.yaml" in str(e.value)


def test_int_accepted_for_float_and_validation(tmp_path):
    cfg = load_config(write(tmp_path, "ok.yaml", "loss:\n  dice_weight: 1\n"))
    assert cfg.loss.dice_weight == 1.0 and isinstance(cfg.loss.dice_weight, float)
    with pytest.raises(ConfigError, match="window"):
        load_config(write(tmp_path, "w.yaml", "data:\n  window: [400, -100]\n"))


def test_overrides_single_syntax():
    cfg = load_config(None, ["data.size=[96,64]", "loss.ce_weight=0.5", "model.overrides={depth: 12}",
                             "data.augment.enabled=false"])
    assert cfg.data.size == [96, 64] and cfg.loss.ce_weight == 0.5
    assert cfg.model.overrides == {"depth": 12} and cfg.data.augment.enabled is False
    with pytest.raises(ConfigError, match="data.nope"):
        load_config(None, ["data.nope=1"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        apply_overrides({}, ["data.size"])


def test_base_chain_and_cycle(tmp_path):
    write(tmp_path, "a.yaml", "name: a\ndata:\n  batch_size: 4\n  slices: 5\n")
    b = write(tmp_path, "b.yaml", "base: a.yaml\nname: b\ndata:\n  batch_size: 2\n")
    cfg = load_config(b)
    assert (cfg.name, cfg.data.batch_size, cfg.data.slices) == ("b", 2, 5)
    write(tmp_path, "c.yaml", "base: d.yaml\n")
    d = write(tmp_path, "d.yaml", "base: c.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(d)


def test_round_trip_to_dict():
    cfg = load_config("demo.yaml")
    d = to_dict(cfg)
    assert d["data"]["mode"] == "2.5d" and d["data"]["augment"]["flip"] is True


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "x.yaml", "data: [unclosed\n"))


def test_yaml11_scientific_floats_accepted(tmp_path):
    cfg = load_config(write(tmp_path, "lr.yaml", "train:\n  lr: 1e-4\n"), ["train.weight_decay=5E-2"])
    assert cfg.train.lr == 1e-4 and cfg.train.weight_decay == 0.05
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(None, ["train.lr=fast"])


def test_renamed_key_is_read_with_a_warning_naming_the_new_one(tmp_path):
    import warnings as w

    path = tmp_path / "old.yaml"
    path.write_text("data:\n  dataset: lits\n  extra_sources:\n    - {dataset: totalseg, path: /x}\n")
    with w.catch_warnings(record=True) as caught:
        w.simplefilter("always")
        cfg = load_config(path)
    assert cfg.data.kind == "lits" and cfg.data.extra_sources[0].kind == "totalseg"
    messages = [str(c.message) for c in caught if issubclass(c.category, FutureWarning)]
    assert any("'data.dataset' is now 'data.kind'" in m for m in messages), messages
    assert any("'data.extra_sources[0].dataset' is now 'data.extra_sources[0].kind'" in m for m in messages)


def test_old_and_new_name_in_one_file_is_an_error(tmp_path):
    both = tmp_path / "both.yaml"
    both.write_text("data:\n  dataset: lits\n  kind: msd\n")
    with pytest.raises(ConfigError, match="both 'data.dataset' and 'data.kind'"):
        load_config(both)


def test_no_warning_for_the_current_name():
    import warnings as w

    with w.catch_warnings():
        w.simplefilter("error")
        assert load_config(None, ["data.kind=lits"]).data.kind == "lits"


def test_former_name_over_a_shipped_base_is_a_rename_not_a_clash(tmp_path):
    """A user's file written with the former name, on top of a shipped config that uses the new one,
    and the same through --set and a grid-style override."""
    import warnings as w

    mine = tmp_path / "mine.yaml"
    mine.write_text("base: unet_aspp.yaml\ndata:\n  dataset: msd\n")
    with w.catch_warnings(record=True) as caught:
        w.simplefilter("always")
        assert load_config(mine).data.kind == "msd"
        assert load_config("unet_aspp.yaml", ["data.dataset=kvasir"]).data.kind == "kvasir"
    assert sum("is now 'data.kind'" in str(c.message) for c in caught) == 2


def test_configs_hpc_seg_wrote_are_read_quietly():
    import warnings as w

    from hpc_seg.config import Config, to_dict
    from hpc_seg.config.loader import from_dict, rename_former_keys

    saved = to_dict(load_config(None, []))
    saved["data"]["dataset"] = saved["data"].pop("kind")  # as an older version wrote it
    with w.catch_warnings():
        w.simplefilter("error")
        cfg = from_dict(Config, rename_former_keys(Config, saved, warn=False))
    assert cfg.data.kind == saved["data"]["dataset"]

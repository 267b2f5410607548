"""The two stages of a cascade config (``cascade.enabled``), as two ordinary configs.

Stage 1 is the config without its cascade; stage 2 the same with ``data.crop_around`` set to
``cascade.organ`` and ``cascade.stage2``'s overrides on top. Both are typed and checked like any
config, so a wrong key in ``stage2`` is an error when the config loads, before anything runs.
"""

from __future__ import annotations

import copy

from hpc_seg.config.loader import from_dict, to_dict
from hpc_seg.config.schema import Config
from hpc_seg.errors import ConfigError

STAGES = ("stage1", "stage2")


# Keys both stages must share: one store and split (else stage 2 trains on stage 1's test cases),
# one job and process group, one tracking run; and the crop itself comes from cascade.organ.
SHARED = ("data.store", "data.source", "data.kind", "data.extra_sources", "data.split_seed", "data.val_fraction",
          "data.test_fraction", "data.crop_around", "slurm", "tracking", "train.processes", "deepspeed.comm_timeout_s")


def _flat(items: dict, prefix: str = "") -> dict:
    """``{a: {b: 1}, "c.d": 2}`` → ``{"a.b": 1, "c.d": 2}``: a nested value sets keys, never a whole section."""
    out = {}
    for key, value in items.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and not dotted.endswith(("model.overrides", "deepspeed.extra", "slurm.extra")):
            out.update(_flat(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _set(raw: dict, dotted: str, value, source: str) -> None:
    node = raw
    parts = [p for p in str(dotted).split(".") if p]
    if not parts:
        raise ConfigError(f"{source}: cascade.stage2 has an empty key")
    if parts[0] == "cascade" or any(dotted == k or dotted.startswith(k + ".") for k in SHARED):
        raise ConfigError(f"{source}: cascade.stage2 cannot set {dotted!r}: both stages share it "
                          "(set it once, outside cascade.stage2)")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: cascade.stage2 key {dotted!r}: '{p}' is not a section")
    node[parts[-1]] = copy.deepcopy(value)


def stage_configs(cfg: Config, source: str = "<config>") -> list[tuple[str, Config]]:
    """[("stage1", config), ("stage2", config)] of a cascade config."""
    if not cfg.cascade.enabled:
        raise ConfigError(f"{source}: cascade.enabled is false: not a cascade")
    base = to_dict(cfg)
    base["cascade"] = {"enabled": False, "organ": list(cfg.cascade.organ), "stage2": {}}
    one = copy.deepcopy(base)
    one["name"] = f"{cfg.name}-stage1"
    two = copy.deepcopy(base)
    two["name"] = f"{cfg.name}-stage2"
    two["data"]["crop_around"] = list(cfg.cascade.organ)
    if not cfg.cascade.organ:
        raise ConfigError(f"{source}: cascade.organ is empty: stage 2 needs classes to crop around")
    for key, value in _flat(cfg.cascade.stage2).items():
        _set(two, key, value, source)
    return [(STAGES[0], from_dict(Config, one, source=f"{source} (stage 1)")),
            (STAGES[1], from_dict(Config, two, source=f"{source} (cascade.stage2)"))]

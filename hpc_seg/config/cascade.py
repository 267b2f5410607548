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


def _set(raw: dict, dotted: str, value, source: str) -> None:
    node = raw
    parts = [p for p in str(dotted).split(".") if p]
    if not parts:
        raise ConfigError(f"{source}: cascade.stage2 has an empty key")
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
    for key, value in cfg.cascade.stage2.items():
        if str(key).split(".")[0] == "cascade":
            raise ConfigError(f"{source}: cascade.stage2 cannot set {key!r} (a stage is no cascade)")
        _set(two, key, value, source)
    return [(STAGES[0], from_dict(Config, one, source=f"{source} (stage 1)")),
            (STAGES[1], from_dict(Config, two, source=f"{source} (cascade.stage2)"))]

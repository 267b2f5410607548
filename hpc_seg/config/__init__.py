"""Typed configuration: ``load_config(path, overrides)`` → :class:`Config`."""

from __future__ import annotations

from pathlib import Path

from hpc_seg.config.loader import apply_overrides, from_dict, read_yaml, rename_former_keys, to_dict
from hpc_seg.config.schema import (AugmentConfig, CheckpointConfig, Config, DataConfig, DeepSpeedConfig,
                                   LossConfig, ModelConfig, TrackingConfig, TrainConfig)
from hpc_seg.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"  # shipped as package data

__all__ = [
    "AugmentConfig", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "DeepSpeedConfig",
    "LossConfig", "ModelConfig", "TrackingConfig", "TrainConfig",
    "CONFIG_DIR", "load_config", "resolve_config_path", "to_dict", "load_raw",
]


def resolve_config_path(name: str | Path, relative_to: Path | None = None) -> Path:
    """A config path as given, else relative to ``relative_to``, else a shipped config
    (``hpc_seg/configs``, also ``configs/`` in a checkout)."""
    p = Path(name)
    candidates = [p]
    if relative_to is not None:
        candidates.append(relative_to / p)
    candidates += [CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml"]
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(f"{name}: config file not found (also looked among the shipped configs in {CONFIG_DIR})")


def _overlay(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _overlay(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_raw(path: str | Path, _seen: tuple = ()) -> dict:
    """Read a YAML config, resolving ``base:`` chains (cycles are errors)."""
    path = resolve_config_path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: 'base' chain forms a cycle")
    raw = read_yaml(path)
    base = raw.pop("base", None)
    raw = rename_former_keys(Config, raw, source=str(path))  # before layering: a former name over a base's current one
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: key 'base' must be a file name")
    return _overlay(load_raw(resolve_config_path(base, path.parent), _seen + (path,)), raw)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply ``--set`` overrides."""
    raw = load_raw(path) if path is not None else {}
    source = str(path) if path is not None else "<defaults>"
    raw = apply_overrides(raw, overrides or [])
    cfg = from_dict(Config, raw, source=source)
    if cfg.cascade.enabled:  # both stages typed and checked now, not when stage 2 starts
        from hpc_seg.config.cascade import stage_configs

        stage_configs(cfg, source)
    return cfg

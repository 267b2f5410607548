"""Typed config loading: YAML → nested dataclasses, with strict key and type checking.

Rules:
- unknown keys are errors (naming the dotted key and the file);
- values are checked against the dataclass field types (``int``, ``float``, ``str``, ``bool``,
  ``Optional[...]``, ``list[...]``, ``dict[str, ...]``, ``Literal[...]``, nested dataclasses);
  an ``int`` is accepted where a ``float`` is expected, nothing else is coerced;
- a key renamed in the schema (a section's ``RENAMED``) is read under its former name for one
  version, with a FutureWarning naming the new key;
- overrides use one syntax, ``section.key=value``, the value parsed as YAML (``train.lr=1e-3``,
  ``data.size=[128,128]``, ``model.overrides={depth: 12}``).
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
import warnings
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from hpc_seg.config.schema import Config
from hpc_seg.errors import ConfigError

_MISSING = dataclasses.MISSING
_SCI_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_value(tp: Any, value: Any, key: str, source: str) -> Any:
    """Return ``value`` converted to ``tp`` or raise ConfigError naming ``key`` and ``source``."""
    if tp is Any:
        return value
    origin = get_origin(tp)
    if origin is Union or (types.UnionType is not None and isinstance(tp, types.UnionType)):
        return _check_union(tp, value, key, source)
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(repr(a) for a in get_args(tp))
            raise ConfigError(f"{source}: key '{key}' has value {value!r}, expected one of {choices}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: key '{key}' must be a mapping, got {type(value).__name__}")
        return from_dict(tp, value, source=source, prefix=key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: key '{key}' must be a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        return [_check_value(item_tp, v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: key '{key}' must be a mapping, got {value!r}")
        _, val_tp = get_args(tp) or (str, Any)
        return {str(k): _check_value(val_tp, v, f"{key}.{k}", source) for k, v in value.items()}
    if tp in _SCALARS:
        return _SCALARS[tp](value, key, source)
    raise ConfigError(f"{source}: key '{key}': unsupported config type {_type_name(tp)}")


def _check_union(tp: Any, value: Any, key: str, source: str) -> Any:
    args = get_args(tp)
    if value is None and type(None) in args:
        return None
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _check_value(arg, value, key, source)
        except ConfigError:
            continue
    raise ConfigError(f"{source}: key '{key}' has value {value!r}, expected {_type_name(tp)}")


def _float(value: Any, key: str, source: str) -> float:
    if isinstance(value, str) and _SCI_FLOAT.match(value.strip()):
        return float(value)  # PyYAML (YAML 1.1) reads 1e-4 (no dot) as a string
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{source}: key '{key}' has value {value!r}, expected float")
    return float(value)


def _exact(tp: type, expected: str):
    """A checker accepting exactly ``tp`` (a bool is no int: ``true`` for a step count is a mistake)."""
    def check(value: Any, key: str, source: str) -> Any:
        if isinstance(value, bool) is not (tp is bool) or not isinstance(value, tp):
            raise ConfigError(f"{source}: key '{key}' has value {value!r}, expected {expected}")
        return value
    return check


_SCALARS = {float: _float, int: _exact(int, "int"), bool: _exact(bool, "bool (true/false)"),
            str: _exact(str, "string")}


def _is_main_process() -> bool:
    """Rank 0, or no launcher at all: where a warning about the config is worth printing once."""
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def _section_of(tp: Any):
    """The dataclass a field holds (directly, optionally, or as list items), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _renamed(cls: type, data: dict, source: str, prefix: str, warn: bool = True) -> dict:
    """``data`` with the section's former key names (``cls.RENAMED``) read as the current ones, each
    with a warning naming the new key; both names in one mapping are an error."""
    renamed = getattr(cls, "RENAMED", {})
    if not any(old in data for old in renamed):
        return data
    data = dict(data)
    for old, new in renamed.items():
        if old not in data:
            continue
        dotted_old, dotted_new = (f"{prefix}.{k}" if prefix else k for k in (old, new))
        if new in data:
            raise ConfigError(f"{source}: both '{dotted_old}' and '{dotted_new}' are set; '{dotted_old}' is "
                              f"the former name of '{dotted_new}': keep only '{dotted_new}'")
        if warn and _is_main_process():
            warnings.warn(f"{source}: config key '{dotted_old}' is now '{dotted_new}': write '{dotted_new}' (the "
                          f"former name is read until the next version)", FutureWarning, stacklevel=4)
        data[new] = data.pop(old)
    return data


def rename_former_keys(cls: type, data: Any, source: str = "<dict>", prefix: str = "", warn: bool = True) -> Any:
    """The whole raw tree of ``cls`` with former key names replaced by the current ones. Applied to
    each YAML file and override before they are laid over each other, so that a user's former name
    over a shipped config's current one is a rename, not a clash. ``warn=False``: a config hpc-seg
    wrote itself (a run's config, a model's embedded one), read quietly whatever its age."""
    if not isinstance(data, dict) or not dataclasses.is_dataclass(cls):
        return data
    data = _renamed(cls, data, source, prefix, warn)
    hints = typing.get_type_hints(cls)
    out = dict(data)
    for name, value in data.items():
        section = _section_of(hints.get(name))
        if section is None:
            continue
        key = f"{prefix}.{name}" if prefix else name
        if isinstance(value, list):
            out[name] = [rename_former_keys(section, v, source, f"{key}[{i}]", warn) for i, v in enumerate(value)]
        else:
            out[name] = rename_former_keys(section, value, source, key, warn)
    return out


def _current_path(parts: list[str], source: str) -> list[str]:
    """An override's dotted key with former names replaced (``data.dataset`` → ``data.kind``)."""
    cls, out = Config, []
    for part in parts:
        renamed = getattr(cls, "RENAMED", {}) if cls is not None else {}
        if part in renamed:
            _renamed(cls, {part: None}, source, ".".join(out), warn=True)
            part = renamed[part]
        out.append(part)
        cls = _section_of(typing.get_type_hints(cls).get(part)) if cls is not None else None
    return out


def from_dict(cls: type, data: dict, source: str = "<dict>", prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix or 'top level'}' must be a mapping")
    data = _renamed(cls, data, source, prefix)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        dotted = ", ".join(f"'{prefix + '.' if prefix else ''}{k}'" for k in unknown)
        raise ConfigError(f"{source}: unknown key {dotted} (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, field in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = _check_value(hints[name], data[name], key, source)
        elif field.default is _MISSING and field.default_factory is _MISSING:
            raise ConfigError(f"{source}: required key '{key}' is missing")
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if callable(check):
        try:
            check()
        except ValueError as exc:
            raise ConfigError(f"{source}: {prefix + ': ' if prefix else ''}{exc}") from None
    return obj


def to_dict(obj: Any) -> Any:
    """Dataclass → plain dict (YAML/JSON serialisable)."""
    return dataclasses.asdict(obj)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'train.lr=1e-3'`` → (['train', 'lr'], 0.001). The value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({exc})") from None
    return parts, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` overrides to a raw (not yet typed) config dict."""
    for text in overrides or []:
        parts, value = parse_override(text)
        parts = _current_path(parts, f"--set {text}")
        node = raw
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: '{p}' is not a section")
            node = child
        node[parts[-1]] = value
    return raw


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data

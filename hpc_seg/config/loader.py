"""Typed config loading: YAML → nested dataclasses, with strict key and type checking.

Rules:
- unknown keys are errors (naming the dotted key and the file);
- values are checked against the dataclass field types (``int``, ``float``, ``str``, ``bool``,
  ``Optional[...]``, ``list[...]``, ``dict[str, ...]``, ``Literal[...]``, nested dataclasses);
  an ``int`` is accepted where a ``float`` is expected, nothing else is coerced;
- overrides use one syntax, ``section.key=value``, the value parsed as YAML (``train.lr=1e-3``,
  ``data.size=[128,128]``, ``model.overrides={depth: 12}``).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from hpc_seg.errors import ConfigError

_MISSING = dataclasses.MISSING
_SCI_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_value(tp: Any, value: Any, key: str, source: str) -> Any:
    """Return ``value`` converted to ``tp`` or raise ConfigError naming ``key`` and ``source``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Union or (types.UnionType is not None and isinstance(tp, types.UnionType)):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(arg, value, key, source)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{source}: key '{key}' has value {value!r}, expected {_type_name(tp)}")
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
    if tp is float:
        if isinstance(value, str) and _SCI_FLOAT.match(value.strip()):
            return float(value)  # PyYAML (YAML 1.1) reads 1e-4 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: key '{key}' has value {value!r}, expected float")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: key '{key}' has value {value!r}, expected int")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: key '{key}' has value {value!r}, expected bool (true/false)")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: key '{key}' has value {value!r}, expected string")
        return value
    raise ConfigError(f"{source}: key '{key}': unsupported config type {_type_name(tp)}")


def from_dict(cls: type, data: dict, source: str = "<dict>", prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix or 'top level'}' must be a mapping")
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
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
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

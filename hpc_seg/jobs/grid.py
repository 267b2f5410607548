"""Grid files: a base config plus axes, expanded to one run per point (a SLURM job array);
:class:`GridPoint` is one run of a submission (a grid point, or the single config of a non-grid one).

::

    grid:
      name: unet_aspp_grid              # runs/<name>/<point>
      base: unet_aspp.yaml              # resolved like --config
      axes:                             # keys use the --set syntax; values are lists
        model.overrides.aspp_rate: [2, 4]
        train.lr: [1.0e-3, 3.0e-4]
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from hpc_seg.config import Config, load_raw, resolve_config_path
from hpc_seg.config.loader import read_yaml
from hpc_seg.errors import ConfigError


@dataclass
class GridPoint:
    """One run of a submission: its point name (the config's name when not a grid), config, run directory."""

    name: str
    cfg: Config
    run_dir: Path


def is_grid(path: str | Path) -> bool:
    return "grid" in read_yaml(resolve_config_path(path))


def load_grid(path: str | Path) -> tuple[str, Path, dict[str, list]]:
    p = resolve_config_path(path)
    raw = read_yaml(p)
    grid = raw.get("grid")
    if not isinstance(grid, dict) or set(raw) != {"grid"}:
        raise ConfigError(f"{p}: a grid file has exactly one top-level key 'grid'")
    unknown = set(grid) - {"name", "base", "axes"}
    if unknown:
        raise ConfigError(f"{p}: unknown key(s) {sorted('grid.' + k for k in unknown)} (known: name, base, axes)")
    if not isinstance(grid.get("base"), str):
        raise ConfigError(f"{p}: key 'grid.base' must name a config file")
    axes = grid.get("axes")
    if not isinstance(axes, dict) or not axes:
        raise ConfigError(f"{p}: key 'grid.axes' must map config keys to lists of values")
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{p}: grid axis '{key}' must be a non-empty list")
    base = resolve_config_path(grid["base"], p.parent)
    load_raw(base)  # the base must load
    return str(grid.get("name") or p.stem), base, axes


def _short(key: str, value) -> str:
    text = f"{key.split('.')[-1]}={value}"
    return re.sub(r"[^A-Za-z0-9_.=+-]", "", text)


def point_overrides(grid: str, point: str) -> list[str]:
    """The ``--set`` overrides that make a config a point of ``grid``: its name (``GRID-POINT``),
    and for MLflow the grid as the default experiment and the point as the run name (quoted: a
    name YAML would read as a number stays a string)."""
    return [f"name={grid}-{point}", f"tracking.grid={json.dumps(grid)}", f"tracking.run_name={json.dumps(point)}"]


def expand_grid(axes: dict[str, list]) -> list[tuple[str, list[str]]]:
    """Cartesian product → [(point name, ['key=value', …])] in a stable order."""
    keys = list(axes)
    points = []
    for combo in itertools.product(*(axes[k] for k in keys)):
        overrides = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                     for k, v in zip(keys, combo)]
        name = "-".join(_short(k, v) for k, v in zip(keys, combo))
        points.append((name, overrides))
    return points

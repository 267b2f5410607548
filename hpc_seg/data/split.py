"""Train/validation/test split **by case** (never by slice), seeded and saved to a file.

Cases are stratified by whether they contain the target class (tumour / polyp), so that
validation never ends up without tumours by chance. ``check_split`` fails loudly when a case
is in two splits or is missing from the store — the paper's code validated on 22 training
volumes; this makes that impossible to do silently.

Command::

    hpc-seg split /scratch/lits.zarr --val 0.2 --test 0.2 --seed 0   # → STORE/split-seed0.json
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from hpc_seg.data.index import read_index
from hpc_seg.errors import SplitError
from hpc_seg.utils.atomic import atomic_write_json

SPLITS = ("train", "val", "test")


def default_split_path(store: str | Path, seed: int) -> Path:
    return Path(store) / f"split-seed{seed}.json"


def make_split(case_stats: dict[str, dict], val_fraction: float, test_fraction: float, seed: int,
               stratify_class: int | None = -1) -> dict[str, list[str]]:
    """Seeded case-level split; ``stratify_class=-1`` means the last (rarest) class."""
    ids = sorted(case_stats)
    if len(ids) < 3 and (val_fraction > 0 and test_fraction > 0):
        raise SplitError(f"need at least 3 cases for train/val/test, have {len(ids)}")
    rng = np.random.default_rng(seed)
    groups: dict[bool, list[str]] = {True: [], False: []}
    for cid in ids:
        counts = case_stats[cid]["stats"]["label_counts"]
        has = counts[stratify_class] > 0 if stratify_class is not None and len(counts) > 1 else True
        groups[bool(has)].append(cid)
    split = {k: [] for k in SPLITS}
    for members in groups.values():
        members = [members[i] for i in rng.permutation(len(members))]
        n = len(members)
        n_test = int(round(n * test_fraction))
        n_val = int(round(n * val_fraction))
        split["test"] += members[:n_test]
        split["val"] += members[n_test:n_test + n_val]
        split["train"] += members[n_test + n_val:]
    _ensure_nonempty(split, val_fraction, test_fraction, rng)
    return {k: sorted(v) for k, v in split.items()}


def _ensure_nonempty(split, val_fraction, test_fraction, rng) -> None:
    """Small data sets: move single cases from train so that requested splits are non-empty."""
    for name, frac in (("val", val_fraction), ("test", test_fraction)):
        if frac > 0 and not split[name] and len(split["train"]) > 1:
            split[name].append(split["train"].pop(int(rng.integers(len(split["train"])))))
    if not split["train"]:
        raise SplitError("split leaves no training case; lower val/test fractions")


def check_split(split: dict, known_cases: set[str] | None = None, source: str = "<split>") -> None:
    """Raise SplitError if a case is in two splits, a split key is unknown or a case is unknown."""
    unknown_keys = set(split) - set(SPLITS) - {"meta"}
    if unknown_keys:
        raise SplitError(f"{source}: unknown split name(s) {sorted(unknown_keys)}")
    seen: dict[str, str] = {}
    for name in SPLITS:
        for cid in split.get(name, []):
            if cid in seen:
                raise SplitError(f"{source}: case '{cid}' is in both '{seen[cid]}' and '{name}' "
                                 "(data leakage between splits)")
            seen[cid] = name
    if known_cases is not None:
        missing = sorted(set(seen) - known_cases)
        if missing:
            raise SplitError(f"{source}: case(s) {missing[:5]} are not in the store")


def write_split(store: str | Path, path: str | Path | None, val_fraction: float, test_fraction: float,
                seed: int) -> Path:
    index = read_index(store)
    split = make_split(index["cases"], val_fraction, test_fraction, seed)
    check_split(split, set(index["cases"]))
    path = Path(path) if path else default_split_path(store, seed)
    split["meta"] = {"seed": seed, "val_fraction": val_fraction, "test_fraction": test_fraction,
                     "store": str(Path(store).resolve()), "num_cases": len(index["cases"])}
    return atomic_write_json(path, split)


def load_split(path: str | Path, known_cases: set[str] | None = None) -> dict[str, list[str]]:
    path = Path(path)
    try:
        split = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SplitError(f"{path}: cannot read split file ({exc})") from None
    if not isinstance(split, dict):
        raise SplitError(f"{path}: split file must be a JSON object")
    check_split(split, known_cases, source=str(path))
    return {k: list(split.get(k, [])) for k in SPLITS}


def ensure_split(store: str | Path, path: str | Path | None, val_fraction: float,
                 test_fraction: float, seed: int) -> dict[str, list[str]]:
    """Load the split file, creating it first when absent (checked either way)."""
    path = Path(path) if path else default_split_path(store, seed)
    if not path.exists():
        write_split(store, path, val_fraction, test_fraction, seed)
    return load_split(path, set(read_index(store)["cases"]))

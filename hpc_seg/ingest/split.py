"""Train/validation/test split **by case** (never by slice), seeded and saved to a file.

Cases are stratified by whether they contain the target class (tumour / polyp), so that
validation never ends up without tumours by chance. ``check_split`` fails loudly when a case
is in two splits or is missing from the store — the paper's code validated on 22 training
volumes; this makes that impossible to do silently.

Commands (each also computes the split's preprocessing plan, see preprocessing/plan.py)::

    hpc-seg split /scratch/lits.zarr --val 0.2 --test 0.2 --seed 0   # → STORE/meta/splits/seed0
    hpc-seg split /scratch/lits.zarr --from folds/fold1.json --seed 101   # a split of your own, checked
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from hpc_seg.ingest.catalog import SPLITS, Store, check_split, split_key
from hpc_seg.errors import SplitError
from hpc_seg.storage.store import has_meta, write_meta

__all__ = ["SPLITS", "check_split", "has_split", "make_split", "read_split", "read_split_file", "split_key",
           "write_split"]


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


def write_split(store, val_fraction: float, test_fraction: float, seed: int,
                from_file: str | Path | None = None) -> dict:
    """Make (or import from a JSON file) the split of ``seed``, check it, keep it in the store's
    metadata and compute its preprocessing plan from the training cases. Returns the split.
    ``store``: a path or an open :class:`~hpc_seg.ingest.catalog.Store`."""
    from hpc_seg.preprocessing.plan import plan_from_split, write_plan

    store = Store.of(store)
    index = store.index
    if from_file is not None:
        split = read_split_file(from_file, set(index["cases"]))
    else:
        split = make_split(index["cases"], val_fraction, test_fraction, seed)
    check_split(split, set(index["cases"]))
    if not split["train"]:
        raise SplitError(f"{from_file or store}: split has no training case")
    meta = {"seed": seed, "val_fraction": val_fraction, "test_fraction": test_fraction,
            "num_cases": len(index["cases"]), "from_file": str(from_file) if from_file else None}
    write_meta(store.path, split_key(seed), {**{k: split[k] for k in SPLITS}, "meta": meta})
    write_plan(store.path, plan_from_split(store.info, index, split, seed))
    return {k: list(split[k]) for k in SPLITS}


def read_split_file(path: str | Path, known_cases: set[str] | None = None) -> dict[str, list[str]]:
    """A user's split JSON ({train: [...], val: [...], test: [...]}), checked."""
    path = Path(path)
    try:
        split = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SplitError(f"{path}: cannot read split file ({exc})") from None
    if not isinstance(split, dict):
        raise SplitError(f"{path}: split file must be a JSON object")
    check_split(split, known_cases, source=str(path))
    return {k: list(split.get(k, [])) for k in SPLITS}


def read_split(store, seed: int) -> dict[str, list[str]]:
    """The split of ``seed`` kept in the store (checked against the store's cases); ``store``: a path
    or an open :class:`~hpc_seg.ingest.catalog.Store`."""
    return Store.of(store).split(seed)


def has_split(store, seed: int) -> bool:
    """Whether the store holds the split of ``seed``, without opening it (a path or a Store)."""
    return has_meta(store, split_key(seed))

"""Per-case statistics, computed at conversion time and gathered into the store's index
(attributes of ``STORE/meta/index``).

The index drives the preprocessing plan (foreground mean/std of the training cases), case
splitting (tumour/no-tumour stratification) and foreground oversampling (slices containing each
class, kept as ``[start, stop)`` runs so that the index stays small at 10,000 cases). The index
also names the store's kind and classes; ``hpc_seg.ingest.catalog.Store.index`` reads it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hpc_seg.ingest.catalog import Store
from hpc_seg.storage.store import kind_record, write_meta

PERCENTILES = (0.5, 1, 5, 25, 50, 75, 95, 99, 99.5)


def _summary(vals: np.ndarray) -> tuple[list[float], float, float]:
    """Percentiles (as ``np.percentile``, linear), mean and std of one channel.

    Integer data (CT HU, RGB) goes through one histogram: O(n), no sort, no float copy.
    """
    if vals.size == 0:
        return [0.0] * len(PERCENTILES), 0.0, 0.0
    if vals.dtype.kind not in "iu":
        return [float(v) for v in np.percentile(vals, PERCENTILES)], float(vals.mean()), float(vals.std())
    lo = int(vals.min())
    hist = np.bincount((vals.ravel().astype(np.int32) - lo))
    values = np.arange(lo, lo + len(hist), dtype=np.float64)
    n = vals.size
    mean = float((hist * values).sum() / n)
    std = float(np.sqrt(max((hist * (values - mean) ** 2).sum() / n, 0.0)))
    cum = np.cumsum(hist)
    pct = []
    for q in PERCENTILES:
        r = q / 100.0 * (n - 1)
        below, above = int(np.floor(r)), int(np.ceil(r))
        v0 = int(np.searchsorted(cum, below, side="right")) + lo  # value of sorted entry #below
        v1 = int(np.searchsorted(cum, above, side="right")) + lo
        pct.append(float(v0 + (v1 - v0) * (r - below)))
    return pct, mean, std


def to_runs(idx: np.ndarray) -> list[list[int]]:
    """Sorted indices → ``[[start, stop), …]`` runs (``[3, 4, 5, 9]`` → ``[[3, 6], [9, 10]]``)."""
    idx = np.asarray(idx, dtype=np.int64)
    if idx.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) != 1)
    starts = np.concatenate([idx[:1], idx[breaks + 1]])
    stops = np.concatenate([idx[breaks], idx[-1:]]) + 1
    return [[int(a), int(b)] for a, b in zip(starts, stops)]


def from_runs(runs: list[list[int]]) -> np.ndarray:
    """Inverse of :func:`to_runs`."""
    if not runs:
        return np.zeros(0, np.int64)
    return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in runs])


def case_stats(image: np.ndarray, label: np.ndarray, num_classes: int,
               spacing: tuple[float, float, float]) -> dict:
    """Statistics of one (C, Z, Y, X) image and its (Z, Y, X) label."""
    counts = np.array([np.count_nonzero(label == c) for c in range(num_classes)])
    present = {c: to_runs(np.flatnonzero((label == c).any(axis=(1, 2)))) for c in range(1, num_classes)}
    summaries = [_summary(ch) for ch in image]
    stats = {
        "shape": list(label.shape),
        "spacing": [float(s) for s in spacing],
        "label_counts": [int(c) for c in counts],
        "slices_with_class": {str(c): z for c, z in present.items()},
        "intensity_percentiles": {str(q): [s[0][i] for s in summaries] for i, q in enumerate(PERCENTILES)},
        "mean": [s[1] for s in summaries],
        "std": [s[2] for s in summaries],
    }
    fg = label > 0
    if counts[1:].sum() > 0:
        fg_summaries = [_summary(ch[fg]) for ch in image]
        stats["foreground_mean"] = [s[1] for s in fg_summaries]
        stats["foreground_std"] = [s[2] for s in fg_summaries]
        stats["foreground_percentiles"] = {str(q): [s[0][i] for s in fg_summaries] for i, q in enumerate(PERCENTILES)}
    return stats


def write_index(store_path: str | Path, kind: str, classes: list[str], cases: dict[str, dict]) -> str:
    """Write the index (atomically) with the stats of every complete case."""
    totals = np.zeros(len(classes), dtype=np.int64)
    for s in cases.values():
        totals += np.asarray(s["stats"]["label_counts"], dtype=np.int64)
    index = {
        **kind_record(kind),
        "classes": classes,
        "num_cases": len(cases),
        "label_counts": [int(t) for t in totals],
        "cases": dict(sorted(cases.items())),
    }
    return write_meta(store_path, "index", index)


def read_index(store) -> dict:
    """The index of a store path or an open :class:`~hpc_seg.ingest.catalog.Store` (its cached copy)."""
    return Store.of(store).index

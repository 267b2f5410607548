"""Per-case statistics, computed at conversion time and gathered into ``STORE/index.json``.

The index drives normalisation (HU percentiles, foreground mean/std), case splitting
(tumour/no-tumour stratification) and foreground oversampling (slices containing each class).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hpc_seg.utils.atomic import atomic_write_json

PERCENTILES = (0.5, 1, 5, 25, 50, 75, 95, 99, 99.5)


def case_stats(image: np.ndarray, label: np.ndarray, num_classes: int,
               spacing: tuple[float, float, float]) -> dict:
    """Statistics of one (C, Z, Y, X) image and its (Z, Y, X) label."""
    counts = np.bincount(label.ravel(), minlength=num_classes)[:num_classes]
    per_slice = np.stack([(label == c).any(axis=(1, 2)) for c in range(num_classes)])
    vals = image.reshape(image.shape[0], -1)
    fg = label.reshape(-1) > 0
    stats = {
        "shape": list(label.shape),
        "spacing": [float(s) for s in spacing],
        "label_counts": [int(c) for c in counts],
        "slices_with_class": {str(c): np.flatnonzero(per_slice[c]).tolist()
                              for c in range(1, num_classes)},
        "intensity_percentiles": {
            str(p): [float(v) for v in np.percentile(vals, p, axis=1)] for p in PERCENTILES},
        "mean": [float(v) for v in vals.mean(axis=1)],
        "std": [float(v) for v in vals.std(axis=1)],
    }
    if fg.any():
        fg_vals = vals[:, fg]
        stats["foreground_mean"] = [float(v) for v in fg_vals.mean(axis=1)]
        stats["foreground_std"] = [float(v) for v in fg_vals.std(axis=1)]
    return stats


def write_index(store_path: str | Path, dataset: str, classes: list[str], cases: dict[str, dict]) -> Path:
    """Write ``index.json`` (atomically) with the stats of every complete case."""
    totals = np.zeros(len(classes), dtype=np.int64)
    for s in cases.values():
        totals += np.asarray(s["stats"]["label_counts"], dtype=np.int64)
    index = {
        "dataset": dataset,
        "classes": classes,
        "num_cases": len(cases),
        "label_counts": [int(t) for t in totals],
        "cases": dict(sorted(cases.items())),
    }
    return atomic_write_json(Path(store_path) / "index.json", index, indent=1)


def read_index(store_path: str | Path) -> dict:
    import json

    from hpc_seg.errors import StoreError

    path = Path(store_path) / "index.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StoreError(f"{path}: cannot read case index ({exc}); rerun 'hpc-seg convert'") from None

"""Scoring label volumes against a store's references: the figures of ``metrics.json``.

``hpc-seg evaluate`` scores its own predictions through ``add_case``; ``score_labels`` scores
labels made by anything else (another toolkit's predictions read back onto the store's grid,
``bench/peers.py``) with the same code, so two systems' figures differ only by their labels.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from hpc_seg.errors import HpcSegError
from hpc_seg.evaluation.case_metrics import case_metrics
from hpc_seg.metrics import SegmentationMetrics
from hpc_seg.metrics.lesions import case_lesions, sum_lesions
from hpc_seg.metrics.volumes import volume_errors
from hpc_seg.preprocessing.labels import case_label_map, merged_note, store_label_lut


def lesion_figures(labels: np.ndarray, label: np.ndarray, spacing, names: list[str], annotated: set[int]) -> dict:
    """Lesion detection and volumes of a liver-tumour case that marks its tumours (a case that marks
    liver only cannot say which predicted tumour is false: it gets none)."""
    if "tumour" not in names or "liver" not in names or names.index("tumour") not in annotated:
        return {}
    t = names.index("tumour")
    return {"lesions": case_lesions(labels == t, label == t, spacing),
            "volumes_ml": volume_errors(labels, label, spacing, names)}


def add_case(metrics: SegmentationMetrics, cid: str, labels: np.ndarray, label: np.ndarray, lmap: list[int],
             spacing, names: list[str], pr_counts: torch.Tensor | None = None) -> dict:
    """Count one case's predicted ``labels`` against its reference ``label`` (both in the model's
    class indices, one grid) into ``metrics``; returns its per-case LiTS and lesion figures."""
    metrics.add_labels(torch.from_numpy(labels)[None], torch.from_numpy(label)[None], case_ids=[cid],
                       label_maps=torch.tensor([lmap]), pr_counts=pr_counts)
    figures = {"per_class": case_metrics(np.asarray(lmap, np.uint8)[labels], label, spacing, names,
                                         annotated=set(lmap))}
    figures.update(lesion_figures(labels, label, spacing, names, set(lmap)))
    return figures


def score_labels(store, plan, cases: list[str], labels_of: Callable[[str], np.ndarray]) -> dict:
    """``metrics.json``'s figures (``per_class``, ``mean_iou``, ``per_case``, ``lesions``, …, no PR
    curve) of ``labels_of(case)`` — a uint8 (Z, Y, X) volume in ``plan.classes``' indices on the
    case's store grid — against the store's references, read after each prediction."""
    names = list(plan.classes)
    info, index = store.info, store.index
    lut = store_label_lut(plan, info, store).astype(np.uint8)
    metrics = SegmentationMetrics(len(names), names, pr_class=None)
    extra = {}
    for cid in cases:
        labels = np.array(labels_of(cid), dtype=np.uint8, order="C")  # a writable copy (torch.from_numpy)
        g = store.root["cases"][cid]
        label = lut[g["label"][...]]
        if labels.shape != label.shape:
            raise HpcSegError(f"{store.path}: case {cid}: prediction {labels.shape} is not on the store's grid "
                              f"{label.shape}")
        if labels.size and int(labels.max()) >= len(names):
            raise HpcSegError(f"case {cid}: label {int(labels.max())} is not a class of {names}")
        lmap = case_label_map(plan, index, cid, info["classes"])
        extra[cid] = add_case(metrics, cid, labels, label, lmap, index["cases"][cid]["stats"]["spacing"], names)
    res = summarise(metrics, extra, cases)
    res.update({"store": store.path, "cases": len(cases), "note": merged_note(plan, info["classes"])})
    return res


def summarise(metrics: SegmentationMetrics, extra: dict[str, dict], cases: list[str]) -> dict:
    """The pooled figures with each case's own (``extra``: ``add_case``'s) and the pooled lesions."""
    res = metrics.compute()
    for row in res["per_case"]:
        row.update(extra[row["case"]])
    scored = [extra[c]["lesions"] for c in cases if "lesions" in extra[c]]
    if scored:
        res["lesions"] = sum_lesions(scored)
    return res

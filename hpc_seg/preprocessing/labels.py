"""Partially labelled data: which classes a case annotates, and how a model's classes count on it.

A store may hold cases from several sources (``hpc-seg convert KIND SRC STORE`` into an existing
store of the same task: a CHAOS or TotalSegmentator CT marks the liver but no tumour). Each case
records the classes its source annotates (index entry ``annotated``; absent = all the store's
classes). A dataset kind also says which class lies inside which (``merge``: LiTS ``tumour`` →
``liver``): on a case that does not annotate a class, that class counts as the class it lies in.

:func:`label_map` turns that into one integer per model class — the class it counts as on the
case — which the loss (probabilities of merged classes summed: a liver-only case teaches
liver-vs-background, not "no tumour"), validation and ``evaluate`` (predictions merged the same
way; figures of classes a case does not annotate are left out, never scored as absent) share.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from hpc_seg.errors import PlanError


def label_map(classes: list[str], merge: dict, annotated: list[str] | None) -> list[int]:
    """For each class: the index of the class it counts as on a case annotating ``annotated``
    (None: all). Unannotated classes follow ``merge`` to an annotated class, else background."""
    classes = list(classes)
    if annotated is None:
        return list(range(len(classes)))
    have = set(annotated) | {classes[0]}
    out = []
    for name in classes:
        seen = set()
        while name not in have and name in merge and name not in seen:
            seen.add(name)
            name = merge[name]
        out.append(classes.index(name) if name in have else 0)
    return out


def annotated_of(index: dict, case_id: str) -> list[str] | None:
    """The classes a case annotates (None: every class of its store)."""
    return index["cases"][case_id].get("annotated")


def case_label_map(plan, index: dict, case_id: str, store_classes: list[str] | None = None) -> list[int]:
    """The label map of one store case for a model's plan (store classes: the case's default)."""
    annotated = annotated_of(index, case_id)
    if annotated is None and store_classes is not None and list(store_classes) != list(plan.classes):
        annotated = list(store_classes)
    return label_map(list(plan.classes), plan.merge, annotated)


def store_label_lut(plan, info: dict, store) -> np.ndarray:
    """Store label value → the model's class index, for a store of the same task.

    Classes are matched by name. A store may have fewer classes than the model if the model's
    plan merges the missing ones into classes the store has (a LiTS model scored on CHAOS:
    tumour counts as liver); channels and modality must match. Anything else is refused, naming
    both sides."""
    mine, theirs = list(plan.classes), list(info.get("classes", []))
    problem = None
    if (plan.channels, plan.modality) != (info.get("channels"), info.get("modality")):
        problem = "channels or modality differ"
    elif not set(theirs) <= set(mine) or not theirs or theirs[0] != mine[0]:
        problem = f"store classes {sorted(set(theirs) - set(mine)) or theirs[:1]} are not the model's"
    else:
        lost = [mine[i] for i, j in enumerate(label_map(mine, plan.merge, theirs))
                if mine[i] not in theirs and j == 0]
        if lost:
            problem = f"model classes {lost} have no counterpart in the store and lie in no class it marks"
    if problem:
        raise PlanError(f"{store}: store holds {info.get('kind')} data with classes {theirs}, "
                        f"{info.get('channels')} channel(s), {info.get('modality')}; the model's plan expects "
                        f"{plan.kind} with classes {mine}, {plan.channels} channel(s), {plan.modality} "
                        f"({problem})")
    return np.array([mine.index(n) for n in theirs], dtype=np.int64)


def merged_note(plan, store_classes: list[str]) -> str | None:
    """What a reader of the metrics must know when the store marks fewer classes than the model."""
    missing = [c for c in plan.classes if c not in store_classes]
    if not missing:
        return None
    m = label_map(list(plan.classes), plan.merge, list(store_classes))
    parts = [f"{c} counted as {plan.classes[m[plan.classes.index(c)]]}" for c in missing]
    return f"the store does not mark {', '.join(missing)}: " + "; ".join(parts)


def merge_probabilities(probs: torch.Tensor, label_map: torch.Tensor) -> torch.Tensor:
    """(N, C, *S) probabilities → the same with each class's probability added to the class it
    counts as on that sample's case (``label_map`` (N, C), ``hpc_seg.preprocessing.labels``): on a
    liver-only case P(liver) becomes P(liver) + P(tumour), and P(tumour) 0."""
    n, c = probs.shape[:2]
    onehot = F.one_hot(label_map.long(), c).to(probs.dtype)  # (N, from, to)
    return torch.einsum("nf...,nft->nt...", probs, onehot)

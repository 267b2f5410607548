"""Validation on whole cases inside training: every slice of every validation case, metrics
accumulated per case and all-reduced. Cases are dealt to ranks round-robin; ranks with fewer
batches run padding batches (results discarded) so that ZeRO-3's collective parameter gathers
stay in step."""

from __future__ import annotations

import math

import torch

from hpc_seg.training.dataset import ZarrCaseDataset, make_dataset
from hpc_seg.preprocessing.plan import probabilities
from hpc_seg.distributed.collectives import all_max
from hpc_seg.metrics import SegmentationMetrics


def case_batches(ds: ZarrCaseDataset, batch_size: int):
    """Yield (images, labels, case ids, label maps) over all slices of the dataset's cases, in order."""
    for start in range(0, len(ds), batch_size):
        items = [ds[(i, 0)] for i in range(start, min(start + batch_size, len(ds)))]
        yield (torch.stack([it["image"] for it in items]), torch.stack([it["label"] for it in items]),
               [ds.case_ids[it["case"]] for it in items], torch.stack([it["label_map"] for it in items]))


@torch.no_grad()
def validate(forward, store, data_cfg, plan, case_ids: list[str], rank: int, world: int, batch_size: int) -> dict:
    """``forward(images) -> logits``; returns ``SegmentationMetrics.compute()`` over all ranks.
    Inputs and probabilities follow the run's preprocessing plan, as ``evaluate`` does. ``store``:
    the run's open store (``hpc_seg.ingest.catalog.Store``) or its path."""
    mine = case_ids[rank::world]
    metrics = SegmentationMetrics(plan.num_classes, list(plan.classes))
    ds = make_dataset(store, mine, data_cfg, train=False, plan=plan) if mine else None
    total = int(all_max(math.ceil(len(ds) / batch_size) if ds else 0))
    done = 0
    for images, labels, cases, maps in case_batches(ds, batch_size) if ds else ():
        metrics.add_probs(probabilities(plan, forward(images)), labels, case_ids=cases, label_maps=maps)
        done += 1
    pad = torch.zeros(1, plan.in_channels, *plan.size)
    while done < total:  # keep collectives in step (ZeRO-3 gathers parameters on every forward)
        forward(pad)
        done += 1
    metrics.all_reduce()
    return metrics.compute()

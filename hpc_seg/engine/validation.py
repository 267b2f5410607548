"""Validation on whole cases inside training: every slice of every validation case, metrics
accumulated per case and all-reduced. Cases are dealt to ranks round-robin; ranks with fewer
batches run padding batches (results discarded) so that ZeRO-3's collective parameter gathers
stay in step."""

from __future__ import annotations

import math

import torch

from hpc_seg.data.dataset import ZarrSliceDataset
from hpc_seg.engine.distributed import all_max
from hpc_seg.metrics import SegmentationMetrics


def case_batches(cfg, case_ids: list[str], batch_size: int):
    """Yield (images, labels, case ids) over all slices of ``case_ids`` in order."""
    if not case_ids:
        return
    ds = ZarrSliceDataset(cfg.store, case_ids, cfg, train=False)
    for start in range(0, len(ds), batch_size):
        items = [ds[(i, 0)] for i in range(start, min(start + batch_size, len(ds)))]
        yield (torch.stack([it["image"] for it in items]), torch.stack([it["label"] for it in items]),
               [case_ids[it["case"]] for it in items])


@torch.no_grad()
def validate(forward, data_cfg, case_ids: list[str], rank: int, world: int, batch_size: int,
             class_names: list[str]) -> dict:
    """``forward(images) -> logits``; returns ``SegmentationMetrics.compute()`` over all ranks."""
    mine = case_ids[rank::world]
    metrics = SegmentationMetrics(len(class_names), class_names)
    ds_len = sum(ZarrSliceDataset(data_cfg.store, [c], data_cfg, train=False).__len__() for c in mine)
    n_batches = math.ceil(ds_len / batch_size)
    total = int(all_max(n_batches))
    done = 0
    for images, labels, cases in case_batches(data_cfg, mine, batch_size):
        metrics.update(forward(images), labels, case_ids=cases)
        done += 1
    pad = None
    while done < total:  # keep collectives in step (ZeRO-3 gathers parameters on every forward)
        if pad is None:
            c = data_cfg.in_channels
            pad = torch.zeros(1, c, *data_cfg.size)
        forward(pad)
        done += 1
    metrics.all_reduce()
    return metrics.compute()

"""Consolidate a sharded DeepSpeed checkpoint (ZeRO 0–3, any world size) into one fp32 state dict,
with DeepSpeed's own ``zero_to_fp32`` machinery. Needs no process group and no GPU."""

from __future__ import annotations

from pathlib import Path

import torch

from hpc_seg.distributed.env import select_accelerator
from hpc_seg.distributed.checkpoint import CheckpointManager


def strip_wrappers(state: dict) -> dict:
    """Drop the ``.module`` level added by activation-checkpointing wrappers."""
    return {k.replace(".module.", "."): v for k, v in state.items()}


def consolidated_state_dict(root: str | Path, tag: str) -> dict[str, torch.Tensor]:
    select_accelerator()  # unpickling DeepSpeed's model states may import deepspeed
    root = Path(root)
    stage = int(CheckpointManager.manifest(root, tag).get("zero_stage", 0))
    if stage == 0:
        sd = torch.load(root / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    return strip_wrappers({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})

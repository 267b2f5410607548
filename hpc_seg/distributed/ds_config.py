"""Our typed config → the DeepSpeed JSON (one source of truth).

Optimizer and scheduler are built by us (``training/optim.py``) and passed to
``deepspeed.initialize``, so the JSON carries batch sizes, precision, ZeRO and clipping only.
"""

from __future__ import annotations

import copy

from hpc_seg.config.schema import Config


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """The DeepSpeed configuration dict for ``cfg`` at ``world_size`` data-parallel ranks."""
    ds, tr = cfg.deepspeed, cfg.train
    micro = cfg.data.batch_size
    zero: dict = {"stage": ds.zero_stage}
    if ds.zero_stage > 0:
        zero.update(reduce_bucket_size=ds.reduce_bucket_size, contiguous_gradients=True)
        if ds.overlap_comm is not None:  # else DeepSpeed's own per-stage default
            zero["overlap_comm"] = ds.overlap_comm
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    out = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": tr.grad_accum,
        "train_batch_size": micro * tr.grad_accum * world_size,
        "gradient_clipping": tr.grad_clip,
        "zero_optimization": zero,
        "steps_per_print": 10 ** 9,  # we log ourselves
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if ds.precision == "fp16":
        out["fp16"] = {"enabled": True, "loss_scale": ds.loss_scale, "initial_scale_power": ds.initial_scale_power,
                       "loss_scale_window": ds.loss_scale_window, "hysteresis": ds.hysteresis,
                       "min_loss_scale": ds.min_loss_scale}
    elif ds.precision == "bf16":
        out["bf16"] = {"enabled": True}
    return _merge(out, ds.extra)

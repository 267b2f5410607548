"""Is the current config compatible with the checkpoint's? Checked before DeepSpeed loads anything.

* **Refused** — keys that change tensor shapes or the optimizer state: the model (name, size,
  overrides), the input/output channels (``data.mode``, ``data.slices``, ``loss.kind``), the
  optimizer, the precision, ZeRO-Offload, and the ZeRO stage (no universal conversion between
  stages here).
* **Accepted with a warning** — keys that change the run's course: the learning-rate schedule's
  shape and end (``train.max_steps``, ``lr``, ``schedule``, ``warmup_steps``, …), the data it sees
  (``data.store``, ``split_seed``, ``size``, ``batch_size``, …).
* Everything else (logging, validation and checkpoint cadence, SLURM request) is accepted and logged.
"""

from __future__ import annotations

REFUSED = ("model.", "data.mode", "data.slices", "data.patch_depth", "loss.kind", "train.optimizer",
           "deepspeed.precision", "deepspeed.zero_stage", "deepspeed.offload_optimizer", "deepspeed.offload_param")
WARNED = {
    "train.max_steps": "moves the end of the learning-rate schedule",
    "train.max_minutes": "moves the end of the learning-rate schedule and of training",
    "train.lr": "changes the learning rate from here on",
    "train.schedule": "changes the learning-rate schedule",
    "train.warmup_steps": "changes the learning-rate schedule",
    "train.poly_power": "changes the learning-rate schedule",
    "train.min_lr_ratio": "changes the learning-rate schedule",
    "train.grad_accum": "changes the global batch",
    "data.batch_size": "changes the global batch and the sampler position",
    "data.store": "trains on other data",
    "data.split_seed": "trains on another split (and its preprocessing plan)",
    "data.size": "changes the model input size",
    "data.window": "changes the input normalisation",
    "data.normalize": "changes the input normalisation",
    "train.seed": "changes the data order",
}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and not key.startswith("model.overrides") and key != "deepspeed.extra":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def compare(saved: dict, current: dict) -> tuple[list[str], list[str], list[str]]:
    """(refused, warned, other) lines ``key: saved → current`` (+ why, for warned)."""
    a, b = _flatten(saved), _flatten(current)
    refused, warned, other = [], [], []
    for key in sorted(set(a) | set(b)):
        if a.get(key) == b.get(key) or key == "name":
            continue
        line = f"{key}: {a.get(key)!r} → {b.get(key)!r}"
        if key.startswith(REFUSED):
            refused.append(line)
        elif key in WARNED:
            warned.append(f"{line} ({WARNED[key]})")
        else:
            other.append(line)
    return refused, warned, other

"""Resuming on a different number of ranks: DeepSpeed universal checkpoints.

ZeRO-1/2/3 shard optimizer state (and, for stage 3, parameters) by data-parallel rank, so a
checkpoint saved on N ranks cannot be loaded on M != N as is. ``to_universal`` runs DeepSpeed's
``ds_to_universal`` converter (per-parameter fp32 weights and optimizer moments), which the
trainer then loads with ``checkpoint.load_universal``. The result is written beside the
checkpoint (``checkpoints/universal/<tag>``) with a completion marker written last, so it is
made once and a crashed conversion is redone.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from hpc_seg.errors import HpcSegError
from hpc_seg.storage.atomic import atomic_write_json

MARKER = "hpc_seg_universal.json"


def to_universal(src: Path, dst: Path) -> Path:
    """Convert the DeepSpeed checkpoint directory ``src`` into a universal one at ``dst``."""
    if (dst / MARKER).is_file():
        return dst
    shutil.rmtree(dst, ignore_errors=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(src),
           "--output_folder", str(dst), "--inject_missing_state", "--num_extract_workers", "1",
           "--num_merge_workers", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise HpcSegError(f"{src}: conversion to a universal checkpoint failed:\n{r.stderr[-2000:]}")
    for extra in src.glob("rank_state_*.pt"):  # our per-rank state travels along (RNG is not reused)
        shutil.copy2(extra, dst / extra.name)
    manifest = json.loads((src / "manifest.json").read_text())
    atomic_write_json(dst / MARKER, {"source": str(src), "world_size": manifest["world_size"],
                                     "step": manifest["step"]})
    return dst

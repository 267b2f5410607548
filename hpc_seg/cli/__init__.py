"""``hpc-seg`` command line: one sub-command per user action.

::

    hpc-seg demo                                     # phantom → Zarr → split → loader pass → training
    hpc-seg phantom OUT_DIR --cases 6 --shape 128 128 32
    hpc-seg prepare lits   /data/LiTS17       /scratch/lits.zarr --workers 8 --val 0.2 --test 0.2 --seed 0
    hpc-seg convert lits   /data/LiTS17       /scratch/lits.zarr --workers 8   # conversion alone
    hpc-seg convert msd    /data/Task03_Liver /scratch/msd.zarr
    hpc-seg convert kvasir /data/Kvasir-SEG   /scratch/kvasir.zarr
    hpc-seg convert ircadb /data/3Dircadb1    /scratch/ircadb.zarr     # DICOM, folders or .zip
    hpc-seg convert chaos  /data/CHAOS/Train_Sets/CT /scratch/chaos.zarr
    hpc-seg split   /scratch/lits.zarr --val 0.2 --test 0.2 --seed 0    # split + its preprocessing plan
    hpc-seg inspect /scratch/lits.zarr [--preprocessing-plan 0]
    hpc-seg config  --config configs/demo.yaml --set data.size=[128,128]   # print resolved config
    hpc-seg train   --config configs/tiny_cpu.yaml --run-dir runs/demo --resume latest
    hpc-seg submit  --config transunet_12l.yaml [--dry-run|--local|--wait]
    hpc-seg status  runs/demo
    hpc-seg export  runs/demo --out model.safetensors
    hpc-seg evaluate runs/demo --data outputs/phantom/phantom.zarr --split test --out eval/demo [--save-predictions]
    hpc-seg predict model.safetensors ct.nii.gz --out pred.nii.gz
    hpc-seg compare eval/a eval/b --out report/
    hpc-seg plan    --config configs/transunet_12l.yaml --gpus 8 --gpu-mem 40GB

Errors in the input (bad files, bad config) print one line naming the file and exit with 2;
a conversion that had to skip bad cases exits with 1 after converting all good ones.

One module per command group, each with ``add_commands(subparsers)`` and its ``cmd_*`` functions:
``cli/data.py``, ``cli/training.py``, ``cli/jobs.py``, ``cli/evaluation.py``, ``cli/memory_plan.py``.
``--config``/``--set`` and the error wrapper are ``hpc_seg.config.cli_args`` (shared with
``python -m hpc_seg.train``).
"""

from __future__ import annotations

import argparse

from hpc_seg.cli import data, evaluation, jobs, memory_plan, training
from hpc_seg.config.cli_args import run_command

GROUPS = (data, training, jobs, evaluation, memory_plan)


def parser() -> argparse.ArgumentParser:
    """The ``hpc-seg`` parser: every group's sub-commands, each with ``func`` set to its ``cmd_*``."""
    p = argparse.ArgumentParser(prog="hpc-seg", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_commands(sub)
    return p


def command_names() -> list[str]:
    """The sub-commands, in ``hpc-seg --help`` order."""
    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    return list(sub.choices)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_command(f"hpc-seg {args.command}", args.func, args)

"""Training entry point (DeepSpeed).

Commands::

    # 1 process (CPU or one GPU)
    hpc-seg train --config configs/tiny_cpu.yaml --run-dir runs/demo --set train.max_steps=40
    # several processes / nodes (torchrun sets RANK/WORLD_SIZE/MASTER_ADDR)
    torchrun --nnodes 2 --nproc_per_node 4 -m hpc_seg.train --config configs/transunet_12l.yaml
    # CPU, 2 ranks
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 -m hpc_seg.train --config configs/tiny_cpu.yaml
    # the same without torchrun: N local processes (also `train.processes` in the config)
    hpc-seg train --config configs/kvasir_cpu.yaml --nproc 2
    # continue exactly where a run stopped
    hpc-seg train --config … --run-dir runs/x --resume latest
    # SLURM: srun starts one task per GPU; ranks come from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID
    srun python -m hpc_seg.train --config configs/transunet_12l.yaml --run-dir $RUN
    # show the generated DeepSpeed JSON
    hpc-seg train --config configs/transunet_12l.yaml --print-ds-config

``data.store`` missing (one process only): prepared first from ``data.source`` (``hpc-seg prepare``).

Exit status: 0 done, 2 bad config/input, 3 diverged (non-finite losses), 75 stopped by
SIGUSR1/SIGUSR2/SIGTERM after saving a checkpoint on all ranks (requeue and ``--resume latest``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hpc_seg.config.cli_args import add_config_args, run_command
from hpc_seg.errors import HpcSegError


def add_train_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``hpc-seg train`` and ``python -m hpc_seg.train`` (one declaration for both)."""
    add_config_args(p)
    p.add_argument("--run-dir", default=None, help="default: runs/<config name>")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint directory")
    p.add_argument("--print-ds-config", action="store_true", help="print the DeepSpeed JSON and exit")
    p.add_argument("--nproc", type=int, default=None, help="local processes (default: train.processes); "
                   "prepares the data in this process, then starts them with torchrun")
    return p


def run(args) -> int:
    from hpc_seg.config import load_config

    cfg = load_config(args.config, args.overrides)  # config errors surface before anything starts
    run_dir = Path(args.run_dir or Path("runs") / cfg.name)
    if args.print_ds_config:
        from hpc_seg.distributed.env import detect_env
        from hpc_seg.distributed.ds_config import deepspeed_config

        print(json.dumps(deepspeed_config(cfg, detect_env().world_size), indent=2))
        return 0
    from hpc_seg.training.tracking import require_mlflow

    require_mlflow(cfg)  # tracking.mlflow without mlflow installed: one line before anything starts
    ensure_data(cfg)
    nproc = args.nproc or cfg.train.processes
    from hpc_seg.distributed.env import detect_env

    if nproc > 1 and detect_env().world_size == 1:
        return launch_local(nproc, args, run_dir)
    from hpc_seg.distributed import collectives as coll
    from hpc_seg.training import stages

    try:
        return stages.run(cfg, run_dir, resume=args.resume).code  # one trainer, or a cascade's stages
    finally:
        coll.destroy()


def launch_local(nproc: int, args, run_dir: Path) -> int:
    """Start ``nproc`` ranks of this command on this machine (torchrun, standalone rendezvous).
    Threads per rank = cores / nproc unless OMP_NUM_THREADS is set: on CPU, ranks of one thread
    each outrun one rank of several threads on small convolutions (bench/README.md "Recipes on real data")."""
    import os
    import subprocess

    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or nproc) // nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "hpc_seg.train", *(["--config", str(args.config)] if args.config else []), "--run-dir", str(run_dir),
           *[a for s in args.overrides for a in ("--set", s)], *(["--resume", args.resume] if args.resume else [])]
    return subprocess.call(cmd, env=env)


def ensure_data(cfg) -> None:
    """Data preparation happens here, in one process, before distributed start-up — never in the
    engine. Several ranks (torchrun, srun) need a prepared store: its absence is an error naming
    the command that prepares it."""
    from hpc_seg.ingest.prepare import is_prepared, prepare_command, prepare_for_config
    from hpc_seg.distributed.env import detect_env

    d = cfg.data
    if is_prepared(d.store, d.split_seed):
        return
    world = detect_env().world_size
    if world > 1:
        raise HpcSegError(f"{d.store}: not a prepared store (split seed {d.split_seed}); {world} ranks do not "
                          f"prepare data. Prepare it once first: {prepare_command(cfg)}")
    prepare_for_config(cfg)


def main(argv: list[str] | None = None) -> int:
    """``python -m hpc_seg.train`` (torchrun, srun): the same options and errors as ``hpc-seg train``."""
    parser = add_train_args(argparse.ArgumentParser(prog="hpc-seg train", description="DeepSpeed training"))
    return run_command("hpc-seg train", run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

"""``hpc-seg plan``: per-GPU memory of a config under ZeRO 0-3, precision and activation
checkpointing (the report itself is :func:`hpc_seg.memory_plan.report.run_plan`)."""

from __future__ import annotations

from hpc_seg.config.cli_args import add_config_args


def add_commands(sub) -> None:
    p = sub.add_parser("plan", help="predict per-GPU memory under ZeRO 0-3 / precision / checkpointing")
    add_config_args(p)
    p.add_argument("--gpus", type=int, default=None, help="data-parallel GPUs (default: the slurm request)")
    p.add_argument("--gpu-mem", default=None, help="memory per GPU for a recommendation, e.g. 40GB")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args) -> int:
    from hpc_seg.config import load_config
    from hpc_seg.memory_plan.planner import model_channels
    from hpc_seg.memory_plan.report import run_plan

    cfg = load_config(args.config, args.overrides)
    run_plan(cfg, args.gpus, args.gpu_mem, io=model_channels(cfg))
    return 0

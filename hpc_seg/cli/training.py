"""Training commands: ``config`` (print the resolved config), ``train``, ``demo``."""

from __future__ import annotations

from hpc_seg.config.cli_args import add_config_args


def add_commands(sub) -> None:
    from hpc_seg.train import add_train_args

    p = sub.add_parser("config", help="print the resolved config")
    add_config_args(p)
    p.set_defaults(func=cmd_config)

    p = add_train_args(sub.add_parser("train", help="train with DeepSpeed (see hpc_seg/train.py)"))
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="end-to-end demo on the embedded default (phantom data)")
    add_config_args(p)
    p.set_defaults(func=cmd_demo, config="demo.yaml")


def cmd_config(args) -> int:
    import yaml

    from hpc_seg.config import load_config, to_dict

    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def cmd_train(args) -> int:
    from hpc_seg.train import run

    return run(args)


def cmd_demo(args) -> int:
    from hpc_seg.demo import run_demo

    return run_demo(args.config, args.overrides)

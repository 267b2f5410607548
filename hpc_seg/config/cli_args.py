"""The command-line side of a config, shared by every parser that takes one (``hpc-seg config``,
``train``, ``submit``, ``plan``, ``demo`` and ``python -m hpc_seg.train`` under torchrun/srun), and
the one error wrapper of every entry point.

It lives in ``hpc_seg.config`` because ``hpc_seg/train.py`` sits below ``hpc_seg.cli`` in the layer
order (tests/test_layout.py) and must not import it, while both import ``hpc_seg.config`` anyway;
this module needs nothing but ``argparse`` and ``hpc_seg.errors``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from hpc_seg.errors import HpcSegError

CONFIG_HELP = "YAML config (path or name inside configs/)"


def add_config_args(p: argparse.ArgumentParser, *, required: bool = False, help: str = CONFIG_HELP) -> None:
    """``--config FILE`` and ``--set SECTION.KEY=VALUE`` (repeatable) → ``args.config``, ``args.overrides``,
    the two arguments of :func:`hpc_seg.config.load_config`."""
    p.add_argument("--config", default=None, required=required, help=help)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), value parsed as YAML")


def run_command(prog: str, func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``func(args)``'s exit status; an :class:`HpcSegError` (bad input, bad config) is one line
    ``PROG: error: MESSAGE`` on stderr and exit status 2. Anything else propagates (a bug keeps its
    traceback; Ctrl-C is Python's KeyboardInterrupt)."""
    try:
        return func(args)
    except HpcSegError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2

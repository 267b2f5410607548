"""Submit training to SLURM through submitit: the design's entry point, a thin wrapper around
``hpc-seg submit`` (``hpc_seg/cli/jobs.py``; its docstring lists the commands)::

    python launch/submit.py --config transunet_12l.yaml
    python launch/submit.py --config grids/unet_aspp.yaml --dry-run
"""

import sys

from hpc_seg.cli import main

if __name__ == "__main__":
    sys.exit(main(["submit", *sys.argv[1:]]))

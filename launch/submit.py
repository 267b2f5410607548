"""Submit training to SLURM through submitit: the design's entry point, a thin wrapper around
``hpc-seg submit`` (``hpc_seg/jobs/cli.py``; its docstring lists the commands)::

    python launch/submit.py --config transunet_12l.yaml
    python launch/submit.py --config grids/unet_aspp.yaml --dry-run
"""

import sys

from hpc_seg.jobs.cli import main

if __name__ == "__main__":
    sys.exit(main())

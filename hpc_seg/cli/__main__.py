"""``python -m hpc_seg.cli`` is ``hpc-seg``."""

import sys

from hpc_seg.cli import main

sys.exit(main())

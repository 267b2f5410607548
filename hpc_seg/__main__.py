import sys

from hpc_seg.cli import main

sys.exit(main())

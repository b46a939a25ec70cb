"""`python -m tpext` (one process) or `torchrun --nproc-per-node N -m tpext`: the demo (tpext/demo.py)."""
import sys

from .demo import main

if __name__ == "__main__":
    sys.exit(main())

"""``python -m fsam_dist.study``: run the generalisation study (see :mod:`fsam_dist.study.harness`)."""

import sys

from .harness import main

if __name__ == "__main__":
    sys.exit(main())

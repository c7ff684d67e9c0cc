"""``python -m bldseg``: the ``bldseg`` command without the console script."""

import sys

from bldseg.cli import main

if __name__ == "__main__":
    sys.exit(main())

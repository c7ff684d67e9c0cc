"""Ranks training images by how much a trained model disagrees with their masks (wrong GT).

The ``bldseg suspects`` command (:mod:`bldseg.commands.suspects`),
run from a checkout: the same flags, listed by ``--help``.
"""

import sys

from bldseg.commands.suspects import main

if __name__ == "__main__":
    sys.exit(main())

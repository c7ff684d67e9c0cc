"""Augmentation search: the reference pipeline's scale (limit and probability) and flip
probabilities, plus rotations, transposes, colour (brightness/contrast, HSV), noise and blur;
the crop is not searched.

The ``bldseg tune aug`` command (:mod:`bldseg.commands.tune`), run from a checkout: the same
flags, listed by ``--help``.
"""

import sys

from bldseg.commands.tune import main

if __name__ == "__main__":
    sys.exit(main("aug"))

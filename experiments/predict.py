"""Predicts with a model checkpoint or an ensemble spec: a submission CSV, or mask files.

The ``bldseg predict`` command (:mod:`bldseg.commands.predict`),
run from a checkout: the same flags, listed by ``--help``.
"""

import sys

from bldseg.commands.predict import main

if __name__ == "__main__":
    sys.exit(main())

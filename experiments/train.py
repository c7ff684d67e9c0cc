"""Trains one model (no search): the reference workflow's single run, as one command.

The ``bldseg train`` command (:mod:`bldseg.commands.train`),
run from a checkout: the same flags, listed by ``--help``.
"""

import sys

from bldseg.commands.train import main

if __name__ == "__main__":
    sys.exit(main())

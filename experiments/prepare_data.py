"""Generates the built-in synthetic world (or reads --data) and builds its caches.

The ``bldseg prepare`` command (:mod:`bldseg.commands.prepare`),
run from a checkout: the same flags, listed by ``--help``.
"""

import sys

from bldseg.commands.prepare import main

if __name__ == "__main__":
    sys.exit(main())

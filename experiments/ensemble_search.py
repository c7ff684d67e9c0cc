"""Exact k-of-N ensemble + threshold search over a search's trained models (issue 7).

The ``bldseg ensemble`` command (:mod:`bldseg.commands.ensemble`),
run from a checkout: the same flags, listed by ``--help``.
"""

import sys

from bldseg.commands.ensemble import main

if __name__ == "__main__":
    sys.exit(main())

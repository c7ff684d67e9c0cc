"""Co-teaching search for noisy masks: forget rate tau, its ramp T_k, tile vs pixel selection.

The ``bldseg tune tau`` command (:mod:`bldseg.commands.tune`), run from a checkout: the same
flags, listed by ``--help``.
"""

import sys

from bldseg.commands.tune import main

if __name__ == "__main__":
    sys.exit(main("tau"))

"""LR-schedule search: OneCycleLR vs CosineAnnealingWarmupRestarts vs poly vs schedule-free AdamW.

The ``bldseg tune sched`` command (:mod:`bldseg.commands.tune`), run from a checkout: the same
flags, listed by ``--help``.
"""

import sys

from bldseg.commands.tune import main

if __name__ == "__main__":
    sys.exit(main("sched"))

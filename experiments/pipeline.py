"""The whole workflow in one resumable command: data -> cache -> tune_aug -> tune_sched ->
tune_tau -> ensemble search -> predict -> submission.csv -> score -> REPORT.md.

The ``bldseg pipeline`` command (:mod:`bldseg.commands.pipeline`),
run from a checkout: the same flags, listed by ``--help``.
"""

import sys

from bldseg.commands.pipeline import main

if __name__ == "__main__":
    sys.exit(main())

"""The command line: one module per ``bldseg`` command.

Each module has ``build_parser(prog=None)`` and ``main(argv=None, prog=None) -> int``; the
``bldseg`` console script (:mod:`bldseg.cli`) and the thin scripts in ``experiments/`` both call
``main``, so the two ways of running a command take the same flags.

    prepare   experiments/prepare_data.py      data -> caches
    train     experiments/train.py             one training run
    tune      experiments/tune_{aug,sched,tau}.py   the searches (bldseg.tune.cli)
    ensemble  experiments/ensemble_search.py   exact k-of-N ensemble + threshold search
    predict   experiments/predict.py           submission CSV or mask files
    pipeline  experiments/pipeline.py          the whole workflow, resumable
    suspects  experiments/find_suspects.py     training images whose masks look wrong
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

#: Errors a user's input causes (a missing file, a bad value, a missing optional package):
#: reported as one line on stderr, without a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, ImportError)


def fail(err: BaseException | str, prog: str | None = None) -> int:
    """Prints ``[prog: ]error: <err>`` on stderr; returns the exit status 1."""
    prefix = f"{prog}: " if prog else ""
    print(f"{prefix}error: {err}", file=sys.stderr)
    return 1


#: Exit status after Ctrl-C: 128 + SIGINT, what shells report for a process stopped by it.
EXIT_INTERRUPTED = 130


def interruptible(
    prog: str | None, run: Callable[[], int], left: Callable[[KeyboardInterrupt], str]
) -> int:
    """Runs a command's body; Ctrl-C ends it in one line on stderr and :data:`EXIT_INTERRUPTED`.

    A command's ``main`` calls it around everything after its flags are parsed: the scripts in
    ``experiments/`` call ``main`` directly, so handling it in :mod:`bldseg.cli` alone would
    leave them the traceback.

    Args:
        prog: Program name for the line (default: the running script's name, as argparse).
        run: The command's body; returns its exit status.
        left: What the interrupted run left behind, given the ``KeyboardInterrupt`` (which may
            carry it, e.g. :class:`bldseg.predict.FolderPredictionInterrupted`): what was and
            was not written, and how to go on. Printed as ``<prog>: interrupted; <left>``.
    """
    try:
        return run()
    except KeyboardInterrupt as err:
        name = prog or os.path.basename(sys.argv[0])
        # On a line of its own: the terminal echoed ^C, or a progress bar was half drawn.
        print(f"\n{name}: interrupted; {left(err)}", file=sys.stderr)
        return EXIT_INTERRUPTED

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

import sys

#: Errors a user's input causes (a missing file, a bad value, a missing optional package):
#: reported as one line on stderr, without a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, ImportError)


def fail(err: BaseException | str, prog: str | None = None) -> int:
    """Prints ``[prog: ]error: <err>`` on stderr; returns the exit status 1."""
    prefix = f"{prog}: " if prog else ""
    print(f"{prefix}error: {err}", file=sys.stderr)
    return 1

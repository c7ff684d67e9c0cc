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

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

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

#: Set by Ray in the environment of a ``ray job submit`` job's entrypoint (its job config).
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def warn_job_relative_paths(
    prog: str, paths: dict[str, str | None], tracking_uri: str | bool | None = False
) -> list[str]:
    """Under ``ray job submit``, warns on stderr about each relative output path.

    A job's entrypoint runs in the job's working folder: with ``--working-dir`` that is Ray's
    copy of the upload, under Ray's temporary folder on the node that runs the job, which Ray
    may delete once no job uses it. Results written to a relative ``--out`` or
    ``--storage`` (or a default MLflow store in the current folder) land there without a word
    and are lost; a relative ``--data-root`` keeps the caches where other nodes' trials cannot
    read them. Outside a Ray job nothing is printed.

    Args:
        prog: Program name for the lines.
        paths: Flag -> its value (None: not given, nothing to say).
        tracking_uri: The command's ``--tracking-uri`` when it logs to MLflow: None means the
            default store in the current folder; False: the command has no MLflow store.

    Returns:
        The warning lines printed (for tests).
    """
    if RAY_JOB_ENV not in os.environ:
        return []
    # what to call each path -> where it lands (absolute)
    relative = {
        f"{flag} {value}": os.path.abspath(value)
        for flag, value in paths.items()
        if value and not os.path.isabs(value)
    }
    if tracking_uri is None:
        relative["the MLflow store (no --tracking-uri)"] = os.path.abspath("mlflow.db")
    elif isinstance(tracking_uri, str) and tracking_uri:
        from urllib.parse import urlparse

        from bldseg.tune.tracking import absolute_uri  # (MLflow: imported in a Ray job only)

        # relative: sqlite:///rel, file:rel or file:./rel, a plain folder (a file store); not
        # sqlite:////abs, file:/abs, http://..., databricks, postgresql://...
        resolved = absolute_uri(tracking_uri)
        if resolved != tracking_uri:
            where = resolved.removeprefix("sqlite:///")
            relative[f"--tracking-uri {tracking_uri}"] = (
                urlparse(where).path if where.startswith("file:") else where
            )
    lines = [
        f"{prog}: warning: {what} is relative to the current folder, here the Ray job's "
        "working folder, which Ray keeps in its temporary folder on this node and may delete "
        f"once no job uses it ({where}); give a path on the shared folder"
        for what, where in relative.items()
    ]
    for line in lines:
        print(line, file=sys.stderr)
    return lines


def experiment_name(text: str) -> str:
    """An argparse type: an MLflow experiment name, which has a visible character (an empty
    ``--experiment ''`` was checked against one store folder and logged elsewhere)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: give the MLflow experiment a name")
    return text


def _as_ctrl_c(signum: int, frame: object) -> None:
    # whatever SIGINT handler is in place then: Tune's during a search (which stops its trials
    # and records them), else Python's (a KeyboardInterrupt). A job a shell script starts with
    # `&` has SIGINT ignored (POSIX), and then Python installs no handler: raising SIGINT would
    # do nothing and the command would run on to exit 0.
    if not callable(signal.getsignal(signal.SIGINT)):  # SIG_IGN, SIG_DFL or not from Python
        raise KeyboardInterrupt
    signal.raise_signal(signal.SIGINT)


@contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """SIGTERM handled as Ctrl-C while the body runs, then the handler from before is back.

    Job schedulers stop a job with SIGTERM (Slurm at its time limit, ``timeout``, ``kill``,
    systemd); by default it ended the process where it stood: a search's MLflow runs stayed
    RUNNING and its trials "running", a run folder's last epoch half written. As Ctrl-C, the
    command records what it did, says how to continue, and exits :data:`EXIT_INTERRUPTED`.
    Only the main thread can install a handler: elsewhere the body runs as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGTERM, _as_ctrl_c)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def interruptible(
    prog: str | None, run: Callable[[], int], left: Callable[[KeyboardInterrupt], str]
) -> int:
    """Runs a command's body; Ctrl-C (or SIGTERM, :func:`sigterm_as_ctrl_c`) ends it in one line
    on stderr and :data:`EXIT_INTERRUPTED`.

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
        with sigterm_as_ctrl_c():
            return run()
    except KeyboardInterrupt as err:
        name = prog or os.path.basename(sys.argv[0])
        # On a line of its own: the terminal echoed ^C, or a progress bar was half drawn.
        print(f"\n{name}: interrupted; {left(err)}", file=sys.stderr)
        return EXIT_INTERRUPTED

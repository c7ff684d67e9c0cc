"""Generates the built-in synthetic world (or reads --data) and builds its caches.

    bldseg prepare                                        # built-in synthetic world
    bldseg prepare --data /path/to/competition            # folder with train.csv
    bldseg prepare --data /path/to/inria --tile-size 512  # images/ + masks/
    bldseg prepare --images scenes/ --footprints labels/  # GeoTIFF + polygons

From a checkout, python experiments/prepare_data.py takes the same flags.
"""

from __future__ import annotations

import argparse
import errno
import os
import time

from bldseg.commands import USER_ERRORS, fail, interruptible, warn_job_relative_paths
from bldseg.data.prepare import add_data_arguments, data_options, prepare_data


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The flags of ``bldseg prepare`` (``experiments/prepare_data.py``).

    Args:
        prog: Program name in the usage line (default: the running script's name).
    """
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    add_data_arguments(parser)
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Prepares the data; returns the exit status (1 with a message on stderr for bad data,
    130 after Ctrl-C).

    Args:
        argv: Arguments after the command (default: ``sys.argv[1:]``).
        prog: Program name in the usage line.
    """
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    warn_job_relative_paths(parser.prog, {"--data-root": args.data_root})
    # A cache is built in a hidden folder renamed into place when complete, the synthetic world
    # records itself complete last: what an interrupted run finished is kept, the rest redone.
    return interruptible(
        parser.prog,
        lambda: _prepare(args),
        lambda _: (
            "what was finished is kept (a cache, or the synthetic world, counts only once "
            "complete); run the same command again to prepare the rest"
        ),
    )


def _prepare(args: argparse.Namespace) -> int:
    """Prepares the data (``main`` after its flags are parsed)."""
    t0 = time.perf_counter()
    try:
        prepared = prepare_data(
            args.data, options=data_options(args), data_root=args.data_root, verbose=True
        )
    except USER_ERRORS as e:
        return fail(e)
    except OSError as e:  # the caches and the synthetic world are written under --data-root
        return fail(cannot_write(e, "--data-root", args.data_root))
    print(f"dataset: {prepared.root}")
    print(f"train cache: {prepared.train}")
    print(f"test cache:  {prepared.test}")
    print(f"ready in {time.perf_counter() - t0:.1f} s")
    return 0


def cannot_write(err: OSError, flag: str, folder: str | os.PathLike) -> str:
    """One line for ``err``, met writing into ``folder`` (the value of ``flag``): what to do.

    An error about a file elsewhere (an image that cannot be read, a ``--pretrained`` file
    without read permission) is given as it is: a hint about ``flag`` would point at the wrong
    folder. ``err.filename`` says where; ``None`` (an error re-raised with the path in its
    message, :func:`bldseg.io.write_json`) is taken as the folder's.
    """
    where = os.path.abspath(folder)
    if err.filename is not None:
        path = os.path.abspath(os.fsdecode(err.filename))
        # the folder, a file inside it, or a parent that had to be made for it
        if not (
            path == where or path.startswith(where + os.sep) or where.startswith(path + os.sep)
        ):
            return str(err)
    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"{flag} {folder}: cannot write there ({err}); pass a {flag} you can write"
    if err.errno in (errno.EEXIST, errno.ENOTDIR):
        return f"{flag} {folder}: a file is in the way ({err}); pass a folder (new or existing)"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{flag} {folder}: the disk is full ({err}); free space and run the command again"
    return f"{flag} {folder}: {err}"

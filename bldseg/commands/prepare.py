"""Generates the built-in synthetic world (or reads --data) and builds its caches.

    bldseg prepare                                        # built-in synthetic world
    bldseg prepare --data /path/to/competition            # folder with train.csv
    bldseg prepare --data /path/to/inria --tile-size 512  # images/ + masks/
    bldseg prepare --images scenes/ --footprints labels/  # GeoTIFF + polygons

From a checkout, python experiments/prepare_data.py takes the same flags.
"""

from __future__ import annotations

import argparse
import time

from bldseg.commands import USER_ERRORS, fail
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
    """Prepares the data; returns the exit status (1 with a message on stderr for bad data).

    Args:
        argv: Arguments after the command (default: ``sys.argv[1:]``).
        prog: Program name in the usage line.
    """
    args = build_parser(prog).parse_args(argv)
    t0 = time.perf_counter()
    try:
        prepared = prepare_data(
            args.data, options=data_options(args), data_root=args.data_root, verbose=True
        )
    except USER_ERRORS as e:
        return fail(e)
    print(f"dataset: {prepared.root}")
    print(f"train cache: {prepared.train}")
    print(f"test cache:  {prepared.test}")
    print(f"ready in {time.perf_counter() - t0:.1f} s")
    return 0

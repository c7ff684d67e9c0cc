"""The ``bldseg`` command: one sub-command per entry script of ``experiments/``.

    bldseg --help                  # the commands
    bldseg train --help            # a command's flags (the same as experiments/train.py's)
    bldseg tune aug --trials 4     # python experiments/tune_aug.py --trials 4
    python -m bldseg ...           # the same without the console script

Everything after the command's name goes to the command's own parser
(:mod:`bldseg.commands`), so the two ways of running a command cannot drift apart. Commands are
imported only when run: ``bldseg --help`` does not load torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import PackageNotFoundError, version

from bldseg.commands import EXIT_INTERRUPTED

PROG = "bldseg"

#: command (a module of bldseg.commands) -> (its entry script in experiments/, one-line summary).
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("prepare_data.py", "generate the synthetic world or read --data; cache it"),
    "train": ("train.py", "train one model (no search)"),
    "tune": ("tune_{aug,sched,tau}.py", "hyper-parameter search: aug, sched or tau"),
    "ensemble": ("ensemble_search.py", "exact k-of-N ensemble + threshold search"),
    "predict": ("predict.py", "submission CSV, or mask files for a folder of images"),
    "pipeline": ("pipeline.py", "the whole workflow in one resumable command"),
    "suspects": ("find_suspects.py", "rank training images whose masks look wrong"),
}

#: bldseg tune <search> -> one-line summary (the searches of bldseg.commands.tune.SEARCHES).
TUNE_SEARCHES: dict[str, str] = {
    "aug": "augmentation search (experiments/tune_aug.py)",
    "sched": "learning-rate schedule search (experiments/tune_sched.py)",
    "tau": "co-teaching forget-rate search (experiments/tune_tau.py)",
}


def package_version() -> str:
    """The installed distribution's version (``bldseg.__version__`` in a bare checkout)."""
    try:
        return version("bldseg")
    except PackageNotFoundError:
        from bldseg import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    """The top level: ``--version`` and the commands; a command's flags are its own parser's."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Satellite building segmentation: data, training, searches, ensembles, "
        "prediction.",
        epilog=f"Run '{PROG} COMMAND --help' for a command's flags. From a checkout, the scripts "
        "in experiments/ take the same flags: "
        + ", ".join(f"{name} = {script}" for name, (script, _) in COMMANDS.items())
        + ".",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", title="commands", required=True
    )
    for name, (_, summary) in COMMANDS.items():
        # add_help=False: --help (like every other flag) goes on to the command's own parser.
        sub = commands.add_parser(name, help=summary, add_help=False)
        if name == "tune":
            sub.description = f"{summary}; '{PROG} tune SEARCH --help' for the search's flags."
            searches = sub.add_subparsers(
                dest="search",
                metavar="{" + ",".join(TUNE_SEARCHES) + "}",
                title="searches",
                required=True,
            )
            for search, line in TUNE_SEARCHES.items():
                searches.add_parser(search, help=line, add_help=False)
            sub.add_argument("-h", "--help", action="help", help="show this help message and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs ``bldseg [--version] COMMAND [flags]``; returns the command's exit status.

    Args:
        argv: The arguments after ``bldseg`` (default: ``sys.argv[1:]``).

    Raises:
        SystemExit: ``--help``, ``--version`` (status 0) and usage errors (status 2), as
            argparse does.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    # The top level has no flags that take a value, so the first word is the command (and for
    # ``tune`` the next one the search). Only that head is parsed here; the rest goes verbatim
    # to the command's own parser.
    i = next((j for j, arg in enumerate(argv) if not arg.startswith("-")), len(argv))
    end = i + 2 if argv[i : i + 1] == ["tune"] else i + 1
    head, rest = argv[:end], argv[end:]
    args = build_parser().parse_args(head)
    try:
        module = importlib.import_module(f"bldseg.commands.{args.command}")
    except KeyboardInterrupt:  # Ctrl-C while torch and the command load: nothing started yet
        print(f"\n{PROG} {args.command}: interrupted before it started", file=sys.stderr)
        return EXIT_INTERRUPTED
    if args.command == "tune":
        return module.main(args.search, rest, prog=f"{PROG} tune {args.search}")
    return module.main(rest, prog=f"{PROG} {args.command}")

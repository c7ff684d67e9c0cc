"""The hyper-parameter searches: ``bldseg tune aug|sched|tau`` (``experiments/tune_*.py``).

Each search is :func:`bldseg.tune.cli.main` with its default search space and description;
the flags are those of :func:`bldseg.tune.cli.build_parser`.
"""

from __future__ import annotations

import argparse

from bldseg.tune import cli as tune_cli

AUG = """\
Augmentation search: the reference pipeline's scale (limit and probability) and flip
probabilities, plus rotations, transposes, colour (brightness/contrast, HSV), noise and blur.
The crop is not searched: aug.crop_size stays as set (--set aug.crop_size=N).

    bldseg tune aug                       # built-in synthetic world, tiny model, CPU
    bldseg tune aug --data /path/to/comp --model upernet_internimage_b \\
        --gpus-per-trial 1 --address <ray-head>:6379 --storage /shared/runs \\
        --tracking-uri http://<mlflow-host>:5000
    python experiments/tune_aug.py        # the same, from a checkout

Run with --help for every flag. Trials are logged to MLflow (one child run per trial).
"""

SCHED = """\
LR-schedule search: OneCycleLR vs CosineAnnealingWarmupRestarts vs poly vs schedule-free AdamW,
with their parameters.

    bldseg tune sched                     # built-in synthetic world, tiny model, CPU
    bldseg tune sched --data /path/to/comp --model upernet_internimage_b \\
        --gpus-per-trial 1 --address <ray-head>:6379 --storage /shared/runs \\
        --tracking-uri http://<mlflow-host>:5000
    python experiments/tune_sched.py      # the same, from a checkout

Run with --help for every flag. Trials are logged to MLflow (one child run per trial).
"""

TAU = """\
Co-teaching search for noisy masks: forget rate tau, its ramp T_k, tile vs pixel selection.

    bldseg tune tau                       # built-in synthetic world, tiny model, CPU
    bldseg tune tau --data /path/to/comp --model upernet_internimage_b \\
        --gpus-per-trial 1 --address <ray-head>:6379 --storage /shared/runs \\
        --tracking-uri http://<mlflow-host>:5000
    python experiments/tune_tau.py        # the same, from a checkout

Run with --help for every flag. Trials are logged to MLflow (one child run per trial).
"""

#: ``bldseg tune <search>`` -> (default search space in tune_spaces, description).
SEARCHES: dict[str, tuple[str, str]] = {
    "aug": ("augmentation", AUG),
    "sched": ("scheduler", SCHED),
    "tau": ("coteaching", TAU),
}


def _search(search: str) -> tuple[str, str]:
    if search not in SEARCHES:
        raise ValueError(f"unknown search {search!r}; choose from {', '.join(SEARCHES)}")
    return SEARCHES[search]


def build_parser(search: str, prog: str | None = None) -> argparse.ArgumentParser:
    """The flags of ``bldseg tune <search>`` (``experiments/tune_<search>.py``).

    Args:
        search: ``"aug"``, ``"sched"`` or ``"tau"``.
        prog: Program name in the usage line (default: the running script's name).
    """
    space, description = _search(search)
    parser = tune_cli.build_parser(space, description)
    if prog is not None:
        parser.prog = prog
    return parser


def main(search: str, argv: list[str] | None = None, prog: str | None = None) -> int:
    """Runs one search; returns the exit status (2 with a message on stderr when it fails).

    Args:
        search: ``"aug"``, ``"sched"`` or ``"tau"``.
        argv: Arguments after the search's name (default: ``sys.argv[1:]``).
        prog: Program name in the usage line.
    """
    space, description = _search(search)
    return tune_cli.main(space, description, argv, prog)

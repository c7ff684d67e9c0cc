"""Build bldseg's training ops ahead of time: ``python -m bldseg.ops.build``.

Builds DCNv3 and schedule-free AdamW's CPU step (the ops every training run loads); the
ensemble search's kernel builds on its first use. Prints each build folder and the seconds it
took; exits with status 1 and the compiler's message when a build fails. Useful before
starting many Ray workers, so that none of them pays for a build. Set ``$BLDSEG_BUILD_DIR`` to
choose where builds go.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from ._build import BuildError, BuildInfo, build_root
from .dcnv3 import load_dcnv3_op


def _load_optim_step(verbose: bool = False) -> BuildInfo:
    from bldseg.train import optim  # the training package imports this one: load it late

    return optim.load_step_op(verbose=verbose)


#: label -> loader of each op this command builds
OPS: dict[str, Callable[..., BuildInfo]] = {
    "dcnv3": load_dcnv3_op,
    "schedule-free AdamW step": _load_optim_step,
}


def main(argv: list[str] | None = None) -> int:
    """Builds the training ops; returns the process exit status."""
    parser = argparse.ArgumentParser(prog="python -m bldseg.ops.build", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="show compiler commands")
    args = parser.parse_args(argv)
    print(f"build root: {build_root()}")
    for label, load in OPS.items():
        try:
            info = load(verbose=args.verbose)
        except BuildError as err:
            print(f"{label}: build FAILED\n{err}", file=sys.stderr)
            return 1
        action = "built" if info.built else "already built, loaded"
        cuda = " (CPU + CUDA)" if info.with_cuda else " (CPU)"
        print(f"{label}{cuda}: {action} in {info.seconds:.1f} s -> {info.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

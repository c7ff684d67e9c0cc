"""Build bldseg's native ops ahead of time: ``python -m bldseg.ops.build``.

Prints the build folder and the seconds it took; exits with status 1 and the compiler's
message when the build fails. Useful before starting many Ray workers, so that none of them
pays for the build. Set ``$BLDSEG_BUILD_DIR`` to choose where builds go.
"""

from __future__ import annotations

import argparse
import sys

from ._build import BuildError, build_root
from .dcnv3 import load_dcnv3_op


def main(argv: list[str] | None = None) -> int:
    """Builds every native op; returns the process exit status."""
    parser = argparse.ArgumentParser(prog="python -m bldseg.ops.build", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="show compiler commands")
    args = parser.parse_args(argv)
    print(f"build root: {build_root()}")
    try:
        info = load_dcnv3_op(verbose=args.verbose)
    except BuildError as err:
        print(f"dcnv3: build FAILED\n{err}", file=sys.stderr)
        return 1
    action = "built" if info.built else "already built, loaded"
    cuda = "CPU + CUDA" if info.with_cuda else "CPU"
    print(f"dcnv3 ({cuda}): {action} in {info.seconds:.1f} s -> {info.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

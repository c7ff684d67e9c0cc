"""bldseg: satellite building segmentation as one reproducible system.

Sub-packages:
    data: RLE, readers for the competition and folder layouts, the memory-mapped cache,
        the synthetic world and the torch datasets.
    ops: native operators (DCNv3) with their pure-PyTorch references.
"""

import importlib.abc
import importlib.util
import os
import sys
from pathlib import Path

__version__ = "0.1.0"

# albumentations asks PyPI for a newer version at import unless told not to: every trial
# worker and predictor would make a network call (and warn on an offline cluster node).
# setdefault: a user who wants the check can still set the variable to 0.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

# A relative op build folder is meant relative to where the user started: Ray trials change
# directory, and each would build the native ops (a minute each) in a folder of its own.
# Made absolute here, in the driver, before Ray starts workers that inherit the environment.
if os.environ.get("BLDSEG_BUILD_DIR") and not os.path.isabs(
    os.path.expanduser(os.environ["BLDSEG_BUILD_DIR"])
):
    os.environ["BLDSEG_BUILD_DIR"] = os.path.abspath(os.environ["BLDSEG_BUILD_DIR"])


class _CheckoutSpaces(importlib.abc.MetaPathFinder):
    """Finds ``bldseg.tune_spaces`` in a checkout, whose layout keeps it at the top level.

    An install maps ``tune_spaces/`` onto ``bldseg.tune_spaces`` (``pyproject.toml``); a plain
    checkout on ``sys.path`` (``python -m bldseg`` run inside it, which shadows a non-editable
    install) has no such folder. Consulted last, only when no other finder knows the name.
    """

    def find_spec(self, name, path=None, target=None):
        if name != "bldseg.tune_spaces":
            return None
        init = Path(__file__).resolve().parents[1] / "tune_spaces" / "__init__.py"
        if not init.is_file():
            return None
        return importlib.util.spec_from_file_location(
            name, init, submodule_search_locations=[str(init.parent)]
        )


if not any(isinstance(f, _CheckoutSpaces) for f in sys.meta_path):
    sys.meta_path.append(_CheckoutSpaces())

"""bldseg: satellite building segmentation as one reproducible system.

Sub-packages:
    data: RLE, readers for the competition and folder layouts, the memory-mapped cache,
        the synthetic world and the torch datasets.
    ops: native operators (DCNv3) with their pure-PyTorch references.
"""

import os

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

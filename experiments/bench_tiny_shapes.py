"""The CPU demo model's shape: other tiny UPerNet-InternImage shapes against it, and a peer.

``upernet_internimage_tiny`` (C=16, depths 1-1-2-1, head 32) is our own size for a 2-core CPU.
This script registers candidate shapes under their own names (``upernet_internimage_tiny_<shape>``,
in this process only: they are study points, not library models) and hands them to
``bench_train.py`` as extra arms, so every shape trains through the same ``fit()``, data, crops
and schedule as the demo's model and the peers, one after the other, scored on the same test
tiles with intervals and paired differences. All other options are ``bench_train.py``'s.

    python experiments/bench_tiny_shapes.py --peers smp_unet_mobilenetv3_small_075_narrow \\
        --json bench/tiny_shapes.json
    python experiments/bench_tiny_shapes.py --shapes c32_h16 --ours-epochs 25 ...

Runs are keyed by arm and config under ``--out``: keep the same ``--peers`` and ``--shapes`` order
to reuse finished runs.
"""

from __future__ import annotations

import argparse

from bldseg.models.registry import list_models, register_model
from bldseg.models.segmentor import SegmentationModel, upernet_internimage_tiny

# The sibling benchmark (this folder is on sys.path when a script here runs).
import bench_train  # isort: skip

#: shape -> (decode head channels, auxiliary head channels, InternImage config overrides).
#: The demo's model is C=16, depths (1, 1, 2, 1), groups (1, 2, 4, 8), head 32, aux 16. Groups
#: keep 16 channels per group (the op's specialised width) when the channels change.
SHAPES: dict[str, tuple[int, int, dict]] = {
    "h16": (16, 16, {}),  # a narrower decode head, the backbone unchanged
    "d2242": (32, 16, {"depths": (2, 2, 4, 2)}),  # twice the blocks
    "c32": (32, 16, {"channels": 32, "groups": (2, 4, 8, 16)}),  # twice the width
    "c32_h16": (16, 16, {"channels": 32, "groups": (2, 4, 8, 16)}),  # wider backbone, narrow head
}


def shape_model_name(shape: str) -> str:
    return f"upernet_internimage_tiny_{shape}"


def register_shapes(shapes: list[str]) -> list[str]:
    """Registers the named shapes as models (once per process); returns their model names."""
    names = []
    for shape in shapes:
        if shape not in SHAPES:
            raise SystemExit(f"--shapes: unknown shape {shape!r}; choose from {sorted(SHAPES)}")
        name = shape_model_name(shape)
        if name not in list_models():
            head, aux, overrides = SHAPES[shape]

            def build(_head=head, _aux=aux, _over=overrides, **kw) -> SegmentationModel:
                # the demo's builder with this shape's widths and backbone overrides
                shape = {"head_channels": _head, "aux_channels": _aux, **_over}
                return upernet_internimage_tiny(**{**shape, **kw})

            build.__name__ = name
            register_model(build)
        names.append(name)
    return names


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every other option is passed to bench_train.py (see its --help).",
    )
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), help=f"of {list(SHAPES)}")
    p.add_argument("--peers", nargs="*", default=[], help="peer models, before the shapes")
    args, rest = p.parse_known_args(argv)
    arms = [*args.peers, *register_shapes(args.shapes)]
    bench_train.main([*rest, "--peers", *arms])


if __name__ == "__main__":
    main()

"""Writes the built-in synthetic world (competition layout) to a folder.

    python experiments/make_synthetic.py                         # demo sizes into data/synthetic
    python experiments/make_synthetic.py out/ --noise-fraction 0.3
    python experiments/make_synthetic.py out/ --competition      # 1024 train scenes, 224 tiles

Running it again with the same arguments returns at once (the world is already complete).
--overwrite replaces a world made with other arguments; a folder holding anything else (a real
dataset) is refused, with or without it.
"""

from __future__ import annotations

import argparse
import inspect
import sys

from bldseg.commands import fail
from bldseg.data.synthetic import generate_world


def main() -> int:
    """Writes the world; returns the exit status (1 with one ``error:`` line on stderr)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default="data/synthetic", help="world folder")
    # Defaults: generate_world's own (the demo world), read from its signature.
    d = {k: v.default for k, v in inspect.signature(generate_world).parameters.items()}
    a = parser.add_argument
    a("--n-train", type=int, default=d["n_train"], help=f"training scenes ({d['n_train']})")
    a("--train-size", type=int, default=d["train_size"], help="training scene side, px")
    a("--n-test", type=int, default=d["n_test"], help=f"test tiles ({d['n_test']})")
    a("--test-size", type=int, default=d["test_size"], help=f"test tile side ({d['test_size']})")
    a(
        "--test-scene-size",
        type=int,
        default=d["test_scene_size"],
        help=f"side of the scenes test tiles are cut from ({d['test_scene_size']})",
    )
    parser.add_argument(
        "--competition",
        action="store_true",
        help="competition sizes: 1024 px training scenes, 224 px test tiles",
    )
    a("--noise-fraction", type=float, default=0.3, help="share of noisy masks (0.3, the demo's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a synthetic world made with other arguments (never any other folder)",
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    if args.competition:
        args.train_size, args.test_size, args.test_scene_size = 1024, 224, 1024
    try:
        world = generate_world(
            args.out_dir,
            n_train=args.n_train,
            train_size=args.train_size,
            n_test=args.n_test,
            test_size=args.test_size,
            test_scene_size=args.test_scene_size,
            noise_fraction=args.noise_fraction,
            seed=args.seed,
            progress=not args.no_progress,
            overwrite=args.overwrite,
        )
    except (ValueError, OSError) as e:
        # Bad sizes, a folder that is not ours or cannot be written: the user's to fix, in one
        # line, not a bug to trace.
        return fail(e, parser.prog)
    print(f"world ready: {world.root} (train.csv, test.csv, test_truth.csv, world.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

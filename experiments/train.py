"""Trains one model (no search): the reference workflow's single run, as one command.

    python experiments/train.py --out runs/single                    # synthetic world, tiny model
    python experiments/train.py --data /path/to/comp --set model=upernet_internimage_b \\
        --set epochs=50 --set aug.crop_size=224 --out runs/b_single
    python experiments/train.py --data /path/to/inria --tile-size 512 --out runs/inria
                                                       # images/ + masks/ folders

On a CPU the defaults are the demo's small settings (tiny model, 64-px crops) on any data.

Writes best.pt, last.pt (resumable: run the same command again), val_probs.npz, history.json
and plots/ under --out.
"""

import argparse
import json

from bldseg.data.prepare import add_data_arguments, data_options, prepare_data
from bldseg.train import RunConfig, fit
from bldseg.tune.cli import fixed_config


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_data_arguments(p)
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--model", default=None, help="model name (see bldseg.models.list_models())")
    p.add_argument(
        "--split-group",
        default=None,
        help="regex on source file names grouping tiles on one side of the validation split",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="run-config value, e.g. --set epochs=20 (repeatable)",
    )
    args = p.parse_args()
    fixed = fixed_config(
        args.data or args.images,
        args.model,
        args.set,
        split_group=args.split_group,
        announce=True,
    )
    try:
        cfg = RunConfig.from_flat({**fixed, "data": args.data})
        data = prepare_data(
            args.data, options=data_options(args), data_root=args.data_root, verbose=True
        )
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise SystemExit(f"error: {e}") from e
    result = fit(cfg, args.out, data=data, progress=True)
    for row in result.history:
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
    print(
        f"{result.status}: {result.message}; best epoch {result.best.get('epoch')} "
        f"val Dice {result.best.get('val_dice_best', float('nan')):.4f}; {args.out}/best.pt"
    )


if __name__ == "__main__":
    main()

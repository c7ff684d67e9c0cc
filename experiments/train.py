"""Trains one model (no search): the reference workflow's single run, as one command.

    python experiments/train.py --out runs/single                    # synthetic world, tiny model
    python experiments/train.py --data /path/to/comp --set model=upernet_internimage_b \\
        --set epochs=50 --set aug.crop_size=224 --out runs/b_single

Writes best.pt, last.pt (resumable: run the same command again), val_probs.npz, history.json
and plots/ under --out.
"""

import argparse
import json

from bldseg.data.prepare import DEFAULT_DATA_ROOT, prepare_data
from bldseg.train import RunConfig, fit
from bldseg.tune.cli import fixed_config


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", default=None, help="folder with train.csv (default: synthetic world)")
    p.add_argument("--data-root", default=str(DEFAULT_DATA_ROOT), help="caches, synthetic world")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="run-config value, e.g. --set epochs=20 (repeatable)",
    )
    args = p.parse_args()
    flat = {**fixed_config(args.data, sets=args.set), "data": args.data}
    cfg = RunConfig.from_flat(flat)
    data = prepare_data(args.data, data_root=args.data_root)
    result = fit(cfg, args.out, data=data, progress=True)
    for row in result.history:
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
    print(
        f"{result.status}: {result.message}; best epoch {result.best.get('epoch')} "
        f"val Dice {result.best.get('val_dice_best', float('nan')):.4f}; {args.out}/best.pt"
    )


if __name__ == "__main__":
    main()

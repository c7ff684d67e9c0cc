"""Plain BCE vs co-teaching on noisy masks, scored on the clean held-out test split.

Same budget, same seed, same data: the built-in synthetic world has 30% corrupted training
masks and clean test ground truth. For each run it reports the validation Dice (on noisy
validation masks) and the held-out test Dice at three thresholds: 0.5, the best of the
validation sweep, and Youden's. Prints a table and writes JSON.

    python experiments/compare_noisy.py --json bench/noisy.json
"""

import argparse
import json
from pathlib import Path

from bldseg import metrics
from bldseg.data.prepare import DEFAULT_DATA_ROOT, prepare_data
from bldseg.pipeline import test_truth
from bldseg.predict import EnsembleSpec, predict_cache
from bldseg.train import RunConfig, fit
from bldseg.tune.cli import fixed_config


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="runs/compare_noisy", help="run folders go here")
    p.add_argument("--data-root", default=str(DEFAULT_DATA_ROOT))
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="run-config value for both runs (repeatable)",
    )
    p.add_argument("--tau", type=float, default=0.3, help="co-teaching forget rate")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    data = prepare_data(None, data_root=args.data_root)
    truth = test_truth(data)
    base = fixed_config(None, sets=["epochs=16", "samples_per_epoch=384", *args.set])
    runs = {
        "bce": base,
        "coteaching": {
            **base,
            "coteach.enabled": True,
            "coteach.tau": args.tau,
            "coteach.t_k": max(1, base["epochs"] // 4),
        },
    }
    rows = []
    for name, flat in runs.items():
        out = Path(args.out) / name
        r = fit(RunConfig.from_flat(flat), out, data=data, progress=True)
        b = r.best
        row = {
            "run": name,
            "status": r.status,
            "best_epoch": b["epoch"],
            "val_dice_05": b["val_dice_05"],
            "val_dice_best": b["val_dice_best"],
            "val_dice_youden": b["val_dice_youden"],
            "thr_best": b["val_thr_best"],
            "thr_youden": b["val_thr_youden"],
        }
        for label, thr in (
            ("0.5", 0.5),
            ("sweep", b["val_thr_best"]),
            ("youden", b["val_thr_youden"]),
        ):
            pred = predict_cache(
                EnsembleSpec([str(out / "best.pt")], threshold=thr), data.test, progress=False
            )
            row[f"test_dice_{label}"] = metrics.competition_score(pred, truth)
        rows.append(row)
    cols = [
        "run",
        "val_dice_05",
        "val_dice_best",
        "val_dice_youden",
        "thr_best",
        "thr_youden",
        "test_dice_0.5",
        "test_dice_sweep",
        "test_dice_youden",
    ]
    print("\n" + "  ".join(f"{c:>16}" for c in cols))
    for row in rows:
        print(
            "  ".join(
                f"{row[c]:>16.4f}" if isinstance(row[c], float) else f"{row[c]:>16}" for c in cols
            )
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"runs": rows, "base": base}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

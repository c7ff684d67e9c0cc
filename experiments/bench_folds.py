"""How far validation Dice is from test Dice: a 5% validation split vs K-fold out-of-fold maps.

The reference workflow chose its models and threshold on a 5% split and lost 0.053 Dice
between validation and the leaderboard. This benchmark trains the demo's configuration
(``CPU_DEMO``, ``--epochs``) on the built-in world twice, side by side:

- ``split``: one model, ``val_fraction`` 5% of the source scenes held out (the reference's);
- ``kfold``: ``--folds K`` models, each validated on its own fold; the out-of-fold maps cover
  every training scene, and the submitted model averages the K fold models.

For each, the validation Dice it reports (best epoch, threshold chosen on the same tiles, as a
user reads it) is set against the Dice on the clean held-out test split at that threshold.
The world's training masks carry 30% injected label noise, so validation is scored twice:
against the (noisy) masks the run saw, and against the clean masks of the same tiles, which
are what the clean test masks compare with. ``gap = validation - test`` has a 95% interval
from independent cluster bootstraps of both sides (``stats.unpaired_difference``);
``kfold - split`` on the test tiles is paired.

    python experiments/bench_folds.py --folds 5 --json bench/folds.json

Prints a table and writes JSON. Runs are kept under ``--out`` keyed by the data and config.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bldseg import metrics, stats
from bldseg.data.rle import rle_decode
from bldseg.io import write_json
from bldseg.pipeline import test_truth
from bldseg.predict import image_loader, load_member
from bldseg.train import RunConfig, fit
from bldseg.train.engine import eval_autocast, predict_probs, resolve_device
from bldseg.train.folds import FOLDS_FILE, VAL_FILE, fit_folds
from bldseg.tune.cli import CPU_DEMO, DEFAULT_EPOCHS, parse_set

from bench_quality import _run_key, add_world_arguments, load_world  # isort: skip


def clean_truth(data, z) -> np.ndarray:
    """The clean masks under a validation library's tiles: bool (T, S, S)."""
    if data.clean_train_csv is None:
        raise FileNotFoundError(f"{data.root}: no train_clean.csv (not the built-in world?)")
    rles = pd.read_csv(data.clean_train_csv).set_index("img_id")["mask_rle"]
    shape = data.train.image_size
    masks: dict[str, np.ndarray] = {}
    s = z["probs"].shape[-1]
    out = np.zeros(z["probs"].shape, bool)
    for t, (img, (y, x)) in enumerate(zip(z["image_ids"], z["tile_yx"], strict=True)):
        img = str(img)
        if img not in masks:
            masks[img] = rle_decode(str(rles[img]), shape).astype(bool)
        out[t] = masks[img][y : y + s, x : x + s]
    return out


def score(
    name: str, run: Path, threshold: float, reported: float, data, truth, groups
) -> dict[str, Any]:
    """Validation (noisy and clean masks) and test Dice of one run at its chosen threshold."""
    level = metrics.level_from_threshold(threshold)
    z = np.load(run / VAL_FILE)
    val_groups = [str(g) for g in z["group_ids"]]
    noisy = metrics.dice_per_image(z["probs"] >= level, z["truth"].astype(bool))
    clean = metrics.dice_per_image(z["probs"] >= level, clean_truth(data, z))
    device = resolve_device("auto")
    models, cfg, _ = load_member(run, device)  # K fold models of a K-fold run: averaged
    amp = eval_autocast(cfg.precision, device)  # as bldseg predict runs it
    probs = predict_probs(models, image_loader(data.test, 32), device, amp, cfg.tta)  # (N, S, S)
    test = metrics.dice_per_image(probs >= level, truth)
    return {
        "arm": name,
        "run_dir": str(run),
        "threshold": threshold,
        "reported_val_dice": reported,
        "val_tiles": len(noisy),
        "val_scenes": len(set(val_groups)),
        "val_noisy": stats.bootstrap_mean(noisy, val_groups).to_dict(),
        "val_clean": stats.bootstrap_mean(clean, val_groups).to_dict(),
        "test": stats.bootstrap_mean(test, groups).to_dict(),
        "gap_noisy": stats.unpaired_difference(noisy, val_groups, test, groups).to_dict(),
        "gap_clean": stats.unpaired_difference(clean, val_groups, test, groups).to_dict(),
        "test_per_tile": [None if np.isnan(v) else float(v) for v in test],
    }


def _fmt(d: dict, signed: bool = False) -> str:
    return stats.format_interval(d, signed=signed, digits=3).replace(", ", ",")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    a = p.add_argument
    a("--folds", type=int, default=5, help="K of the K-fold arm (default 5)")
    a("--val-fraction", type=float, default=0.05, help="the split arm's (default 0.05)")
    a("--epochs", type=int, default=DEFAULT_EPOCHS, help=f"epochs (default {DEFAULT_EPOCHS})")
    a("--seed", type=int, default=0)
    a("--set", action="append", default=[], metavar="KEY=VALUE", help="run-config value")
    a("--out", default="runs/bench_folds", help="run folders go here")
    add_world_arguments(p)
    a("--json", default="bench/folds.json", help="write the results here")
    args = p.parse_args()

    synthetic, data = load_world(args)
    truth = test_truth(data)  # (N, 224, 224) bool
    groups = list(data.test.groups)
    base = {**CPU_DEMO, "epochs": args.epochs, "seed": args.seed, **parse_set(args.set)}
    out = Path(args.out)
    rows = []

    cfg = RunConfig.from_flat({**base, "val_fraction": args.val_fraction})
    run = out / f"split-{_run_key(data.train.fingerprint, cfg.to_flat())}"
    print(f"== split: {args.val_fraction:.0%} of the scenes held out -> {run}", flush=True)
    r = fit(cfg, run, data=data, resume=True, progress=True)
    if r.status != "completed":
        raise SystemExit(f"split arm: {r.status}: {r.message}")
    rows.append(
        score("split", run, r.best["val_thr_best"], r.best["val_dice_best"], data, truth, groups)
    )

    cfg = RunConfig.from_flat({**base, "folds": args.folds})
    run = out / f"kfold{args.folds}-{_run_key(data.train.fingerprint, cfg.to_flat())}"
    print(f"== kfold: {args.folds} folds by scene -> {run}", flush=True)
    r = fit_folds(cfg, run, data=data, resume=True, progress=True)
    if r.status != "completed":
        raise SystemExit(f"kfold arm: {r.status}: {r.message}")
    oof = json.loads((run / FOLDS_FILE).read_text())["oof"]
    rows.append(score("kfold", run, oof["val_thr_best"], oof["val_dice_best"], data, truth, groups))

    tiles = [np.array([np.nan if v is None else v for v in r["test_per_tile"]]) for r in rows]
    diff = stats.paired_difference(tiles[1], tiles[0], groups).to_dict()

    head = (
        f"{'arm':<6} {'val tiles/scenes':>16} {'thr':>5} {'val (noisy masks)':>21} "
        f"{'val (clean masks)':>21} {'test (clean)':>21} {'gap noisy':>22} {'gap clean':>22}"
    )
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        print(
            f"{r['arm']:<6} {r['val_tiles']:>10}/{r['val_scenes']:<5} {r['threshold']:>5.3f} "
            f"{_fmt(r['val_noisy']):>21} {_fmt(r['val_clean']):>21} {_fmt(r['test']):>21} "
            f"{_fmt(r['gap_noisy'], True):>22} {_fmt(r['gap_clean'], True):>22}"
        )
    print(f"\nkfold - split on the test tiles (paired): {_fmt(diff, True)}")
    print("gap = validation Dice the run reports - test Dice at its threshold (95% intervals)")

    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "base_config": base,
        "folds": args.folds,
        "val_fraction": args.val_fraction,
        "synthetic": synthetic,
        "data": data.description,
        "test_tiles": len(truth),
        "test_scenes": len(set(groups)),
        "arms": rows,
        "kfold_minus_split_test": diff,
    }
    write_json(path, record, indent=2, default=float)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

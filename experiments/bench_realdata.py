"""Real-data smoke benchmark (by hand, not in CI): a user's image/mask folder, end to end by CLI.

    python experiments/bench_realdata.py --data ../shared/realdata/inria_argh41 \\
        --json bench/realdata_inria.json

(``--split-group '^([a-z]+\\d+)_'`` groups tiles by city; on this 41-tile sample the held-out
cities leave one city for training, which the validation split refuses, naming the flag.)

1. holds out whole source scenes (``--test-fraction``, grouped like the training split, by
   ``--split-group`` when given) as a test folder;
2. runs ``experiments/train.py --data <train folder>`` (the CPU defaults a user gets, plus
   ``--epochs`` / ``--samples-per-epoch``);
3. runs ``experiments/predict.py --images <test images> --masks <test masks>`` (sliding
   window over each held-out tile) and reads its ``scores.json``;
4. prints a table and writes JSON: training time, validation Dice, held-out official score,
   pixel IoU and F1.

The train/test folders are symbolic links under ``--work`` (nothing is copied).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bldseg.data.dataset import split_indices
from bldseg.data.readers import read_folder_dataset
from bldseg.io import write_json

REPO = Path(__file__).resolve().parents[1]


def _link_split(records, root: Path, masks_dir: Path, images_dir: Path) -> None:
    """root/images/<rel> and root/masks/<rel> as symbolic links to the records' files."""
    for r in records:
        rel = r.image_path.relative_to(images_dir)
        for src, dst in (
            (r.image_path, root / "images" / rel),
            (r.mask_path, root / "masks" / r.mask_path.relative_to(masks_dir)),
        ):
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.exists():
                os.symlink(src, dst)


def _run(cmd: list[str]) -> tuple[str, float]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        tail = f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{tail}")
    return r.stdout, wall


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", required=True, help="folder with images/ + masks/")
    p.add_argument("--work", default="results/bench_realdata", help="links, run, predictions")
    p.add_argument("--test-fraction", type=float, default=0.2, help="held-out share of tiles")
    p.add_argument("--split-group", default=None, help="regex: its match groups source scenes")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--samples-per-epoch", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], help="extra train.py --set values")
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args()

    data = Path(args.data).resolve()
    images_dir, masks_dir = data / "images", data / "masks"
    records = read_folder_dataset(images_dir, masks_dir)
    if args.split_group:
        import re

        rx = re.compile(args.split_group)
        groups = [
            "".join(m.groups()) if (m := rx.search(r.image_path.stem)) else r.image_path.stem
            for r in records
        ]
    else:
        groups = [r.image_path.stem for r in records]
    train_idx, test_idx = split_indices(len(records), args.test_fraction, args.seed, groups)
    work = Path(args.work).resolve() / data.name
    train_dir, test_dir = work / "train", work / "test"
    _link_split([records[i] for i in train_idx], train_dir, masks_dir, images_dir)
    _link_split([records[i] for i in test_idx], test_dir, masks_dir, images_dir)

    py = sys.executable
    train_cmd = [
        py,
        str(REPO / "experiments/train.py"),
        "--data",
        str(train_dir),
        "--data-root",
        str(work / "cache"),
        "--out",
        str(work / "run"),
        "--set",
        f"epochs={args.epochs}",
        "--set",
        f"samples_per_epoch={args.samples_per_epoch}",
        "--set",
        f"seed={args.seed}",
    ]
    if args.split_group:
        train_cmd += ["--split-group", args.split_group]
    for s in args.set:
        train_cmd += ["--set", s]
    out, train_s = _run(train_cmd)
    history = [json.loads(line) for line in out.splitlines() if line.startswith('{"epoch"')]
    best = max(history, key=lambda h: h["val_dice_best"])
    print(out.splitlines()[0])

    pred_dir = work / "pred"
    _, predict_s = _run(
        [
            py,
            str(REPO / "experiments/predict.py"),
            "--checkpoint",
            str(work / "run" / "best.pt"),
            "--images",
            str(test_dir / "images"),
            "--masks",
            str(test_dir / "masks"),
            "--out",
            str(pred_dir),
        ]
    )
    scores = json.loads((pred_dir / "scores.json").read_text())
    row = {
        "dataset": data.name,
        "train_tiles": len(train_idx),
        "test_tiles": len(test_idx),
        "test_scenes": len({groups[i] for i in test_idx}),
        "epochs": args.epochs,
        "train_s": round(train_s, 1),
        "best_epoch": best["epoch"],
        "val_dice_best": best["val_dice_best"],
        "val_thr_best": best["val_thr_best"],
        "test_official_score": scores.get("official_score"),
        "test_pixel_iou": scores.get("pixel_iou"),
        "test_pixel_f1": scores.get("pixel_f1"),
        "predict_s": round(predict_s, 1),
    }
    width = max(len(k) for k in row)
    for k, v in row.items():
        shown = f"{v:.4f}" if isinstance(v, float) and not k.endswith("_s") else v
        print(f"{k:<{width}}  {shown}")
    dice = [h["val_dice_best"] for h in history]
    print(f"validation Dice by epoch: {np.round(dice, 3).tolist()}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json, {**row, "history": history})
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

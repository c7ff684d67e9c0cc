"""Real-data smoke benchmark (by hand, not in CI): a user's image/mask folder, end to end by CLI.

    python experiments/bench_realdata.py --data ../shared/realdata/inria_argh41 \\
        --json bench/realdata_inria.json

(``--split-group '^([a-z]+\\d+)_'`` groups tiles by city; on this 41-tile sample the held-out
cities leave one city for training, which the validation split refuses, naming the flag.)

1. holds out whole source scenes (``--test-fraction``, grouped like the training split, by
   ``--split-group`` when given, drawn with ``--split-seed``) as a test folder;
2. runs ``experiments/train.py --data <train folder>`` (the CPU defaults a user gets, plus
   ``--epochs`` / ``--samples-per-epoch`` and the training ``--seed``);
3. runs ``experiments/predict.py --images <test images> --masks <test masks>`` (sliding
   window over each held-out tile) and reads its ``scores.json``;
4. prints a table and writes JSON: training time, validation Dice, held-out official score,
   pixel IoU and F1.

The train/test folders are symbolic links under ``--work`` (nothing is copied), in a folder
per split, ``--work/<data name>/split-<key>``: the key hashes the data folder, the test
fraction, the split seed, the group regex and the tiles on each side, and ``split.json`` there
records them. The link folders are made again from scratch on every call (built under a
temporary name, then renamed into place), so links of another split never linger in them, and
the run folder (``run-seed<S>-<key>`` inside the split's folder, keyed by the training flags)
belongs to that split alone: a model is never scored on tiles it was trained on. ``--seed``
changes only the training (initialisation, crops, validation split); ``--split-seed`` the
held-out tiles, so training seeds are compared on one test set.
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bldseg.data.dataset import split_indices
from bldseg.data.readers import read_folder_dataset
from bldseg.io import write_json
from bldseg.stats import Interval, bootstrap_mean

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


def split_groups(records, split_group: str | None) -> list[str]:
    """Each record's source scene: the ``--split-group`` regex's match groups of the file
    stem (the whole stem where it does not match), or the stem."""
    if not split_group:
        return [r.image_path.stem for r in records]
    rx = re.compile(split_group)
    return [
        "".join(m.groups()) if (m := rx.search(r.image_path.stem)) else r.image_path.stem
        for r in records
    ]


def split_record(
    data: Path,
    records,
    train_idx,
    test_idx,
    test_fraction: float,
    split_seed: int,
    split_group: str | None,
) -> dict[str, Any]:
    """What defines a held-out split: the flags that drew it and the tiles on each side."""
    images_dir = data / "images"
    return {
        "data": str(data),
        "test_fraction": test_fraction,
        "split_seed": split_seed,
        "split_group": split_group,
        "train": [str(records[i].image_path.relative_to(images_dir)) for i in train_idx],
        "test": [str(records[i].image_path.relative_to(images_dir)) for i in test_idx],
    }


def test_interval(scores: dict, records, test_idx, groups: list[str], images_dir: Path) -> Interval:
    """The official score's 95% cluster-bootstrap interval over the held-out source scenes.

    ``scores`` is predict's ``scores.json``: its per-image Dice (None for an image empty in
    both the mask and the prediction, which the official score leaves out). Its estimate is
    the official score.
    """
    # predict names each image by its path under --images: the test folder mirrors data/images
    scene = {str(records[i].image_path.relative_to(images_dir)): groups[i] for i in test_idx}
    rows = scores["per_image"]
    dice = [np.nan if r["dice"] is None else r["dice"] for r in rows]
    return bootstrap_mean(dice, [scene[r["image"]] for r in rows])


def _key(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.blake2b(blob.encode(), digest_size=5).hexdigest()


def _replace_dir(tmp: Path, final: Path) -> None:
    """Puts the finished folder ``tmp`` at ``final``, removing what was there."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists() or final.is_symlink():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists() or old.is_symlink():
        # rmtree removes the links themselves, never the user's files they point to
        shutil.rmtree(old)


def link_split(
    split_dir: Path, split: dict[str, Any], records, train_idx, test_idx, data: Path
) -> tuple[Path, Path]:
    """Makes ``split_dir/train`` and ``split_dir/test`` from scratch and records ``split``.

    Each link folder is built under a temporary name and renamed into place, so it holds the
    links of this split and nothing else (a kept folder kept the links of every earlier split,
    and held-out tiles were trained on).

    Raises:
        SystemExit: ``split_dir/split.json`` records another split (a folder not made by this
            script for these flags).

    Returns:
        The train and test folders (``images/`` and ``masks/`` of links each).
    """
    record_path = split_dir / "split.json"
    if record_path.is_file():
        recorded = json.loads(record_path.read_text())
        if recorded != split:
            differ = sorted(
                k for k in split.keys() | recorded.keys() if split.get(k) != recorded.get(k)
            )
            sys.exit(
                f"{record_path} records another split (differs in {', '.join(differ)}); "
                f"remove {split_dir} or pass another --work"
            )
    images_dir, masks_dir = data / "images", data / "masks"
    split_dir.mkdir(parents=True, exist_ok=True)
    folders = []
    for side, idx in (("train", train_idx), ("test", test_idx)):
        final = split_dir / side
        tmp = split_dir / f".{side}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        _link_split([records[i] for i in idx], tmp, masks_dir, images_dir)
        _replace_dir(tmp, final)
        folders.append(final)
    write_json(record_path, split)
    return folders[0], folders[1]


def _run(cmd: list[str]) -> tuple[str, float]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        tail = f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{tail}")
    return r.stdout, wall


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", required=True, help="folder with images/ + masks/")
    p.add_argument("--work", default="results/bench_realdata", help="links, runs, predictions")
    p.add_argument("--test-fraction", type=float, default=0.2, help="held-out share of tiles")
    p.add_argument("--split-group", default=None, help="regex: its match groups source scenes")
    p.add_argument(
        "--split-seed",
        type=int,
        default=0,
        help="seed of the held-out split (default 0); --seed leaves the test tiles alone",
    )
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--samples-per-epoch", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="training seed (train.py's seed)")
    p.add_argument("--set", action="append", default=[], help="extra train.py --set values")
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args(argv)

    data = Path(args.data).resolve()
    images_dir, masks_dir = data / "images", data / "masks"
    records = read_folder_dataset(images_dir, masks_dir)
    groups = split_groups(records, args.split_group)
    train_idx, test_idx = split_indices(len(records), args.test_fraction, args.split_seed, groups)
    split = split_record(
        data, records, train_idx, test_idx, args.test_fraction, args.split_seed, args.split_group
    )
    work = Path(args.work).resolve() / data.name
    split_dir = work / f"split-{_key(split)}"
    train_dir, test_dir = link_split(split_dir, split, records, train_idx, test_idx, data)
    print(
        f"split {split_dir.name}: {len(train_idx)} training tiles, {len(test_idx)} held out "
        f"(--test-fraction {args.test_fraction}, --split-seed {args.split_seed})"
    )

    training = {
        "seed": args.seed,
        "epochs": args.epochs,
        "samples_per_epoch": args.samples_per_epoch,
        "set": args.set,
    }
    # One run folder per split and training flags: fit() would resume (or, finished, reuse) a
    # run of this train folder's path whatever tiles it was trained on.
    run_dir = split_dir / f"run-seed{args.seed}-{_key(training)}"
    py = sys.executable
    train_cmd = [
        py,
        str(REPO / "experiments/train.py"),
        "--data",
        str(train_dir),
        "--data-root",
        str(work / "cache"),
        "--out",
        str(run_dir),
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
    # The run's own record, at full precision: the console's epoch lines are rounded, and two
    # epochs that print alike made max() name the earlier one while best.pt held the later.
    # max() keeps the first of equal scores, as the run's strict ">" keeps its best.pt.
    history = json.loads((run_dir / "history.json").read_text())
    best = max(history, key=lambda h: h["val_dice_best"])
    print(out.splitlines()[0])

    pred_dir = run_dir / "test_pred"
    _, predict_s = _run(
        [
            py,
            str(REPO / "experiments/predict.py"),
            "--checkpoint",
            str(run_dir / "best.pt"),
            "--images",
            str(test_dir / "images"),
            "--masks",
            str(test_dir / "masks"),
            "--out",
            str(pred_dir),
        ]
    )
    scores = json.loads((pred_dir / "scores.json").read_text())
    interval = test_interval(scores, records, test_idx, groups, images_dir)
    row = {
        "dataset": data.name,
        "seed": args.seed,
        "split_seed": args.split_seed,
        "test_fraction": args.test_fraction,
        "split_group": args.split_group,
        "split": split_dir.name,
        "train_tiles": len(train_idx),
        "test_tiles": len(test_idx),
        "test_scenes": len({groups[i] for i in test_idx}),
        "epochs": args.epochs,
        "train_s": round(train_s, 1),  # this call's: a run trained before is only read
        "run_epoch_s": round(sum(h["epoch_s"] for h in history), 1),  # its epochs, whenever
        "best_epoch": best["epoch"],
        "val_dice_best": best["val_dice_best"],
        "val_thr_best": best["val_thr_best"],
        "test_official_score": scores.get("official_score"),
        # 95% bootstrap over the held-out source scenes (few scenes: a wide interval)
        "test_official_low": interval.low,
        "test_official_high": interval.high,
        "test_scenes_scored": interval.clusters,
        "test_pixel_iou": scores.get("pixel_iou"),
        "test_pixel_f1": scores.get("pixel_f1"),
        "predict_s": round(predict_s, 1),
    }
    width = max(len(k) for k in row)
    for k, v in row.items():
        shown = f"{v:.4f}" if isinstance(v, float) and not k.endswith(("_s", "fraction")) else v
        print(f"{k:<{width}}  {shown}")
    dice = [h["val_dice_best"] for h in history]
    print(f"validation Dice by epoch: {np.round(dice, 3).tolist()}")
    if args.json:
        record = {**row, "run_dir": str(run_dir), "history": history}
        write_json(args.json, record)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

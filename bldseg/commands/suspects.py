"""Ranks training images by how much a trained model disagrees with their masks (wrong GT).

    bldseg suspects --checkpoint runs/single/best.pt --out runs/suspects
    python experiments/find_suspects.py --checkpoint runs/single/best.pt --out runs/suspects

    bldseg suspects --checkpoint runs/kfold --out runs/suspects   # a K-fold run (--folds K)

With a K-fold run (its folder or ``folds.json``) every image is scored by the fold model that
held it out, at that fold's threshold: no model judges masks it was trained on. Which fold held
out which image is read from the run's libraries, so the --group-column it was trained with
need not be passed again.

Images are ranked by a smoothed Dice of the model's mask and the given one (--smooth pixels
added to both sides): a few stray predicted pixels on an empty mask do not outrank a building
left out of a mask.

Without --data the images ranked are those of the data the model was trained on, as recorded in
best.pt (or folds.json) by bldseg train (a line says which); data no longer where it was is
refused, asking for --data. Models trained on the built-in synthetic world rank its images,
under --data-root. A --data other than the recorded one is ranked, with a warning naming both.
The model's own data (--data left out, or naming it) is read as in training: the data flags it
was trained with (--mask-values, --mask-colors, --tile-size, --masks, --mask-pattern, ...,
recorded in best.pt) apply without being typed again; a flag given wins, with a warning when it
differs from the record. Checkpoints from before that record read it with the flags given, with
a warning.

Writes suspects.csv (most suspect first) and suspects.png (contact sheet of the top ones). On
the synthetic world, whose train_noise.csv records the injected label noise, it also prints
precision@k: the share of truly noisy masks among the top k (k = number of noisy images).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bldseg.commands import USER_ERRORS, fail, interruptible
from bldseg.commands.prepare import cannot_write
from bldseg.data.prepare import (
    MASK_READ_NAMES,
    DataOptions,
    add_data_arguments,
    choose_data_options,
    data_options,
    describe_options,
    detect_data,
    flat_options,
    given_data_options,
    prepare_data,
    recorded_options_read_by,
)
from bldseg.data.readers import DEFAULT_READ
from bldseg.predict import (
    DataUse,
    choose_recorded_data,
    dataset_of,
    load_checkpoint,
    recorded_data,
    recorded_data_options,
    resolve_member,
)
from bldseg.train.engine import eval_autocast
from bldseg.train.folds import FOLDS_FILE, fold_dir, held_out_folds
from bldseg.train.suspects import (
    DEFAULT_SMOOTH,
    precision_at_k,
    rank_suspects,
    rank_suspects_oof,
    write_suspects,
)

#: What suspects reads of a dataset, in its messages about the data the model recorded.
TRAINING_IMAGES = DataUse(
    verb="rank",
    doing="ranking",
    part="training images",
    forms="a competition folder, an image/mask folder or a bldseg cache",
    folders_hint=", or the folders again with --images/--masks",
)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The flags of ``bldseg suspects`` (``experiments/find_suspects.py``).

    Args:
        prog: Program name in the usage line (default: the running script's name).
    """
    p = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="best.pt of a trained model, or a K-fold run's folder / folds.json (out of fold)",
    )
    add_data_arguments(
        p,
        # the training flags' default (the synthetic world) is not this command's: see main
        data_help="competition folder (train.csv), image/mask folder (images/ + masks/), or a "
        "bldseg cache, whose training images to rank; default: the data the model was trained "
        "on, recorded in best.pt / folds.json (the built-in synthetic world for models trained "
        "on it)",
    )
    # None tells "not given": the recorded data is then read as the model's training data was
    # (the other data flags already default to None, or False for a switch).
    p.set_defaults(alpha=None, mask_threshold=None)
    p.add_argument("--out", required=True, help="folder for suspects.csv / suspects.png")
    p.add_argument("--top", type=int, default=12, help="images in the contact sheet")
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="binarisation threshold (default: the checkpoint's chosen one)",
    )
    p.add_argument(
        "--smooth",
        type=float,
        default=DEFAULT_SMOOTH,
        help="pixels added to both sides of the ranking's Dice: disagreements much smaller "
        "than this barely count (0: the plain Dice, where one stray pixel on an empty mask "
        "ranks first)",
    )
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Ranks and writes the suspects; returns the exit status (1 with a message for bad input,
    130 after Ctrl-C).

    Args:
        argv: Arguments after the command (default: ``sys.argv[1:]``).
        prog: Program name in the usage line.
    """
    p = build_parser(prog)
    args = p.parse_args(argv)
    if args.top < 1:  # before suspects.csv is written and the contact sheet fails on it
        p.error(f"--top {args.top}: at least 1 image in the contact sheet")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        p.error(f"--threshold {args.threshold}: a threshold is a probability in [0, 1]")
    if not args.smooth >= 0:
        p.error(f"--smooth {args.smooth}: the Dice smoothing is at least 0 pixels")
    written: list[Path] = []  # suspects.csv and .png, once in place
    return interruptible(
        p.prog, lambda: _suspects(args, written), lambda _: _interrupted(args, written)
    )


def _interrupted(args: argparse.Namespace, written: list[Path]) -> str:
    """What an interrupted ``bldseg suspects`` says it wrote."""
    if written:
        return f"{' and '.join(map(str, written))} were written (only what it prints was cut short)"
    # write_suspects renames both files into place at its very end, the CSV last
    return (
        f"nothing was written to --out {args.out} (a suspects.csv there is an earlier run's); "
        "run the same command again"
    )


def _suspects(args: argparse.Namespace, written: list[Path]) -> int:
    """Ranks and writes the suspects (``main`` after its flags are checked); appends the files
    to ``written`` once they are in place."""
    member = resolve_member(args.checkpoint)
    if not member.is_file():  # before the data is prepared, which can take minutes
        return fail(FileNotFoundError(f"checkpoint not found: {member}"))
    info = None
    given = given_data_options(args)
    args.alpha = args.alpha or DEFAULT_READ.alpha  # the flags left out, at their defaults
    if args.mask_threshold is None:
        args.mask_threshold = DEFAULT_READ.mask_threshold
    options = data_options(args)
    # --images (a training layout) names the images itself; fit records no --data for it
    if args.images is None:
        try:
            args.data, info, warning = choose_recorded_data(
                args.data, [str(member)], TRAINING_IMAGES
            )
            options, read_info, read_warnings = _recorded_options(args, member, given, options)
        except USER_ERRORS as e:
            return fail(e)
        for line in [warning, *read_warnings]:
            if line:
                print(line, file=sys.stderr)
        for line in (info, read_info):
            if line:
                print(line)
    try:
        data = prepare_data(args.data, options=options, data_root=args.data_root, verbose=True)
    except USER_ERRORS as e:
        # the message names --data, which the user did not type: say where it came from
        if info:
            return fail(f"{e} (the recorded data {member} was trained on; pass --data)")
        return fail(e)
    except OSError as e:  # the caches are written under --data-root
        return fail(cannot_write(e, "--data-root", args.data_root))
    try:
        if member.name == FOLDS_FILE:
            folds, held_out = _load_folds(member, data.train.ids, args.threshold)
            print(f"{member}: {len(folds)} folds, each image scored by the fold that held it out")
            df = rank_suspects_oof(folds, data.train, held_out, smooth=args.smooth)
            csv, png = write_suspects(df, data.train, folds, args.out, top=args.top)
        else:
            model, cfg, m = load_checkpoint(member)
            thr = args.threshold
            thr = float(m.get("val_thr_best", 0.5)) if thr is None else thr
            # as the run validated (its threshold was chosen on these maps): autocast, flips
            how = {"amp": eval_autocast(cfg.precision, torch.device("cpu")), "tta": cfg.tta}
            everything = range(len(data.train))
            df = rank_suspects(
                model, data.train, everything, threshold=thr, smooth=args.smooth, **how
            )
            csv, png = write_suspects(
                df, data.train, model, args.out, top=args.top, threshold=thr, **how
            )
    except USER_ERRORS as e:
        return fail(e)
    except OSError as e:  # a read-only --out, a file of that name, a full disk
        return fail(cannot_write(e, "--out", args.out))
    written += [csv, png]
    print(df.head(args.top).to_string(index=False))
    print(f"wrote {csv} and {png}")
    noise_csv = data.root / "train_noise.csv"
    if noise_csv.is_file():
        noise = pd.read_csv(noise_csv)
        noisy = set(noise.loc[noise["noise"] != "none", "img_id"])
        if noisy:
            k = len(noisy)
            print(
                f"precision@{k} (injected noisy masks found): "
                f"{precision_at_k(df['img_id'], noisy, k):.3f} "
                f"(random ranking: {k / len(df):.3f})"
            )
    return 0


def _recorded_options(
    args: argparse.Namespace, member: Path, given: dict, options: DataOptions
) -> tuple[DataOptions, str | None, list[str]]:
    """The options to read ``args.data`` with: ``(options, a line saying what the record chose,
    warnings)``.

    The data the model was trained on (``--data`` left out, or naming it again) is read as its
    checkpoint records it was read: its masks' values, tiles, mask names, image bands... The
    flags typed now win, each one that differs from the record with a warning naming both.
    Other data, and the synthetic world, are read with the flags as typed (``options``). A
    checkpoint from before the record reads the data with the flags typed now, with a warning
    where mask images are decoded (a model trained with --mask-values 0 ranks every mask it
    learnt from as wrong when they are read as plain binary masks).
    """
    trained = recorded_data([str(member)])[str(member)]
    if trained is None or args.data is None or dataset_of(args.data) != dataset_of(trained):
        return options, None, []
    recorded = recorded_data_options(member)
    if recorded is None:
        try:
            kind = detect_data(args.data, options)
        except FileNotFoundError:
            return options, None, []  # prepare_data says what is missing
        if kind != "folders":  # masks of a competition CSV (RLE) or a cache: none decoded
            return options, None, []
        typed = {n: given[n] for n in MASK_READ_NAMES if n in given}
        read_with = describe_options(typed) if typed else "the mask flags' defaults"
        warning = (
            f"warning: {member} records no data read options (trained before bldseg recorded "
            f"them): the masks of {args.data} are read with {read_with}; if they were read "
            "otherwise in training, pass the same --mask-values, --mask-nonzero, --mask-colors, "
            "--mask-threshold, --mask-pattern and --tile-size"
        )
        return options, None, [warning]
    recorded = recorded_options_read_by(args.data, recorded)
    chosen, differ = choose_data_options(recorded, given)
    warnings = [
        f"warning: reading {args.data} with {now}, but {member} was trained on it read with "
        f"{was} (recorded in the checkpoint); leave the flag out to read it as in training"
        for now, was in differ
    ]
    defaults, was = flat_options(DataOptions()), flat_options(recorded)
    taken = {
        n: v
        for n, v in flat_options(chosen).items()
        if n not in given and v == was[n] != defaults[n]
    }
    info = None
    if taken:
        info = (
            f"reading {args.data} as {member} was trained (recorded in the checkpoint): "
            f"{describe_options(taken)}"
        )
    return chosen, info, warnings


def _load_folds(
    manifest_path: Path, ids: list[str], threshold: float | None
) -> tuple[list, np.ndarray]:
    """``(model, config, threshold)`` of every fold of a K-fold run trained on these images,
    and the fold that held out each image (as the run recorded it: its libraries).

    Raises:
        FileNotFoundError: A fold's ``best.pt`` or validation library is missing.
        ValueError: The run's libraries name other images than the data's (its folds were
            drawn on another dataset).
    """
    manifest = json.loads(manifest_path.read_text())
    if "folds" not in manifest:
        raise ValueError(f"{manifest_path} is not a K-fold run manifest (no 'folds' entry)")
    run = manifest_path.parent
    k = int(manifest["folds"])
    # Before the models load: the data's images against the run's, and who held out whom.
    held_out = held_out_folds(run, k, ids)
    folds = []
    for f in range(k):
        ckpt = fold_dir(run, f) / "best.pt"
        if not ckpt.is_file():
            raise FileNotFoundError(f"{run}: fold {f} has no {ckpt}; finish training it first")
        model, cfg, m = load_checkpoint(ckpt)
        thr = float(m.get("val_thr_best", 0.5)) if threshold is None else threshold
        folds.append((model, cfg, thr))
    return folds, held_out

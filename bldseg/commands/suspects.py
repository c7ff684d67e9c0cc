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

Without --data (and --images) the images ranked are those of the data the model was trained on,
as recorded in best.pt (or folds.json) by bldseg train (a line says which): its --data, or the
--images/--masks folders it was trained on; data no longer where it was is refused, naming it
and the flags it was read with. Models trained on the built-in synthetic world rank its images,
under --data-root. A --data (or --images) other than the recorded one is ranked, with a warning
naming both.
The model's own data (--data and --images left out, or naming it: the recorded dataset or image
folder) is read as in training: the data flags it was trained with (--mask-values,
--mask-colors, --tile-size, --masks, --mask-pattern, ..., recorded in best.pt) apply without
being typed again; a flag given wins, with a warning when it differs from the record. Other
data (the model's own moved elsewhere, too) is read with the flags given, with a warning naming
the recorded flags not given. Checkpoints from before that record read it with the flags given,
with a warning.

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

from bldseg.commands import USER_ERRORS, fail, interruptible, warn_job_relative_paths
from bldseg.commands.prepare import cannot_write
from bldseg.data.prepare import (
    DataOptions,
    add_data_arguments,
    choose_data_options,
    data_options,
    describe_options,
    detect_data,
    flat_options,
    folder_layout,
    given_data_options,
    prepare_data,
    recorded_flags_left_out,
    recorded_folders,
    recorded_options_read_by,
)
from bldseg.data.readers import DEFAULT_READ
from bldseg.predict import (
    DataUse,
    choose_recorded_data,
    dataset_of,
    load_checkpoint,
    member_data_kind,
    recorded_data,
    recorded_data_options,
    resolve_member,
)
from bldseg.train.engine import eval_autocast
from bldseg.train.folds import FOLDS_FILE, fold_dir, held_out_folds, unfinished_folds_problem
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
    data_flags=True,
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
        "ranks first; default %(default)g)",
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
    # as flags, before ReadOptions refuses them by its field names
    if args.mask_nonzero and args.mask_values is not None:
        p.error("give --mask-values or --mask-nonzero, not both")
    if args.mask_threshold is not None and not 0.0 < args.mask_threshold < 1.0:
        p.error(f"--mask-threshold {args.mask_threshold}: a fraction of the range, in (0, 1)")
    warn_job_relative_paths(p.prog, {"--out": args.out, "--data-root": args.data_root})
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
    given = given_data_options(args)
    args.alpha = args.alpha or DEFAULT_READ.alpha  # the flags left out, at their defaults
    if args.mask_threshold is None:
        args.mask_threshold = DEFAULT_READ.mask_threshold
    try:
        options, lines, warnings, source = _choose_data(args, member, given, data_options(args))
    except USER_ERRORS as e:
        return fail(e)
    for line in warnings:
        print(line, file=sys.stderr)
    for line in lines:
        print(line)
    try:
        data = prepare_data(
            args.data, options=options, data_root=args.data_root, verbose=True, test_split=False
        )
    except USER_ERRORS as e:
        # the message names --data or folders, which the user did not type: say where from
        if source:
            return fail(f"{e} ({source})")
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


def _choose_data(
    args: argparse.Namespace, member: Path, given: dict, typed: DataOptions
) -> tuple[DataOptions, list[str], list[str], str | None]:
    """The data to rank and the options to read it with: sets ``args.data`` where the record
    names it; returns ``(options, lines saying what the record chose, warnings, where the data
    came from when the user did not type it)``.

    The data the model was trained on is read as its checkpoint records it was read: its masks'
    values, tiles, mask names, image bands... It is the model's own data when --data and
    --images are left out (the recorded --data, or the recorded --images/--masks folders), when
    --data names the recorded dataset, or when --images names the recorded image folder. The
    flags typed now win, each one that differs from the record with a warning naming both.

    Other data, and the synthetic world, are read with the flags as typed (``typed``): the
    record says how the model's data was read, not how another is. Where the record holds flags
    that were not typed again, a warning names them (the data may be the model's own, moved).
    A checkpoint from before the record reads the data with the flags typed now, with a warning
    where mask images are decoded (a model trained with --mask-values 0 ranks every mask it
    learnt from as wrong when they are read as plain binary masks).

    Raises:
        FileNotFoundError: The recorded data (or folders) no longer exists (names the flags it
            was read with).
        ValueError: The record is not one bldseg writes, or the options chosen do not fit.
    """
    recorded = recorded_data_options(member)
    trained = recorded_data([str(member)])[str(member)]
    folders = {} if recorded is None else recorded_folders(recorded)
    lines, warnings, source = [], [], None
    if args.images is None and args.data is None and folders:
        # fit records no --data for a training layout given by --images: its folders are read
        missing = [path for path in folders.values() if not Path(path).exists()]
        if missing:
            flags = recorded_flags_left_out(recorded, kind="folders")
            raise FileNotFoundError(
                f"{' and '.join(missing)}, of the folders {member} was trained on "
                f"({describe_options(folders)}, recorded in the checkpoint), "
                f"{'no longer exists' if len(missing) == 1 else 'no longer exist'}; pass "
                "--images and --masks (or --footprints) with their new place"
                + (
                    f", and the flags they were read with, {flags}, if they are read alike"
                    if flags
                    else ""
                )
            )
        lines.append(
            f"no --data given: ranking the training images of {describe_options(folders)}, "
            f"the folders {member} was trained on (recorded in the checkpoint); pass --data or "
            "--images to rank others"
        )
        source = f"the recorded folders {member} was trained on; pass --images and --masks"
        own = True
    elif args.images is None:
        args.data, info, warning = choose_recorded_data(args.data, [str(member)], TRAINING_IMAGES)
        warnings += [warning] if warning else []
        if info:
            lines.append(info)
            source = f"the recorded data {member} was trained on; pass --data"
        own = (
            trained is not None
            and args.data is not None
            and dataset_of(args.data) == dataset_of(trained)
        )
    else:
        own = False
    # The same image folder named otherwise (--images DATA/images for a model trained on
    # --data DATA, --data DIR for one trained on --images DIR/images) is the model's own data.
    layout = _folders_read(trained, recorded or DataOptions())
    if not own and layout is not None:
        own = (_folders_read(args.data, typed) or {}).get("images") == layout["images"]
    flags_typed = {n: v for n, v in given.items() if n not in _FOLDER_NAMES}
    if recorded is None:
        warnings += _unrecorded_warning(args, member, own, flags_typed, typed)
        return typed, lines, warnings, source
    if not own:
        warnings += _other_data_warnings(args, member, trained, folders, recorded, typed)
        return typed, lines, warnings, source
    # Folders typed that the record reads (another spelling: a symlink, a relative path,
    # DATA/images for --data DATA) repeat it: they are read from the record, without a warning.
    if layout is not None:
        given = {
            n: v
            for n, v in given.items()
            if n not in _FOLDER_NAMES or Path(v).resolve() != layout.get(n)
        }
        if args.data is None and recorded.images is None:
            args.data = trained  # --images DATA/images: the recorded --data DATA finds them
    recorded = recorded_options_read_by(args.data, recorded)
    chosen, differ = choose_data_options(recorded, given)
    name = args.data if args.data is not None else chosen.images
    warnings += [
        f"warning: reading {name} with {now}, but {member} was trained on it read with "
        f"{was} (recorded in the checkpoint); leave the flag out to read it as in training"
        for now, was in differ
    ]
    defaults, was = flat_options(DataOptions()), flat_options(recorded)
    taken = {
        n: v
        for n, v in flat_options(chosen).items()
        if n not in given and n not in folders and v == was[n] != defaults[n]
    }
    if taken:
        lines.append(
            f"reading {name} as {member} was trained (recorded in the checkpoint): "
            f"{describe_options(taken)}"
        )
    return chosen, lines, warnings, source


_FOLDER_NAMES = ("images", "masks", "footprints")


def _folders_read(data: str | None, options: DataOptions) -> dict[str, Path] | None:
    """The folders an image/mask folder dataset is read from (name -> resolved path: images,
    and masks or footprints where found); None for other kinds of data, and data not found."""
    try:
        if detect_data(data, options) != "folders":
            return None
        images, masks, footprints = folder_layout(data, options)
    except FileNotFoundError:
        return None
    found = {"images": images, "masks": masks, "footprints": footprints}
    return {n: v for n, v in found.items() if v is not None}


def _unrecorded_warning(
    args: argparse.Namespace, member: Path, own: bool, flags_typed: dict, typed: DataOptions
) -> list[str]:
    """The warning that a checkpoint from before the record reads its own data (as far as can
    be told: its recorded --data, or any --images for a model trained on folders given by
    --images) with the flags typed now, where mask images are decoded."""
    unnamed = args.images is not None and member_data_kind(member) == "folders"
    if not (own or unnamed):
        return []
    try:
        kind = detect_data(args.data, typed)
    except FileNotFoundError:
        return []  # prepare_data says what is missing
    if kind != "folders":  # masks of a competition CSV (RLE) or a cache: none decoded
        return []
    read_with = (
        f"{describe_options(flags_typed)} (the other data flags at their defaults)"
        if flags_typed
        else "the data flags' defaults"
    )
    name = args.images if args.images is not None else args.data
    return [
        f"warning: {member} records no data read options (trained before bldseg recorded "
        f"them): {name} is read with {read_with}; if it was read otherwise in training, pass "
        "the same --mask-values, --mask-nonzero, --mask-colors, --mask-threshold, "
        "--mask-pattern and --tile-size"
    ]


def _other_data_warnings(
    args: argparse.Namespace,
    member: Path,
    trained: str | None,
    folders: dict,
    recorded: DataOptions,
    typed: DataOptions,
) -> list[str]:
    """The warnings for data other than the model's own: which data it was trained on (where
    :func:`~bldseg.predict.choose_recorded_data` did not say it), and the recorded flags not
    typed again, which are not applied to other data (a dataset that has moved is other data,
    and read with the flags typed)."""
    if args.images is not None:
        what, flag = f"--images {args.images}", "--images"
    elif args.data is not None:
        what, flag = f"--data {args.data}", "--data"
    else:
        return []  # the synthetic world, as recorded
    warnings = []
    # choose_recorded_data named the recorded --data beside a --data given; not folders
    if folders and (args.images is not None or trained is None):
        where = describe_options(folders)
    elif trained is not None and args.images is not None:
        where = f"--data {trained}"
    else:
        where = None
    if where:
        warnings.append(
            f"warning: ranking the training images of {what}, but {member} was trained on "
            f"{where} (recorded in the checkpoint); leave {flag} out to rank those"
        )
    try:
        kind = detect_data(args.data, typed)
    except FileNotFoundError:
        return warnings  # prepare_data says what is missing
    flags = recorded_flags_left_out(recorded, typed, kind)
    if flags:
        warnings.append(
            f"warning: {member} was trained on data read with {flags} (recorded in the "
            f"checkpoint), which applies to that data only; {what} is read with the flags "
            "given: pass those flags too if it is read alike (the same data moved, or a copy)"
        )
    return warnings


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
    if (problem := unfinished_folds_problem(manifest_path, manifest)) is not None:
        raise ValueError(problem)  # a fold still training would rank its images
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

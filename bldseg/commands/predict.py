"""Predicts with a model checkpoint or an ensemble spec: a submission CSV, or mask files.

A dataset's test split -> submission CSV (scored when the dataset has held-out truth):

    bldseg predict --checkpoint runs/.../best.pt            # one model
    bldseg predict --ensemble results/best_ensemble.json    # an ensemble
    bldseg predict --checkpoint a.pt --data /path/to/comp --out submission.csv

A folder of images (any size, sub-folders mirrored) -> one mask per image in --out:

    bldseg predict --checkpoint a.pt --images scenes/ --out masks/
    bldseg predict --ensemble e.json --images tiles/ --masks gt/ --out masks/

From a checkout, python experiments/predict.py takes the same flags.

Each mask is NAME.png (one channel, 0/255) beside the image's relative path; a georeferenced
GeoTIFF also gets NAME.tif with its georeference (CRS and transform, or ground control points,
or RPCs). Images larger than the window are predicted in overlapping windows (--window, default
each model's validation tile; --overlap, default 0.25 of the window; the last row/column shifted
inwards) whose probabilities are blended with weights falling linearly from each window's centre
to its edge (floor 0.05), so each pixel is decided mostly by the window that sees it most
centrally. Images smaller than the window are padded by reflection. With --masks, the official score
(mean per-image Dice), the pixel IoU and F1 are printed and written to OUT/scores.json; the masks
are decoded as the model's training masks were (--mask-values, --mask-nonzero, --mask-colors,
--mask-threshold, recorded in best.pt by bldseg train; a flag given wins, with a warning when it
differs from the record; members recorded otherwise are refused unless the flags given choose
wherever they differ: the mask values (--mask-values, --mask-nonzero or --mask-colors) and the
--mask-threshold; checkpoints that record none read them with the flags' defaults, with a
warning), and every mask is read before any prediction is written. The files written are listed in
OUT/.bldseg_outputs.json per image folder: a rerun of the same --images into the same --out removes
those it does not write again (masks of images no longer there, an earlier scores.json) and no other
file; another --images folder (a big job in parts) adds its masks beside the earlier ones, and is
refused if it would overwrite one of them (images of the same name in two parts). A run stopped
midway (Ctrl-C, a kill) stays marked incomplete there, with some masks new and others an earlier
run's: the next run into --out warns of it.

Images are decoded as the model's training images were (--bands, --stretch, --alpha, recorded in
best.pt by bldseg train): leave those flags out. A flag given explicitly wins, with a warning
when it differs from the record; members of an ensemble trained on images read differently are
refused. Checkpoints that record none (written before bldseg recorded it, or trained on a cache
built before caches recorded it) take the other members' record, else the flags' defaults, with
one warning naming them and what is assumed.

With --data, only the test split is read: a competition folder needs only test.csv (and its
images), or pass the test CSV itself; train.csv is neither needed nor cached. Each test image is
predicted as one square tile (images of other shapes or mixed sizes: --images DIR --out masks/).
Without --data (and --images), the test split is that of the data the model(s) were trained on,
as recorded in best.pt by bldseg train (a line says which); members recorded on different data,
or data no longer where it was, are refused, asking for --data. Models trained on the built-in
synthetic world predict its test split, under --data-root. A --data other than the recorded one
is predicted, with a warning naming both.

With one checkpoint the threshold defaults to the one chosen on its validation tiles.

Flip test-time augmentation (TTA) follows how the threshold was chosen: each member predicts as
it was validated, with --checkpoint as its run config says (tta=True), with --ensemble as its
member entry's "tta" says (written by bldseg ensemble; older specs: the spec's "tta" for every
member). --tta / --no-tta override it for every member; a one-line warning says when a member
is predicted otherwise than it was validated (unless --threshold is given).

A K-fold run (bldseg train --folds K) predicts as one model: pass its folder or its
folds.json as --checkpoint; the K fold models' probabilities are averaged (then quantised, as
in validation), and the threshold defaults to the one chosen on its out-of-fold maps.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import pandas as pd

from bldseg import metrics, stats
from bldseg.commands import USER_ERRORS, fail, interruptible, warn_job_relative_paths
from bldseg.data.prepare import (
    MASK_READ_NAMES,
    DataOptions,
    _colour_list,
    _int_list,
    add_data_arguments,
    choose_data_options,
    data_options,
    describe_options,
    flag_names,
    flat_options,
    given_data_options,
    option_groups,
    prepare_test_data,
    unsettled_groups,
)
from bldseg.data.readers import DEFAULT_READ
from bldseg.predict import (
    DEFAULT_OVERLAP,
    OUTPUTS_FILE,
    DataUse,
    EnsembleSpec,
    FolderPredictionInterrupted,
    check_member,
    check_overlap,
    check_window,
    choose_recorded_data,
    describe_image_read,
    image_read_flag,
    member_config,
    member_data_kind,
    predict_cache,
    predict_folder,
    recorded_data_options,
    recorded_image_read,
    score_submission,
    write_submission,
)

#: What prediction reads of a dataset, in its messages about the data the members recorded.
TEST_SPLIT = DataUse(
    verb="predict",
    doing="predicting",
    part="test split",
    forms="a competition folder, its test CSV or a bldseg cache",
    folders_hint=", or predict a folder of images with --images DIR --out masks/",
)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The flags of ``bldseg predict`` (``experiments/predict.py``); see :func:`parse_args`.

    Args:
        prog: Program name in the usage line (default: the running script's name).
    """
    p = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--checkpoint",
        action="append",
        help="best.pt of a model, or a K-fold run's folder or folds.json (repeatable)",
    )
    src.add_argument("--ensemble", help="ensemble spec JSON (from bldseg ensemble)")
    add_data_arguments(p, training=False)
    # None tells "not given": the images are then read as the model's training images were
    # (--bands and --stretch already default to None).
    p.set_defaults(alpha=None)
    p.add_argument(
        "--out",
        default=None,
        help="submission CSV to write (default submission.csv); with --images: the mask folder",
    )
    p.add_argument(
        "--threshold", type=float, default=None, help="override the threshold, in [0, 1]"
    )
    p.add_argument(
        "--min-area",
        type=int,
        default=None,
        help="images with fewer predicted pixels are predicted empty; >= 0 (0: off)",
    )
    p.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="flip test-time augmentation on or off for every member, overriding how each was "
        "validated (default: each member as the threshold was chosen: --checkpoint: as its run "
        "config's tta; --ensemble: as its member entry's \"tta\" in the spec)",
    )
    p.add_argument(
        "--truth",
        default=None,
        help="ground-truth CSV (img_id, mask_rle; height, width optional) to score the "
        "submission against; checked before anything is predicted",
    )
    f = p.add_argument_group("folder prediction (--images)")
    f.add_argument(
        "--masks",
        default=None,
        help="ground-truth mask folder: score the predictions (same relative paths and names "
        "as the images, see --mask-pattern); decoded as the model's training masks were "
        "(recorded in best.pt), unless the mask flags below are given",
    )
    f.add_argument(
        "--mask-pattern",
        default=None,
        help="mask file name for an image stem, e.g. '{stem}_mask.png', or a regex "
        "substitution '(\\d+)_img=>\\1.png' (default: {stem}.png, {stem}.tif, "
        "{stem}_mask.png, ...; exactly one must exist)",
    )
    # How --masks are decoded, as for training (bldseg train); their defaults are those of
    # training, the record in best.pt taking their place when they are left out (--masks' help).
    f.add_argument(
        "--mask-values",
        type=_int_list,
        default=None,
        help="--masks: mask values / palette indices that are buildings, e.g. 1,2 (default: "
        "binary masks as they are; label masks are refused, naming this flag and "
        "--mask-nonzero)",
    )
    f.add_argument(
        "--mask-nonzero",
        action="store_true",
        help="--masks: every nonzero mask value is a building: instance-id masks (each "
        "building numbered 1..N), which are refused without it",
    )
    f.add_argument(
        "--mask-colors",
        type=_colour_list,
        default=None,
        help="--masks: colour-coded class masks: RGB colours that are buildings, e.g. "
        "'0,0,255' (ISPRS); several separated by ';'",
    )
    f.add_argument(
        "--mask-threshold",
        type=float,
        default=None,
        help="--masks: non-binary masks (antialiased, JPEG) are binarised at this fraction of "
        "their range (default: as recorded in best.pt, else 0.5)",
    )
    f.add_argument(
        "--window",
        type=int,
        default=None,
        help="sliding-window side in px, >= 32 (default: each model's validation tile, "
        "val_tile or else aug.crop_size)",
    )
    f.add_argument(
        "--overlap",
        type=float,
        default=None,
        help=f"fraction of the window shared by neighbouring windows, 0..0.9 (default "
        f"{DEFAULT_OVERLAP}); overlaps are blended with centre-weighted (triangular) weights",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="tiles (or windows) per batch (default 16, as the pipeline's test maps; under bf16 "
        "autocast other sizes move about 0.03%% of the pixels by one probability level)",
    )
    p.add_argument("--device", default="auto")
    return p


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    """The command line, checked: every refusal names the flag.

    Args:
        argv: Arguments after the command (default: ``sys.argv[1:]``).
        prog: Program name in the usage line.

    Raises:
        SystemExit: A flag is missing, invalid or does not fit the others (status 2).
    """
    p = build_parser(prog)
    args = p.parse_args(argv)
    # Outside [0, 1] (or NaN) every pixel falls on one side: an all-empty or all-building run.
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        p.error(f"--threshold {args.threshold}: a threshold is a probability in [0, 1]")
    if args.batch_size < 1:
        p.error(f"--batch-size {args.batch_size}: at least 1")
    if args.min_area is not None and args.min_area < 0:
        p.error(f"--min-area {args.min_area}: a number of pixels, at least 0 (0: off)")
    _check_device(p, args.device)

    mask_reading = [
        ("--mask-pattern", args.mask_pattern),
        ("--mask-values", args.mask_values),
        ("--mask-nonzero", args.mask_nonzero or None),
        ("--mask-colors", args.mask_colors),
        ("--mask-threshold", args.mask_threshold),
    ]
    folder_only = [
        ("--masks", args.masks),
        *mask_reading,
        ("--window", args.window),
        ("--overlap", args.overlap),
    ]
    if args.images is None:
        for flag, value in folder_only:
            if value is not None:
                p.error(f"{flag} applies to folder prediction: pass --images DIR with it")
        if args.tile_size is not None:
            p.error(
                "--tile-size cuts training data; prediction takes each test image whole as one "
                "tile (images of mixed sizes or large scenes: --images DIR --out masks/)"
            )
        if args.truth is not None:
            _check_truth(p, args.truth)
        _check_out(p, args.out or "submission.csv", folder=False)
        _check_out_spares_inputs(p, args)
        return args
    if args.data is not None:
        p.error("give --data (a dataset's test split -> CSV) or --images (a folder -> masks)")
    if args.truth is not None:
        p.error("--truth scores a submission CSV; with --images score with --masks DIR")
    if args.tile_size is not None:
        p.error("--tile-size cuts training data; with --images set the --window instead")
    if args.out is None:
        p.error("--images needs --out DIR, the folder for the masks")
    if args.out.lower().endswith(".csv"):
        p.error(f"--out {args.out}: with --images, --out is a folder for the mask files, not a CSV")
    _check_out(p, args.out, folder=True)
    _check_out_spares_inputs(p, args)
    for flag, value in mask_reading:
        if value is not None and args.masks is None:
            p.error(f"{flag} says how to find or read ground-truth masks: pass --masks DIR with it")
    if args.mask_nonzero and args.mask_values is not None:
        p.error("give --mask-values or --mask-nonzero, not both")
    # None tells "not given": the masks are then read as the model's training masks were
    if args.mask_threshold is not None and not 0.0 < args.mask_threshold < 1.0:
        p.error(f"--mask-threshold {args.mask_threshold}: a fraction of the range, in (0, 1)")
    try:
        if args.window is not None:
            check_window(args.window)
        if args.overlap is not None:
            check_overlap(args.overlap)
    except ValueError as e:
        p.error(str(e))
    return args


def _check_truth(p: argparse.ArgumentParser, truth: str) -> None:
    """Refuses a --truth that could not be scored against, before the test split is predicted
    (and the submission CSV overwritten): a folder, a missing file, or a file whose header lacks
    the columns :func:`~bldseg.metrics.score_csv` matches (only the header is read here).

    Args:
        p: The parser (its ``error`` exits with status 2).
        truth: The ground-truth CSV.
    """
    path = Path(truth)
    if path.is_dir():
        inside = path / "test_truth.csv"  # the synthetic world's held-out truth
        e_g = f", e.g. {inside}" if inside.is_file() else ""
        p.error(f"--truth {truth} is a folder; pass the truth CSV (img_id,mask_rle){e_g}")
    if not path.exists():
        p.error(f"--truth {truth}: no such file; pass the ground-truth CSV (img_id,mask_rle)")
    try:
        # as metrics reads it (a BOM, quoted names), but the header only
        columns = list(pd.read_csv(path, nrows=0, dtype=str).columns)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        p.error(f"--truth {truth}: cannot read it as a CSV ({e})")
    except OSError as e:  # unreadable: permissions, a special file
        p.error(f"--truth {truth}: cannot read it ({e.strerror or e})")
    absent = [c for c in ("img_id", "mask_rle") if c not in columns]
    if absent:
        p.error(
            f"--truth {truth} has no {' and no '.join(absent)} column (its columns: "
            f"{', '.join(columns)}); a truth CSV has img_id and mask_rle (height and width "
            "optional)"
        )


def _truth_of_other_images(truth: str, ids: list[str], data: str | None) -> str | None:
    """Why --truth cannot score the test split about to be predicted, when none of its images
    is among the split's (another split's truth, such as train.csv), or None.

    Scoring would only say that the submission lacks the truth's ids, as if the images were
    left out of it. A truth that covers the split only in part is refused too: scoring needs a
    truth row for every submission row and refused it after the whole split was predicted.

    Args:
        truth: The --truth CSV (its header checked by :func:`_check_truth`).
        ids: The test split's image ids, in the submission's order.
        data: The dataset they come from (--data, or the recorded data), for the message.
    """
    try:
        # ids as text, as metrics reads them: "0007" and "NA" stay themselves
        found = pd.read_csv(truth, usecols=["img_id"], dtype=str, keep_default_na=False)
    except (ValueError, OSError, UnicodeDecodeError) as e:  # ParserError is a ValueError
        return f"--truth {truth}: cannot read it as a CSV ({e})"
    truth_ids = found["img_id"].tolist()
    if not truth_ids:
        return f"--truth {truth} has no rows: there is no image to score against"
    truth_set, test_set = set(truth_ids), set(ids)
    if len(truth_set) < len(truth_ids):  # the scoring refuses them, after the prediction
        seen: set[str] = set()
        twice = next(i for i in truth_ids if i in seen or seen.add(i))
        return f"--truth {truth} has img_id {twice!r} in more than one row: keep one"
    if truth_set == test_set:
        return None
    if truth_set & test_set:
        untrue = [i for i in ids if i not in truth_set]
        other = [i for i in truth_ids if i not in test_set]
        parts = []
        if untrue:
            have = "has" if len(untrue) == 1 else "have"
            parts.append(
                f"{len(untrue)} of the {len(ids)} test images {have} no row in it "
                f"(e.g. {untrue[:3]})"
            )
        if other:
            name = "names" if len(other) == 1 else "name"
            parts.append(f"{len(other)} of its rows {name} no test image (e.g. {other[:3]})")
        return (
            f"--truth {truth} does not match the test split{f' of {data}' if data else ''}: "
            f"{'; '.join(parts)}; the official score needs one truth row per test image"
        )
    return (
        f"--truth {truth} is the ground truth of other images: none of its {len(truth_ids)} "
        f"img_id(s) (e.g. {truth_ids[:3]}) is among the {len(ids)} test image(s)"
        f"{f' of {data}' if data else ''} (e.g. {ids[:3]}); is it another split's truth? Pass "
        "the truth CSV of the test split"
    )


def _check_out(p: argparse.ArgumentParser, out: str, *, folder: bool) -> None:
    """Refuses an --out that could not be written, before anything is predicted.

    Args:
        p: The parser (its ``error`` exits with status 2).
        out: The submission CSV, or with ``folder`` the mask folder.
        folder: Whether ``out`` is a folder (created when missing).
    """
    path = Path(out).absolute()
    if folder and path.exists() and not path.is_dir():
        p.error(f"--out {out} is a file; with --images, --out is a folder for the mask files")
    if not folder and path.is_dir():
        p.error(f"--out {out} is a folder; name the CSV to write, e.g. {path / 'submission.csv'}")
    # The deepest folder that exists: the rest of the path is created in it.
    existing = next(a for a in (path if folder else path.parent, *path.parents) if a.exists())
    if not existing.is_dir():
        p.error(f"--out {out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        p.error(f"--out {out}: cannot write in {existing}")


def _check_device(p: argparse.ArgumentParser, device: str) -> None:
    """Refuses a --device torch does not know, or a GPU this machine lacks, before any work."""
    if device == "auto":
        return
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        p.error(f"--device {device}: use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {device}: this torch sees no CUDA GPU (use auto or cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        p.error(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")


def _check_out_spares_inputs(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuses an --out that would overwrite what the run reads: the ground truth it scores
    against (a perfect score over destroyed masks), or the dataset's CSVs."""
    if args.images is not None:
        if args.masks is None:
            return
        out, masks = Path(args.out).resolve(), Path(args.masks).resolve()
        if out == masks or masks in out.parents or out in masks.parents:
            p.error(
                f"--out {args.out} overlaps --masks {args.masks}: the predictions would "
                "overwrite the masks they are scored against; choose another folder"
            )
        return
    message = _out_overwrites_input(args, "--data")
    if message:
        p.error(message)


def _out_overwrites_input(args: argparse.Namespace, data_name: str) -> str | None:
    """Why the submission --out would overwrite the --truth or one of the dataset's CSVs, or
    None; ``data_name`` says where ``args.data`` came from (the flag, or the model's record)."""
    out = Path(args.out or "submission.csv").resolve()
    inputs = [("--truth", args.truth)]
    if args.data is not None:
        data = Path(args.data)
        folder = data if data.is_dir() else data.parent
        inputs += [
            (f"{data_name}'s {n}", folder / n) for n in ("train.csv", "test.csv", "test_truth.csv")
        ]
        inputs.append((data_name, data))
    for what, path in inputs:
        if path is not None and Path(path).resolve() == out:
            return (
                f"--out {args.out} is {what}: the submission would overwrite it; "
                "choose another file"
            )
    return None


def _choose_tta(spec: EnsembleSpec, args: argparse.Namespace) -> list[str]:
    """Sets each member's flip TTA (``spec.member_tta``); returns warnings for the members
    predicted otherwise than they were validated.

    The members' run configs say whether their validation maps, on which their thresholds
    (and an ensemble search's) were chosen, were flip-averaged. Without --tta/--no-tta each
    member predicts as it was validated: with --checkpoint as its run config says, with
    --ensemble as the spec says (per member; a spec's ``"tta"`` for members without their own).
    --tta/--no-tta set every member. A member predicted otherwise is warned about unless the
    threshold is the user's own (--threshold).
    """
    validated = [member_config(c)[0].tta for c in spec.checkpoints]
    if args.tta is not None:
        spec.tta, spec.member_tta = args.tta, [args.tta] * len(validated)
    elif not args.ensemble:
        spec.tta, spec.member_tta = all(validated), validated
    if args.threshold is not None:
        return []
    used = spec.member_ttas()
    wrong = [(c, u) for c, v, u in zip(spec.checkpoints, validated, used, strict=True) if u != v]
    out = []
    for how in (True, False):  # one line for those predicted with TTA, one for those without
        off = [c for c, u in wrong if u == how]
        if not off:
            continue
        said = "with" if how else "without"
        other = "without" if how else "with"
        if args.tta is not None:
            flag = "--tta" if args.tta else "--no-tta"
            source, fix = flag, f"leave {flag} out to predict each member as it was validated"
        else:
            entries = "its member entry" if len(off) == 1 else "their member entries"
            source = f'the spec\'s "tta": {str(how).lower()}'
            fix = f'set "tta": {str(not how).lower()} on {entries} in {args.ensemble}'
            if len(set(validated)) == 1:  # every member validated alike: one flag says it
                fix += f" (or pass {'--no-tta' if how else '--tta'})"
        out.append(
            f"warning: predicting {said} TTA ({source}), but the threshold was chosen on "
            f"validation maps made {other} it ({', '.join(off)}); {fix}, or pass a --threshold"
        )
    return out


def _unrecorded_why(unrecorded: list[str]) -> str:
    """Why these members record no image read options, in a few words (from their ``best.pt``'s
    ``data_kind``: a model trained on a cache built by an older bldseg, which kept no record of
    how its images were decoded)."""
    kinds = {member_data_kind(m) == "cache" for m in unrecorded}
    if kinds == {True}:
        return (
            "trained on a bldseg cache built by an older bldseg, which did not record how its "
            "images were decoded"
        )
    if kinds == {False}:
        return "trained before bldseg recorded them"
    return "trained before bldseg recorded them, or on a cache built before caches recorded them"


def _choose_image_read(
    args: argparse.Namespace, members: list[str], recorded: dict | None, unrecorded: list[str]
) -> tuple[str | None, list[str]]:
    """Sets ``args.alpha``, ``args.bands`` and ``args.stretch``: ``(a line saying so when the
    record, not the flags' defaults, chose them; the warnings)``.

    A flag left out reads the images as the members' training images were read (their
    checkpoints' record, :func:`~bldseg.predict.recorded_image_read`); a flag given wins, with a
    warning when it differs from the record (test imagery may need it). Members that record
    nothing (older checkpoints, models trained on an older cache) are warned about once, naming
    what is assumed for them: the other members' record, or else the defaults of the flags left
    out.
    """
    given = {
        "alpha": args.alpha,
        "bands": None if args.bands is None else tuple(args.bands),
        "stretch": None if args.stretch is None else tuple(float(v) for v in args.stretch),
    }
    defaults = {"alpha": DEFAULT_READ.alpha, "bands": None, "stretch": DEFAULT_READ.stretch}
    if recorded is None:
        warnings = []
        left_out = [n for n in ("bands", "stretch", "alpha") if given[n] is None]
        assumed = [image_read_flag(n, defaults[n]) for n in left_out]
        if unrecorded and assumed:
            # read with the defaults as before, but no longer silently: a model trained on
            # 16-bit scenes read with --bands 5,3,2 predicts noise on images read otherwise
            them = "it was" if len(unrecorded) == 1 else "they were"
            warnings.append(
                f"warning: {', '.join(unrecorded)} record(s) no image read options "
                f"({_unrecorded_why(unrecorded)}); assuming the flags' defaults: "
                f"{', '.join(assumed)}; pass --bands, --stretch and --alpha as {them} trained "
                "if they differ"
            )
        args.alpha = args.alpha or DEFAULT_READ.alpha
        return None, warnings
    recorders = [m for m in members if m not in unrecorded]
    who = f"{recorders[0]} was" if len(recorders) == 1 else f"{', '.join(recorders)} were"
    warnings = []
    if unrecorded:
        warnings.append(
            f"warning: {', '.join(unrecorded)} record(s) no image read options "
            f"({_unrecorded_why(unrecorded)}); reading the images as {who} trained: "
            f"{describe_image_read(recorded)}"
        )
    chosen = {}
    for name, value in given.items():
        chosen[name] = recorded[name] if value is None else value
        if value is not None and value != recorded[name]:
            warnings.append(
                f"warning: predicting with {image_read_flag(name, value)}, but {who} trained "
                f"on images read with {image_read_flag(name, recorded[name])}; leave the flag "
                "out to read them as in training"
            )
    args.alpha, args.bands, args.stretch = chosen["alpha"], chosen["bands"], chosen["stretch"]
    info = None
    if chosen == recorded != defaults:  # said, as the flags that were left out are not
        info = f"reading the images as {who} trained: {describe_image_read(chosen)}"
    return info, warnings


def _recorded_mask_read(members: list[str]) -> tuple[dict[str, DataOptions], list[str]]:
    """How the members' training masks were decoded, as their checkpoints record it:
    ``({member: its recorded data options}, the members that record none)``.

    Members trained on a competition CSV or the synthetic world (``data_kind``) learnt from
    run-length masks, which no mask flag decodes: they have no say in how --masks is read.
    """
    records, unrecorded = {}, []
    for member in members:
        if member_data_kind(member) in ("synthetic", "competition"):
            continue
        options = recorded_data_options(member)
        if options is None:
            unrecorded.append(member)
        else:
            records[member] = options
    return records, unrecorded


def _choose_mask_read(args: argparse.Namespace, members: list[str]) -> tuple[str | None, list[str]]:
    """Sets ``args.mask_values``, ``args.mask_nonzero``, ``args.mask_colors`` and
    ``args.mask_threshold``: ``(a line saying so when the record, not the flags' defaults,
    chose them; the warnings)``.

    The ground truth of --masks is decoded as the members' training masks were (their
    checkpoints' record, :func:`~bldseg.predict.recorded_data_options`): masks whose buildings
    are 0 (``--mask-values 0``), or colours, are scored as such without the flags typed again.
    A flag given wins, with a warning when it differs from the record. Members that record
    nothing (older checkpoints) are warned about once, naming what is assumed. Members whose
    records differ are refused unless the flags typed choose in every group of flags where
    they differ (the mask values' flags: --mask-values, --mask-nonzero or --mask-colors; and
    --mask-threshold); what they agree on is read as recorded.

    Raises:
        ValueError: Members' training masks were read differently, and the flags typed leave
            a difference open (names its flags).
    """
    given = given_data_options(args, MASK_READ_NAMES)
    if args.masks is None:  # no mask is read
        args.mask_threshold = DEFAULT_READ.mask_threshold
        return None, []
    records, unrecorded = _recorded_mask_read(members)
    mask_read = {
        m: {n: v for n, v in flat_options(o).items() if n in MASK_READ_NAMES}
        for m, o in records.items()
    }
    # The groups of flags (the mask values' flags together, the threshold) whose records
    # differ: each must be chosen by a flag, the others are read as the members agree.
    differ = unsettled_groups(list(mask_read.values()), {}, MASK_READ_NAMES)
    unsettled = unsettled_groups(list(mask_read.values()), given, MASK_READ_NAMES)
    if unsettled:
        said = "; ".join(f"{m} with {describe_options(r)}" for m, r in mask_read.items())
        still = " and ".join(flag_names(g) for g in unsettled)
        typed = f" ({describe_options(given)} leaves that open)" if given else ""
        raise ValueError(
            f"the members' training masks were read differently ({said}); pass {still} as "
            f"--masks needs {'it' if len(unsettled) == 1 and len(unsettled[0]) == 1 else 'them'}"
            f"{typed}"
        )
    chosen_by_flags = {n: v for n, v in given.items() if any(n in g for g in differ)}
    overriding = {n: v for n, v in given.items() if n not in chosen_by_flags}
    info = None
    if not records:
        if unrecorded:
            typed = describe_options(given) if given else "the mask flags' defaults"
            them = "its training masks were" if len(unrecorded) == 1 else "theirs were"
            warnings = [
                f"warning: {', '.join(unrecorded)} record(s) no mask read options (trained "
                f"before bldseg recorded them); reading --masks with {typed}; pass "
                f"--mask-values, --mask-nonzero, --mask-colors or --mask-threshold as {them} "
                "read if they differ"
            ]
        else:
            warnings = []
        chosen, _ = choose_data_options(DataOptions(), given, MASK_READ_NAMES)
    else:
        recorders = list(records)
        recorded = records[recorders[0]]  # the groups where records differ are all typed
        who = f"{recorders[0]} was" if len(recorders) == 1 else f"{', '.join(recorders)} were"
        chosen, changed = choose_data_options(recorded, overriding, MASK_READ_NAMES)
        chosen, _ = choose_data_options(chosen, chosen_by_flags, MASK_READ_NAMES)
        read = {n: v for n, v in flat_options(chosen).items() if n in MASK_READ_NAMES}
        warnings = []
        if unrecorded:
            how = "with" if given else f"as {who} trained"  # records that differ: given
            warnings.append(
                f"warning: {', '.join(unrecorded)} record(s) no mask read options (trained "
                f"before bldseg recorded them); reading --masks {how}: {describe_options(read)}"
            )
        warnings += [
            f"warning: reading --masks with {now}, but {who} trained on masks read with {was} "
            "(recorded in the checkpoint); leave the flag out to read them as in training"
            for now, was in changed
        ]
        defaults = flat_options(DataOptions())
        typed_groups = [g for g in option_groups(MASK_READ_NAMES) if any(n in given for n in g)]
        taken = {
            n: v
            for n, v in read.items()
            if v != defaults[n] and not any(n in g for g in typed_groups)
        }
        if taken:
            info = f"reading --masks as {who} trained: {describe_options(taken)}"
    read = chosen.read
    args.mask_values, args.mask_nonzero = read.mask_values, read.mask_nonzero
    args.mask_colors, args.mask_threshold = read.mask_colors, read.mask_threshold
    return info, warnings


def _decision(spec: EnsembleSpec) -> str:
    """The spec's rule in a few words, for the summary line: the parameters that
    ``scores.json`` records (:meth:`EnsembleSpec.decision`)."""
    d = spec.decision()
    if d["rule"] == "vote":
        out = f"vote >= {d['votes']} of {len(spec.checkpoints)}"
    else:
        out = f"threshold {metrics.threshold_text(d['threshold'])}"
        if d["rule"] == "weighted":
            out = "weighted " + out
    if "empty_votes" in d:
        out += f", empty if >= {d['empty_votes']} masks < {d['empty_area']} px"
    if d["min_area"]:
        out += f", empty if < {d['min_area']} px"
    return out


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Predicts; returns the exit status (1 with a message on stderr for bad input, 130 after
    Ctrl-C).

    Args:
        argv: Arguments after the command (default: ``sys.argv[1:]``).
        prog: Program name in the usage line.
    """
    args = parse_args(argv, prog)
    # the submission's default name (with --images a mask folder, which is required)
    out = args.out or (None if args.images else "submission.csv")
    paths = {"--out": out, "--data-root": args.data_root}
    warn_job_relative_paths(prog or "bldseg predict", paths)
    written: list[str] = []  # the submission CSV, once in place
    return interruptible(
        prog, lambda: _predict(args, written), lambda err: _interrupted(args, written, err)
    )


def _interrupted(args: argparse.Namespace, written: list[str], err: KeyboardInterrupt) -> str:
    """What an interrupted ``bldseg predict`` says it wrote, and how to go on."""
    if isinstance(err, FolderPredictionInterrupted):
        done, total, out = len(err.result.masks), err.total, err.result.out_dir
        return (
            f"{done} of {total} mask(s) in {out} were written by this run, the others are "
            f"missing or an earlier run's ({OUTPUTS_FILE} there marks the run incomplete); run "
            "the same command again to predict them all"
        )
    if written:  # stopped while it was scored
        return f"{written[0]} was written, but not scored; run the same command again to score it"
    if args.images is not None:  # stopped before predict_folder claimed or wrote anything
        return f"nothing was written to --out {args.out}; run the same command again"
    out = args.out or "submission.csv"
    return (
        f"{out} was not written (an earlier file of that name is as it was); run the same "
        "command again"
    )


def _predict(args: argparse.Namespace, written: list[str]) -> int:
    """Predicts (``main`` after its flags are parsed); appends the submission CSV to
    ``written`` once it is in place."""
    try:
        if args.ensemble:
            spec = EnsembleSpec.load(args.ensemble)
        else:
            # every member checked before any is run over the test set
            members = [str(check_member(c)) for c in args.checkpoint]
            _, m = member_config(members[0])
            spec = EnsembleSpec(members, threshold=float(m.get("val_thr_best", 0.5)))
            if len(members) > 1 and args.threshold is None:
                print(
                    f"threshold {metrics.threshold_text(spec.threshold)} is {members[0]}'s own "
                    "validation threshold, not one chosen for this mean of members; pass "
                    "--threshold, or use `bldseg ensemble` to choose one on validation data"
                )
    except USER_ERRORS as e:
        return fail(e)
    if args.threshold is not None:
        if spec.rule == "vote":
            return fail(
                f"--threshold sets the threshold of a mean ensemble, but {args.ensemble} votes "
                f"(>= {spec.votes} of {len(spec.checkpoints)} members' masks); edit its "
                "member thresholds or votes instead"
            )
        spec.threshold = args.threshold
    if args.min_area is not None:
        spec.min_area = args.min_area
    try:
        tta_warnings = _choose_tta(spec, args)
    except USER_ERRORS as e:
        return fail(e)
    for line in tta_warnings:
        print(line, file=sys.stderr)
    try:
        recorded, unrecorded = recorded_image_read(spec.checkpoints)
    except USER_ERRORS as e:
        return fail(e)
    info, warnings = _choose_image_read(args, spec.checkpoints, recorded, unrecorded)
    try:
        mask_info, mask_warnings = _choose_mask_read(args, spec.checkpoints)
    except USER_ERRORS as e:
        return fail(e)
    for line in warnings + mask_warnings:
        print(line, file=sys.stderr)
    for line in (info, mask_info):
        if line:
            print(line)
    taken = False  # whether --data came from the members' record
    if args.images is None:
        try:
            args.data, info, warning = choose_recorded_data(args.data, spec.checkpoints, TEST_SPLIT)
        except USER_ERRORS as e:
            return fail(e)
        if warning:
            print(warning, file=sys.stderr)
        if info:
            taken = True
            print(info)
            # checked in parse_args for a --data given; the recorded one is known only now
            message = _out_overwrites_input(args, "the recorded data")
            if message:
                return fail(message)
    options = data_options(args)
    t0 = time.perf_counter()

    if args.images is not None:
        try:
            r = predict_folder(
                spec,
                args.images,
                args.out,
                options=options.read,
                window=args.window,
                overlap=DEFAULT_OVERLAP if args.overlap is None else args.overlap,
                recursive=options.recursive,
                masks_dir=args.masks,
                mask_pattern=args.mask_pattern,
                batch_size=args.batch_size,
                device=args.device,
            )
        except (*USER_ERRORS, OSError) as e:  # OSError: an output that cannot be written
            return fail(e)
        geotiffs = f" + {len(r.geotiffs)} GeoTIFF(s)" if r.geotiffs else ""
        if r.nodata_pixels:
            print(
                f"{r.nodata_pixels} pixel(s) of the GeoTIFF scenes have no data (nodata, mask "
                "or alpha): predicted as no building, and no-data in the GeoTIFF masks"
            )
        print(
            f"wrote {len(r.masks)} mask(s){geotiffs} to {r.out_dir}: {r.empty} empty, "
            f"{len(spec.checkpoints)} model(s), {_decision(spec)}, "
            f"{time.perf_counter() - t0:.1f} s"
        )
        if r.scores is not None:
            s = r.scores
            print(
                f"official score (mean Dice over {s['n_scored']} of {s['n_images']} images): "
                f"{s['official_score']:.5f}; pixel IoU {s['pixel_iou']:.5f}, "
                f"pixel F1 {s['pixel_f1']:.5f} -> {Path(r.out_dir) / 'scores.json'}"
            )
        return 0

    out = args.out or "submission.csv"
    try:
        data = prepare_test_data(args.data, options=options, data_root=args.data_root, verbose=True)
    except USER_ERRORS as e:
        # the message names --data, which the user did not type: say where it came from
        if taken:
            return fail(f"{e} (the recorded data the model(s) were trained on; pass --data)")
        return fail(e)
    if args.truth is not None:
        # before the test split is predicted and the submission overwritten
        message = _truth_of_other_images(args.truth, data.test.ids, args.data)
        if message:
            return fail(message)
    try:
        pred = predict_cache(spec, data.test, batch_size=args.batch_size, device=args.device)
    except USER_ERRORS as e:
        return fail(e)
    try:
        write_submission(data.test.ids, pred, out)
    except OSError as e:  # checked in parse_args, but the disk can fill or the folder change
        return fail(f"writing {out}: {e}")
    written.append(out)
    print(
        f"wrote {out}: {len(pred)} tiles, {int((pred.sum((1, 2)) == 0).sum())} empty, "
        f"{len(spec.checkpoints)} model(s), {_decision(spec)}, "
        f"{time.perf_counter() - t0:.1f} s"
    )
    truth = args.truth or data.test_truth_csv
    if truth:
        # a truth CSV in the competition's format has no height/width: the tiles' shape
        try:
            # with its interval over source scenes (test.csv's group), as the pipeline reports
            # its submission
            score, iv = score_submission(truth, out, data.test)
        except USER_ERRORS as e:
            return fail(f"scoring against {truth}: {e}")
        scored = f"{iv.get('n', 0)} of {len(pred)} images scored, those empty in both left out"
        if iv.get("clusters", 0) >= 2:
            print(
                f"official score vs {truth}: {score:.5f} {stats.format_bounds(iv)} (95% "
                f"interval over {iv['clusters']} {iv['unit']}s; {scored})"
            )
        elif iv:  # one source scene scored: no interval to give
            print(f"official score vs {truth}: {score:.5f} (one {iv['unit']}; {scored})")
        else:
            print(f"official score vs {truth}: {score:.5f} (every image empty in both)")
    return 0

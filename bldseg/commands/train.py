"""Trains one model (no search): the reference workflow's single run, as one command.

    bldseg train --out runs/single                    # synthetic world, tiny model
    bldseg train --data /path/to/comp --set model=upernet_internimage_b \\
        --set epochs=50 --set aug.crop_size=224 --out runs/b_single
    bldseg train --data /path/to/inria --tile-size 512 --out runs/inria
                                                       # images/ + masks/ folders
    python experiments/train.py --out runs/single     # the same, from a checkout

On a CPU the defaults are the demo's small settings (``bldseg.tune.cli.CPU_DEMO``: tiny model,
192-px crops, schedule-free AdamW, bf16 where the CPU has it) on any data.

Writes best.pt, last.pt (resumable: run the same command again), val_probs.npz, history.json
and plots/ under --out.

K-fold training (bldseg.train.folds), folds split by source scene:

    bldseg train --folds 5 --out runs/kfold           # 5 models, one after the other
    bldseg train --folds 5 --fold 2 --out runs/kfold  # fold 2 only (e.g. one per GPU), with
                                                       # its own best epoch and Dice; the
                                                       # command without --fold finishes

trains fold f into --out/fold<f>/ and writes the out-of-fold val_probs.npz (every training
image, predicted by the fold model that did not train on it) and folds.json under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from bldseg.commands import (
    EXIT_INTERRUPTED,
    USER_ERRORS,
    fail,
    sigterm_as_ctrl_c,
    warn_job_relative_paths,
)
from bldseg.commands.prepare import cannot_write
from bldseg.data.dataset import fold_assignment, split_groups
from bldseg.data.prepare import add_data_arguments, data_options, prepare_data
from bldseg.metrics import threshold_text
from bldseg.train import RunConfig, fit
from bldseg.train.engine import load_state
from bldseg.train.folds import fit_folds, fold_dir
from bldseg.tune.cli import (
    add_folds_argument,
    add_pretrained_argument,
    fixed_config,
    parse_set,
    refuse_two_pretrained,
)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The flags of ``bldseg train`` (``experiments/train.py``).

    Args:
        prog: Program name in the usage line (default: the running script's name).
    """
    p = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_data_arguments(p)
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--model", default=None, help="model name (see bldseg.models.list_models())")
    p.add_argument(
        "--split-group",
        default=None,
        help="regex on source file names grouping tiles on one side of the validation split",
    )
    add_pretrained_argument(p)
    add_folds_argument(p)
    p.add_argument(
        "--fold",
        type=int,
        default=None,
        metavar="F",
        help="with --folds K: train fold F (0..K-1) only",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="run-config value, e.g. --set epochs=20 (repeatable)",
    )
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Trains; returns the exit status (1 with a message on stderr for bad data or config).

    Args:
        argv: Arguments after the command (default: ``sys.argv[1:]``).
        prog: Program name in the usage line.
    """
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.fold is not None and args.folds is None:
        parser.error("--fold F selects one fold of K-fold training: pass --folds K with it")
    if args.fold is not None and not 0 <= args.fold < args.folds:
        last = args.folds - 1
        parser.error(f"--fold {args.fold}: the folds of --folds {args.folds} are 0..{last}")
    warn_job_relative_paths(parser.prog, {"--out": args.out, "--data-root": args.data_root})
    given = parse_set(args.set)
    if "data" in given:
        # the dataset comes from --data (or --images); a --set data= was overwritten silently
        parser.error("--set data=...: pass the dataset with --data (or --images)")
    refuse_two_pretrained(parser, args)
    if "fold" in given:
        # K-fold training trains every fold whatever the config's fold says: --fold picks one
        parser.error("--set fold=...: train one fold with --fold F (and --folds K)")
    fixed = fixed_config(
        args.data or args.images,
        args.model,
        args.set,
        split_group=args.split_group,
        pretrained=args.pretrained,
        announce=True,
    )
    if args.folds is not None:
        fixed["folds"] = args.folds
    try:
        with sigterm_as_ctrl_c():
            return _train(args, fixed)
    except KeyboardInterrupt:
        # last.pt holds every finished epoch: the same command resumes from it
        print(f"\n{_interrupted(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED


def _train(args: argparse.Namespace, fixed: dict) -> int:
    """Prepares the data and trains (``main`` after its flags are checked)."""
    try:
        # recorded absolute: the same command from another folder continues the run
        where = None if args.data is None else os.path.abspath(args.data)
        cfg = RunConfig.from_flat({**fixed, "data": where})
        data = prepare_data(
            args.data,
            options=data_options(args),
            data_root=args.data_root,
            verbose=True,
            split_group=cfg.split_group,
            test_split=False,  # training never reads it (a competition's: ~9 GB to decode)
        )
        if cfg.folds >= 2:  # more folds than source scenes: said here, naming --folds
            groups = split_groups(data.train, cfg.split_group)
            fold_assignment(len(data.train), cfg.folds, cfg.split_seed, groups)
    except USER_ERRORS as e:
        return fail(e)
    except OSError as e:  # the caches are written under --data-root
        return fail(cannot_write(e, "--data-root", args.data_root))
    shown: list[int] = []  # epochs printed as they ended

    def show(row: dict, run_out: Path) -> None:
        # each epoch's line as it ends (they came all at once after the last epoch); a resumed
        # run's earlier epochs first, from the history.json written just before
        if not shown:
            earlier = json.loads((Path(run_out) / "history.json").read_text())
            for old in (r for r in earlier if r["epoch"] < row["epoch"]):
                print(epoch_line(old), flush=True)
        print(epoch_line(row), flush=True)
        shown.append(row["epoch"])

    try:  # what fit finds in the user's input: a crop larger than the images, another
        # run's folder, a missing --pretrained file, a --split-group that matches nothing
        if cfg.folds >= 2:
            # one fold (--fold) prints its own epochs once trained, below
            each = show if args.fold is None else None
            result = fit_folds(
                cfg, args.out, data=data, progress=True, only=args.fold, on_epoch_end=each
            )
        else:
            result = fit(cfg, args.out, data=data, progress=True, on_epoch_end=show)
    except USER_ERRORS as e:  # also another process training into --out
        return fail(e)
    except OSError as e:  # a read-only --out, a file of that name, a full disk
        return fail(cannot_write(e, "--out", args.out))
    if args.fold is not None and result.status != "diverged":
        # The mean rows are of the epochs every fold has trained: none while other folds are
        # still to train. The fold trained here reports its own.
        fold_run = fold_dir(args.out, args.fold)
        state = load_state(fold_run / "last.pt", mmap=True)
        for row in state["history"]:
            print(epoch_line(row))
        best = state["best"]
        print(
            f"fold {args.fold}: best epoch {best.get('epoch')} {_val_dice(best)}; "
            f"{fold_run}/best.pt"
        )
        if result.status != "completed":
            print(f"{result.status}: {result.message}")
            return 0
    elif not shown:  # nothing trained now (a finished run's folder): its epochs as they were
        for row in result.history:
            print(epoch_line(row))
    if result.status == "diverged":
        # a failed run: scripts and schedulers must see it (its files say how far it got)
        return fail(f"training diverged: {result.message}; see {args.out}/history.json")
    if cfg.folds >= 2:  # every fold trained (a --fold that leaves others returned above)
        print(
            f"{result.status}: {result.message}; best epoch {result.best.get('epoch')} "
            f"(mean over folds) {_val_dice(result.best)}; {args.out}/folds.json"
        )
        return 0
    print(
        f"{result.status}: {result.message}; best epoch {result.best.get('epoch')} "
        f"{_val_dice(result.best)}; {args.out}/best.pt"
    )
    return 0


def _interrupted(args: argparse.Namespace) -> str:
    """What an interrupted ``bldseg train`` says: how the same command goes on."""
    out = Path(args.out)
    if args.folds is None:
        started = (out / "last.pt").is_file()
    else:
        folds = [args.fold] if args.fold is not None else range(args.folds)
        started = any((fold_dir(out, f) / "last.pt").is_file() for f in folds)
    if started:
        return (
            "interrupted; run the same command again to continue from the last finished epoch "
            f"(last.pt under {out})"
        )
    return "interrupted before an epoch ended; run the same command again to start the run"


def epoch_line(row: dict) -> str:
    """One epoch's metrics as a JSON line, numbers to 4 significant digits.

    Significant digits, not decimals: a fine-tuning LR of 6e-05 (and the smaller ones of its
    warm-up) would round to 0.0001 or 0.0 at 4 decimals. Thresholds (``val_thr_*``) are
    floored to 4 decimals as every printed threshold is (:func:`threshold_text`): rounded, the
    epoch line said 0.4275 where the run's summary says 0.4274, another level typed back.
    """

    def number(k: str, v: float) -> float:
        return float(threshold_text(v)) if k.startswith("val_thr_") else float(f"{v:.4g}")

    return json.dumps({k: number(k, v) if isinstance(v, float) else v for k, v in row.items()})


def _val_dice(best: dict) -> str:
    """The best epoch's validation Dice, saying what was chosen on the same tiles."""
    nan = float("nan")
    return (
        f"val Dice {best.get('val_dice_best', nan):.4f} at threshold "
        f"{threshold_text(best.get('val_thr_best', nan))} "
        f"({best.get('val_dice_05', nan):.4f} at 0.5); the epoch and threshold were chosen on "
        "these validation tiles, so it is optimistic: score held-out images with `bldseg "
        "predict --truth` or `--masks`"
    )

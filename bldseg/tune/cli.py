"""The command line shared by ``experiments/tune_aug.py``, ``tune_sched.py`` and ``tune_tau.py``."""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import textwrap
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from bldseg import metrics
from bldseg.commands import (
    EXIT_INTERRUPTED,
    experiment_name,
    sigterm_as_ctrl_c,
    warn_job_relative_paths,
)
from bldseg.data.prepare import (
    DEFAULT_DATA_ROOT,
    OPTION_FLAGS,
    DataOptions,
    add_data_arguments,
    choose_data_options,
    data_options,
    flat_options,
    without_unread_options,
)
from bldseg.train.config import recipe_defaults
from bldseg.train.engine import cpu_has_native_bf16
from bldseg.tune import tracking
from bldseg.tune.runner import (
    DEFAULT_EXPERIMENT,
    EXIT_CLUSTER_LOST,
    META_FILE,
    METRIC,
    USABLE,
    SearchInterrupted,
    SearchSpec,
    name_problem,
    read_search_record,
    read_trial_table,
    run_search,
    section_key_problem,
)


def demo_precision() -> str:
    """The CPU demo's precision: ``bf16`` where this CPU computes bfloat16 natively, else
    ``auto`` (float32 on a CPU, bf16 on a GPU).

    Decided on the machine that starts the run: emulated bf16 is usually slower than float32,
    and where the CPU's flags cannot be read (not Linux) nothing is assumed.
    """
    return "bf16" if cpu_has_native_bf16() else "auto"


#: Fixed trial settings for a 2-core CPU (the built-in world, or any data without a GPU): the
#: tiny model on 192-px crops of the 0.5 m/px scenes, 4 per step, 512 per epoch. At this scale
#: learning is bought with CPU seconds: 192-px crops reach the same test Dice per CPU second
#: as 128-px crops and more in total. A default search (6 trials of up to 20 epochs, ASHA)
#: takes about 8 minutes on 2 cores, and its best trial reaches about 0.78 clean-test Dice
#: (experiments/predict.py on its best.pt). Schedule-free AdamW makes every epoch's model an
#: anytime one (ASHA's early rungs compare models, not points of a schedule), and bf16 autocast,
#: where the CPU computes bfloat16 natively, makes our epochs 8% cheaper at the same test Dice:
#: with both, our curve is above a standard smp peer's at every budget of
#: experiments/bench_train.py (README, Benchmarks), which it was not with float32 OneCycle.
CPU_DEMO = {
    "model": "upernet_internimage_tiny",
    "aug.crop_size": 192,
    "aug.crop_fit": True,  # smaller images (a user's 128-px tiles) are trained on whole
    "batch_size": 4,
    "samples_per_epoch": 512,
    "val_fraction": 0.2,
    "optim.lr": 3e-3,
    "channels_last": True,  # NHWC convolutions: 11% less CPU per step for the tiny model
    "sched.name": "schedulefree",
    "precision": demo_precision(),
}

#: Epochs per trial of a search (ASHA's max_t), the demo's budget for its best trial.
DEFAULT_EPOCHS = 20
#: Trials of a search. With 20 epochs, ASHA (grace 2, factor 4) still runs 2-3 of 6 trials to
#: the end (the first ones have nobody to lose against): 55-66 epochs, 5-8 minutes on 2 cores
#: (schedule-free's anytime models keep more trials level at the rungs than OneCycle did).
DEFAULT_TRIALS = 6


#: Exit status of a search in which at least one trial left a model (completed, or stopped
#: early by ASHA).
EXIT_COMPLETED = 0
#: Exit status of a search in which no trial did (the first failure is printed).
EXIT_NO_TRIAL_COMPLETED = 1
#: Exit status of a search that could not start (argparse's usage errors have it too).
EXIT_NOT_STARTED = 2

#: What each exit status of ``bldseg tune <search>`` means: its --help lists them.
EXIT_STATUSES = {
    EXIT_COMPLETED: "at least one trial completed (or was stopped early by ASHA) with a model",
    EXIT_NO_TRIAL_COMPLETED: "no trial completed; the first failure is printed",
    EXIT_NOT_STARTED: "the search did not start: a bad flag, setting or space, data its trials "
    "cannot train on, an unreachable tracking store or cluster (the message names it)",
    EXIT_CLUSTER_LOST: "the Ray cluster was lost mid-search; the message gives the --resume "
    "command that continues it",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C or SIGTERM); the message says how to continue",
}


def exit_status_epilog(statuses: dict[int, str]) -> str:
    """An "Exit status:" paragraph for a command's --help (``statuses``: status -> meaning)."""
    lines = ["Exit status:"]
    for status, meaning in sorted(statuses.items()):
        lines += textwrap.wrap(
            meaning, width=92, initial_indent=f"  {status:<5}", subsequent_indent=" " * 7
        )
    return "\n".join(lines)


def _set_problem(item: str) -> str | None:
    if "=" not in item:
        return f"{item!r}: expected key=value, e.g. --set optim.lr=1e-3"
    return None


def set_item(text: str) -> str:
    """An argparse type: a ``--set`` item of the form ``key=value`` (kept as text)."""
    if (problem := _set_problem(text)) is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def parse_set(items: list[str], parser: argparse.ArgumentParser | None = None) -> dict[str, Any]:
    """``["optim.lr=1e-3", "model=upernet_internimage_t"]`` -> typed dict (JSON values).

    A malformed item exits naming it, with status 2 (a usage error; 1 is a search in which no
    trial completed): through ``parser.error`` when a parser is given.
    """
    out = {}
    for item in items:
        if (problem := _set_problem(item)) is not None:
            if parser is not None:
                parser.error(f"--set {problem}")
            print(f"error: --set {problem}", file=sys.stderr)
            raise SystemExit(2)
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v  # a bare string such as a model name
    return out


#: --set keys a search sets from its own flags for every trial (a --set of them was silently
#: overridden by the flag's value or default, or went over it).
_SEARCH_FLAGS = {"epochs": "--epochs", "data": "--data", "folds": "--folds"}

#: --set keys a search has no use for, with what to do instead (every trial ignored them).
_NOT_IN_SEARCHES = {
    # a K-fold trial trains every fold in lockstep: it ran all folds, fold=F unused
    "fold": "a search trains every fold of --folds K in each trial (bldseg train --folds K "
    "--fold F trains one)",
}


def refuse_search_sets(parser: argparse.ArgumentParser, sets: list[str]) -> None:
    """Exits (status 2) naming a malformed --set, or a --set of a key the search sets from its
    own flag, does not use, or that names a whole config section (``aug`` for ``aug.hflip_p``).
    """
    given = set(parse_set(list(sets), parser))
    refused = [
        f"--set {k}=...: a search sets {k} with {_SEARCH_FLAGS[k]}"
        for k in sorted(given & set(_SEARCH_FLAGS))
    ]
    refused += [
        f"--set {k}=...: {_NOT_IN_SEARCHES[k]}" for k in sorted(given & set(_NOT_IN_SEARCHES))
    ]
    refused += [
        f"--set {k}=...: {problem}"
        for k in sorted(given)
        if (problem := section_key_problem(k)) is not None
    ]
    if refused:
        parser.error("; ".join(refused))


def refuse_two_pretrained(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exits (status 2) when both --pretrained and --set pretrained= name a checkpoint: the
    recipe came from one and the run's file from the other."""
    if args.pretrained is not None and "pretrained" in parse_set(list(args.set), parser):
        parser.error(
            "--pretrained and --set pretrained=... both name a checkpoint; give it once, "
            "with --pretrained"
        )


def fixed_config(
    data: str | None,
    model: str | None = None,
    sets: list[str] = (),
    *,
    gpu: bool | None = None,
    split_group: str | None = None,
    pretrained: str | None = None,
    announce: bool = False,
) -> dict:
    """Run-config values fixed for every run of an entry script.

    The CPU demo settings (:data:`CPU_DEMO`) on the built-in synthetic world and on any data
    when there is no GPU, so a search on a laptop finishes in minutes; ``upernet_internimage_t``
    on the user's data with a GPU. With ``--pretrained`` the official fine-tuning recipe
    (:func:`bldseg.train.config.recipe_defaults`) goes over those defaults. Then ``--model``,
    ``--split-group`` and ``--set key=value`` on top (the search space goes over everything).

    Args:
        data: ``--data`` (None: the synthetic world).
        model: ``--model``.
        sets: ``--set key=value`` items.
        gpu: Whether trials get a GPU; None: ``torch.cuda.is_available()``.
        split_group: ``--split-group`` regex.
        pretrained: ``--pretrained`` checkpoint (or ``--set pretrained=PATH``).
        announce: Print which defaults were chosen when they are the CPU ones on user data.
    """
    if gpu is None:
        import torch

        gpu = torch.cuda.is_available()
    small = data is None or not gpu
    base: dict[str, Any] = dict(CPU_DEMO) if small else {"model": "upernet_internimage_t"}
    sets = parse_set(list(sets))
    # popped whichever names the file: base["pretrained"] is then the file the recipe is of
    given = sets.pop("pretrained", None)
    if pretrained and given and str(given) != str(pretrained):
        raise ValueError(
            f"pretrained={pretrained!r} and --set pretrained={given!r} name two checkpoints; "
            "give it once"
        )
    pretrained = pretrained or given
    recipe = recipe_defaults(pretrained) if pretrained else {}
    base.update(recipe)
    if model:
        base["model"] = model
    if split_group:
        base["split_group"] = split_group
    base.update(sets)
    if "aug.crop_size" in sets and "aug.crop_fit" not in sets:
        base["aug.crop_fit"] = False  # a crop asked for by name is checked, never shrunk
    if announce and recipe:
        print(
            f"fine-tuning from {recipe['pretrained']} with the official recipe's defaults "
            + json.dumps({k: v for k, v in recipe.items() if k != "pretrained" and k not in sets}),
            flush=True,
        )
    if announce and small and data is not None:
        # the values the trials get (base), not CPU_DEMO's: a --set aug.crop_size turns
        # aug.crop_fit off above, and printing CPU_DEMO's True described other crops
        kept = {
            k: base[k]
            for k in CPU_DEMO
            if k not in sets and k not in recipe and not (k == "model" and model)
        }
        print(
            "no GPU: training on your data with the CPU demo's small settings "
            + json.dumps(kept)
            + "; pass --model / --set key=value (and --gpus-per-trial on a GPU machine) to change",
            flush=True,
        )
    return base


@dataclass
class StartingPoint:
    """What ``--from SEARCH`` carries from an earlier search (:func:`start_from`)."""

    config: dict[str, Any]  # its fixed settings with its best trial's searched values on top
    said: str  # a line saying where the config came from
    data: str | None  # its --data, made absolute (None: the synthetic world, or --images alone)
    data_options: DataOptions  # its data flags (--images, --tile-size, --mask-values, ...)
    data_root: str | None  # its --data-root (None: not recorded)


#: How a search's last session ended (its record's ``sessions``), in a sentence.
_ENDED = {
    "interrupted": "was interrupted (Ctrl-C)",
    "cluster lost": "lost its Ray cluster",
    "failed": "stopped on an error",
}


def _unfinished(search: str, folder: Path, storage: str, recorded: dict[str, Any]) -> str:
    """Why ``--from`` cannot start from a search that has a record but no trial table yet,
    with the command that finishes it."""
    from bldseg.commands.tune import SEARCHES  # it imports this module

    # the command whose default space the search has (a resume takes the recorded space; a
    # differing --space would only be warned about)
    space = (recorded.get("spec") or {}).get("space") or "augmentation"
    of_space = {default: search for search, (default, _) in SEARCHES.items()}
    command = f"bldseg tune {of_space.get(space, 'aug')}"
    if space not in of_space:
        command += f" --space {shlex.quote(space)}"
    # the storage as this command was given it when the search was named, else the folder's
    where = storage if not Path(search).is_dir() else str(folder.parent)
    command += f" --resume --name {shlex.quote(folder.name)} --storage {shlex.quote(where)}"
    sessions = recorded.get("sessions") or []
    how = (
        _ENDED.get(sessions[-1].get("end"), "did not finish")
        if sessions
        # no session recorded: it runs now, or was killed before it could say so
        else "has not finished (it is still running, or was killed)"
    )
    return (
        f"--from {search}: the search {folder.name} {how}: it has no trial table "
        f"({folder.resolve() / 'trials.csv'}) yet, so no best trial; continue it with "
        f"`{command}`, then run this command again"
    )


def start_from(search: str, storage: str) -> StartingPoint:
    """The run config an earlier search's best trial trained with, and that search's data, to
    start a search from.

    The earlier search's fixed settings (what it recorded as its base) with its best trial's
    searched values on top: the configuration the pipeline carries from stage to stage, for
    searches run one by one (``tune_sched.py --from runs/aug``). Its best trial is the best
    completed or early-stopped one by validation Dice, as its trial table ranks them.

    Args:
        search: The earlier search's results folder, or its name under ``storage``.
        storage: The ``--storage`` of this command.

    Returns:
        The config with a line saying where it came from, and the search's data.

    Raises:
        ValueError: No such search, one that has not finished (the message gives the command
            that continues it), or one in which no trial finished.
    """
    from bldseg.pipeline import best_config

    folder = Path(search) if Path(search).is_dir() else Path(storage) / search
    meta, csv = folder / META_FILE, folder / "trials.csv"
    if not meta.is_file():
        raise ValueError(
            f"--from {search}: {folder.resolve()} is not a finished or interrupted search's "
            f"results folder (it has no {META_FILE}); give the folder, or a search name under "
            f"--storage {storage}"
        )
    try:
        recorded = read_search_record(meta.resolve())
    except ValueError as e:  # named: json's own error gave only a line and column
        raise ValueError(f"--from {search}: {e}") from None
    if not csv.is_file():
        # the trial table is written when a search finishes (an interrupted one has none)
        raise ValueError(_unfinished(search, folder, storage, recorded))
    table = read_trial_table(csv)
    try:
        best = best_config(table)
    except RuntimeError:
        raise ValueError(
            f"--from {search}: no trial of that search completed, so it has no best "
            f"configuration (see {csv})"
        ) from None
    # the row best_config took its values from (the same stable order: ties keep the first)
    row = table[table["status"].isin(USABLE)].sort_values(METRIC, ascending=False, kind="stable")
    row = row.iloc[0]
    # --epochs / --folds are this command's own flags, not settings to inherit; the data is
    # carried apart (SearchSpec.data and its options), as the runner records it
    fixed = {k: v for k, v in recorded.get("base", {}).items() if k not in _SEARCH_FLAGS}
    config = {**fixed, **best}
    said = (
        f"starting from {folder}'s best trial {row['trial_id']} ({METRIC} "
        f"{float(row[METRIC]):.4f}): its searched values {json.dumps(best)} over that search's "
        "fixed settings; --set / --model change them"
    )
    spec = recorded.get("spec") or {}
    data = _carried_path(search, "--data", recorded.get("base", {}).get("data"))
    options = DataOptions.from_dict(spec.get("data_options") or {})
    options = replace(
        options,
        **{
            name: _carried_path(search, f"--{name}", getattr(options, name))
            for name in ("images", "masks", "footprints")
        },
    )
    # flags recorded before they were refused for data that does not read them (a --tile-size
    # on a train.csv): that search ignored them, and nobody could leave them out here
    options = without_unread_options(data, options, f"the search {folder.name}")
    return StartingPoint(
        config=config, said=said, data=data, data_options=options, data_root=spec.get("data_root")
    )


def _carried_path(search: str, flag: str, path: str | None) -> str | None:
    """A folder an earlier search recorded, absolute.

    Searches record their folders absolute; older ones recorded ``--images`` etc. (before
    2026-12-06 also ``--data``) as typed, relative to a folder they did not record. Such a path
    is taken from the current folder when it is there, else refused: another folder's
    ``images/`` would be other data.

    Raises:
        ValueError: A relative path that is not under the current folder.
    """
    if path is None or Path(path).is_absolute():
        return path
    here = Path(path).resolve()
    if not here.exists():
        raise ValueError(
            f"--from {search}: that search recorded {flag} as the relative path {path!r} "
            f"(older bldseg versions kept it as typed), and {here} does not exist: run this "
            "command in the folder that search was started in, or give --data / --images"
        )
    return str(here)


_NOT_GIVEN = object()  # a flag left to its default

_FOLDER_OPTIONS = ("images", "masks", "footprints")


def _dest(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")


def _given_flags(parser: argparse.ArgumentParser, argv: list[str] | None, flags) -> set[str]:
    """Which of ``flags`` the command line gives: a flag typed with its default value is given
    too, which comparing the parsed value with the default cannot tell."""
    dests = {_dest(f): f for f in flags}
    defaults = {d: parser.get_default(d) for d in dests}
    parser.set_defaults(**dict.fromkeys(dests, _NOT_GIVEN))
    try:
        parsed = vars(parser.parse_args(argv))  # parsed once already: it cannot fail here
    finally:
        parser.set_defaults(**defaults)
    return {f for d, f in dests.items() if parsed.get(d, _NOT_GIVEN) is not _NOT_GIVEN}


def _flat_options(options: DataOptions) -> dict[str, Any]:
    """``options`` as :func:`~bldseg.data.prepare.flat_options`, lists as tuples (as a
    record's JSON reads back), so typed and recorded values compare alike."""
    return flat_options(DataOptions.from_dict(json.loads(json.dumps(asdict(options)))))


def _data_shown(data: str | None, options: DataOptions) -> str:
    """The data and its options that differ from the defaults, for a message."""
    where = data or options.images or "the built-in synthetic world"
    default = _flat_options(DataOptions())
    changed = {
        k: v
        for k, v in _flat_options(options).items()
        if v != default[k] and not (k == "images" and where == v)
    }
    return where + (f" ({', '.join(f'{k}={v}' for k, v in changed.items())})" if changed else "")


def carried_data(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    argv: list[str] | None,
    start: StartingPoint,
) -> tuple[str | None, DataOptions, str]:
    """The data a search started ``--from`` an earlier one trains on: ``(data, options,
    data_root)``.

    Without ``--data`` or ``--images``, the earlier search's data, options and data root (its
    best values were found on those); a data flag given here replaces its group's recorded
    values (``--mask-values`` a recorded ``--mask-nonzero``, as suspects and predict read a
    model's record), with a warning, and ``--data-root`` wins. With ``--data`` or
    ``--images``, this command's data and flags, with a warning when they differ from the
    earlier search's.

    Raises:
        SystemExit: The carried options and the flags given here contradict each other.
    """
    given = data_options(args)
    recorded_root = start.data_root or str(DEFAULT_DATA_ROOT)
    source = f"--from {args.start_from}"
    if args.data or args.images:
        data = str(Path(args.data).resolve()) if args.data else None
        # folders compare absolute: the record keeps them so, a flag may be typed relative
        now, was = _flat_options(given), _flat_options(start.data_options)
        now.update({k: os.path.abspath(v) for k in _FOLDER_OPTIONS if (v := now[k])})
        if data != start.data or now != was:
            print(
                f"warning: {source}: its best values were found on "
                f"{_data_shown(start.data, start.data_options)}; this search trains on "
                f"{_data_shown(data, given)}",
                file=sys.stderr,
                flush=True,
            )
        return args.data, given, args.data_root
    typed = _given_flags(parser, argv, [*OPTION_FLAGS.values(), "--data-root"])
    values = _flat_options(given)
    typed_values = {key: values[key] for key, flag in OPTION_FLAGS.items() if flag in typed}
    for key in _FOLDER_OPTIONS:
        if typed_values.get(key):
            typed_values[key] = os.path.abspath(typed_values[key])
    try:
        # a flag replaces its whole group, as suspects and predict read a record:
        # --mask-values over a recorded --mask-nonzero
        options, differ = choose_data_options(start.data_options, typed_values)
    except ValueError as e:
        parser.error(f"{source}: the data flags given here and that search's contradict: {e}")
    for now_flags, was_flags in differ:
        print(
            f"warning: {source}: {now_flags} replaces the {was_flags} that search read its "
            "data with, so the data differ from those its best values were found on",
            file=sys.stderr,
            flush=True,
        )
    data_root = args.data_root if "--data-root" in typed else recorded_root
    print(
        f"{source}: training on that search's data, {_data_shown(start.data, options)} "
        f"(--data-root {data_root}); give --data to train on other data",
        flush=True,
    )
    return start.data, options, data_root


def add_pretrained_argument(parser: argparse.ArgumentParser) -> None:
    """``--pretrained PATH``: an official InternImage checkpoint the user owns."""
    parser.add_argument(
        "--pretrained",
        default=None,
        metavar="PATH",
        help="fine-tune from an official checkpoint you own: internimage_{t,s,b}_1k_224.pth "
        "(backbone) or upernet_internimage_{t,s,b}_512_160k_ade20k.pth (whole model); sets the "
        "official recipe's defaults (AdamW 6e-5, poly + 1500-step warm-up, at most 5%% of the "
        "run) under --set",
    )


def fold_count(text: str) -> int:
    """An argparse type: the K of ``--folds K``, at least 2."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 2:
        raise argparse.ArgumentTypeError(
            f"{value}: K-fold training needs K >= 2 folds (leave --folds out for the holdout "
            "split of val_fraction)"
        )
    return value


def add_folds_argument(parser: argparse.ArgumentParser) -> None:
    """``--folds K``: K models per configuration, each validated on its own fold."""
    parser.add_argument(
        "--folds",
        type=fold_count,
        default=None,
        metavar="K",
        help="K-fold training: K models per configuration, fold f validated on the f-th of K "
        "partitions of the source scenes (split_seed), trained on the rest; the run's "
        "out-of-fold val_probs.npz covers every training image (default: one model, "
        "val_fraction held out)",
    )


def search_name(text: str) -> str:
    """An argparse type: a search name (a folder name, letters, digits, ``._-``)."""
    if (problem := name_problem(text)) is not None:
        raise argparse.ArgumentTypeError(f"{text!r} {problem}")
    return text


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def positive_float(text: str) -> float:
    """An argparse type: a number above 0 (``--cpus-per-trial``)."""
    value = _float(text)
    if not value > 0:  # NaN too
        raise argparse.ArgumentTypeError(f"{text}: must be above 0, e.g. 1")
    return value


def gpu_count(text: str) -> float:
    """An argparse type: GPUs per trial, 0 or more (fractions share a GPU)."""
    value = _float(text)
    if not (value >= 0 and math.isfinite(value)):  # NaN too
        raise argparse.ArgumentTypeError(
            f"{text}: must be 0 (no GPU) or more; a fraction shares a GPU, e.g. 0.5"
        )
    return value


def _int_in(text: str, low: int, high: int | None, why: str) -> int:
    """``text`` as an integer in [low, high] (no upper bound: None), else argparse's error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low or (high is not None and value > high):
        raise argparse.ArgumentTypeError(f"{value} {why}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    return _int_in(text, 1, None, "is below 1")


def non_negative_int(text: str) -> int:
    """An argparse type: an integer of at least 0 (``--max-concurrent``, where 0 means "as many
    as the resources allow")."""
    why = "is below 0: pass 1 or more, or 0 for as many trials as the resources allow"
    return _int_in(text, 0, None, why)


def seed_value(text: str) -> int:
    """An argparse type: a searcher seed, 0 to 2**32 - 1 (what Optuna's samplers take)."""
    return _int_in(text, 0, 2**32 - 1, "is not from 0 to 2**32 - 1 (e.g. 0)")


def build_parser(space: str, description: str) -> argparse.ArgumentParser:
    """The shared flags, with ``space`` as the default search space."""
    p = argparse.ArgumentParser(
        description=description,
        epilog=exit_status_epilog(EXIT_STATUSES),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a = p.add_argument
    a("--space", default=space, help=f"search space in tune_spaces (default: {space})")
    add_data_arguments(p)
    a(
        "--split-group",
        default=None,
        help="regex on source file names; its match groups tiles that stay on one side of the "
        "train/validation split (default: tiles of one source scene stay together)",
    )
    add_pretrained_argument(p)
    add_folds_argument(p)
    a(
        "--model",
        default=None,
        help="model name (default: upernet_internimage_tiny on a CPU or the synthetic world, "
        "upernet_internimage_t on your data with a GPU); see bldseg.models.list_models()",
    )
    a(
        "--from",
        dest="start_from",
        metavar="SEARCH",
        default=None,
        help="start from an earlier search's best configuration (its results folder, or its "
        "--name under --storage): that search's settings and its best trial's searched values, "
        "under this command's --set / --model, as the pipeline carries them from stage to stage, "
        "and its data (--data, its data flags and --data-root) unless --data or --images is "
        "given; a data flag given alone replaces that search's, with a warning (default: the "
        "CPU demo settings or the GPU defaults)",
    )
    a(
        "--trials",
        type=positive_int,
        default=DEFAULT_TRIALS,
        help=f"trials (default {DEFAULT_TRIALS})",
    )
    a(
        "--epochs",
        type=positive_int,
        default=DEFAULT_EPOCHS,
        help=f"epochs per trial, ASHA's max_t (default {DEFAULT_EPOCHS})",
    )
    a(
        "--cpus-per-trial",
        type=positive_float,
        default=1.0,
        help="CPUs reserved per trial (default 1)",
    )
    a(
        "--gpus-per-trial",
        type=gpu_count,
        default=0.0,
        help="GPUs per trial; fractions share a GPU, e.g. 0.5 (default 0)",
    )
    a(
        "--search",
        choices=["optuna", "random"],
        default="optuna",
        help="searcher: Optuna TPE or random sampling of the same space (default optuna)",
    )
    a(
        "--scheduler",
        choices=["asha", "fifo"],
        default="asha",
        help="trial scheduler: ASHA early stopping or FIFO (default asha)",
    )
    a(
        "--grace-period",
        type=int,
        default=2,
        help="ASHA: epochs before a trial can be stopped (default 2)",
    )
    a(
        "--reduction-factor",
        type=int,
        default=4,
        help="ASHA: each rung (at grace period x factor^k epochs) keeps the best 1/factor of "
        "the trials (default 4, Ray's)",
    )
    a(
        "--name",
        type=search_name,
        default=None,
        help="search name: its results folder and its MLflow parent run; letters, digits, "
        "'.', '_' and '-' (default: <space>-<timestamp>)",
    )
    a(
        "--experiment",
        type=experiment_name,
        default=DEFAULT_EXPERIMENT,
        help=f"MLflow experiment holding the project's searches, one parent run per search "
        f"(default {DEFAULT_EXPERIMENT})",
    )
    a(
        "--storage",
        default="runs",
        help="results folder; shared storage on a cluster (default runs)",
    )
    a(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: sqlite:////<cwd>/mlflow.db; a relative sqlite or "
        "folder path is taken from the current folder); an http:// server works",
    )
    a(
        "--tracking-timeout",
        type=float,
        default=tracking.DEAD_AFTER_S,
        metavar="S",
        help="seconds a tracking server may stay silent before the search goes on without "
        f"MLflow, noting it in each run folder (default {tracking.DEAD_AFTER_S:g})",
    )
    a(
        "--address",
        default=None,
        help="address of an existing Ray cluster, e.g. 10.0.0.1:6379 (default: local Ray, or "
        "$RAY_ADDRESS)",
    )
    a(
        "--resume",
        action="store_true",
        help="continue the interrupted search --name (default: the latest of this space); "
        "after Ctrl-C the search says the command",
    )
    a("--seed", type=seed_value, default=0, help="searcher seed, 0 to 2**32 - 1 (default 0)")
    a(
        "--max-concurrent",
        type=non_negative_int,
        default=0,
        help="max trials at once; 0: as many as the resources allow (default 0); a resumed "
        "search keeps the limit it started with",
    )
    a(
        "--set",
        action="append",
        type=set_item,
        default=[],
        metavar="KEY=VALUE",
        help="fix a run-config value for all trials, e.g. --set loss=bce_dice (repeatable)",
    )
    return p


def trial_table_text(t: pd.DataFrame) -> str:
    """The trial table a search prints: scores and epochs, then the searched config/ columns.

    Thresholds are floored to 4 decimals as everywhere else (:func:`metrics.threshold_text`):
    the value a user copies into ``predict --threshold`` is the trial's level; rounded to
    nearest it was the next level up for about half of them.
    """
    cols = [
        "trial_id",
        METRIC,
        "val_thr_best",
        "val_dice_05",
        "best_epoch",
        "epochs_run",
        "status",
    ] + [c for c in t.columns if c.startswith("config/")]
    with pd.option_context(
        "display.width", 200, "display.max_columns", 30, "display.float_format", "{:.4f}".format
    ):
        return t[[c for c in cols if c in t.columns]].to_string(
            index=False, formatters={"val_thr_best": metrics.threshold_text}
        )


def main(
    space: str,
    description: str,
    argv: list[str] | None = None,
    prog: str | None = None,
) -> int:
    """Parses flags, runs the search, prints the trial table and where to look next.

    Returns:
        The exit status (:data:`EXIT_STATUSES`): 0 when at least one trial completed, 1 when
        none did (the reason is printed), 2 when the search could not start, 130 when it was
        interrupted (Ctrl-C; the message says how to continue it); a search whose Ray cluster
        is lost ends its process with 3 (:data:`bldseg.tune.runner.EXIT_CLUSTER_LOST`),
        saying how to continue it.
    """
    parser = build_parser(space, description)
    if prog is not None:  # in usage errors found after parsing too ("bldseg tune aug: error")
        parser.prog = prog
    args = parser.parse_args(argv)
    refuse_search_sets(parser, args.set)
    refuse_two_pretrained(parser, args)
    if args.start_from and (args.pretrained or "pretrained" in parse_set(args.set, parser)):
        parser.error(
            "--from and --pretrained: the search you start from recorded its checkpoint and "
            "the recipe's values; change them with --set"
        )
    base = fixed_config(
        args.data or args.images,
        args.model,
        args.set,
        gpu=args.gpus_per_trial > 0,  # trials without a GPU train the CPU defaults
        split_group=args.split_group,
        pretrained=args.pretrained,
        announce=not args.start_from,
    )
    # a file there (or above it): Ray started, then every write failed naming a path under
    # it, and the search's MLflow run was left FAILED
    storage = Path(args.storage).absolute()
    existing = next(p for p in (storage, *storage.parents) if p.exists())
    if not existing.is_dir():
        parser.error(
            f"--storage {args.storage}: {existing} is a file; give a folder for search results"
        )
    parent_tags = {}
    data, options, data_root = args.data, data_options(args), args.data_root
    if args.start_from:
        try:
            start = start_from(args.start_from, args.storage)
        except ValueError as e:
            parser.error(str(e))
        # what this command names wins over what is carried (fixed_config's rules: a crop
        # asked for by name is checked, never shrunk)
        sets = parse_set(args.set)
        named = {"model": args.model, "split_group": args.split_group}
        base = {**start.config, **{k: v for k, v in named.items() if v}, **sets}
        if "aug.crop_size" in sets and "aug.crop_fit" not in sets:
            base["aug.crop_fit"] = False
        parent_tags["bldseg.started_from"] = str(args.start_from)
        print(start.said, flush=True)
        # the best values were found on that search's data: they go on being trained on it (a
        # resume goes on with the data this search recorded when it started)
        if not args.resume:
            data, options, data_root = carried_data(parser, args, argv, start)
    if args.folds is not None:
        base["folds"] = args.folds
    # the data root used (--from carries its search's); a resumed search logs to the store it
    # recorded (absolute) when --tracking-uri is left out
    tracking = args.tracking_uri if args.tracking_uri or not args.resume else False
    paths = {"--storage": args.storage, "--data-root": data_root}
    warn_job_relative_paths(parser.prog, paths, tracking)
    # what the user fixed by name, as opposed to the defaults under it (CPU_DEMO, the recipe)
    user_keys = set(parse_set(args.set)) - {"pretrained"}
    user_keys |= {k for k, v in (("model", args.model), ("split_group", args.split_group)) if v}
    spec = SearchSpec(
        space=args.space,
        name=args.name,
        base=base,
        trials=args.trials,
        epochs=args.epochs,
        cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=args.gpus_per_trial,
        search=args.search,
        scheduler=args.scheduler,
        grace_period=args.grace_period,
        reduction_factor=args.reduction_factor,
        storage=args.storage,
        tracking_uri=args.tracking_uri,
        tracking_timeout_s=args.tracking_timeout,
        experiment=args.experiment,
        address=args.address,
        resume=args.resume,
        seed=args.seed,
        data=data,
        data_options=options,
        data_root=data_root,
        max_concurrent=args.max_concurrent,
        user_keys=tuple(sorted(user_keys)),
        parent_tags=parent_tags,
    )
    try:
        with sigterm_as_ctrl_c():  # a job scheduler's stop ends the search as Ctrl-C does
            result = run_search(spec)
    except (RuntimeError, ValueError, OSError) as e:  # OSError: e.g. a --storage not writable
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NOT_STARTED
    except SearchInterrupted as e:
        # the exit status of a process ended by SIGINT, with the way back in the message
        print(f"\ninterrupted: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        # Ctrl-C while the data or Ray were being prepared: no trial started, no traceback
        print(
            "\ninterrupted before the search started (no trial ran); run the same command "
            "again to start it",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    t = result.table
    print(f"\n=== {result.name}: {len(t)} trials ===")
    print(trial_table_text(t))
    failed = t[~t["status"].isin(USABLE)] if "status" in t else t.iloc[:0]
    for row in failed.to_dict("records"):  # why each failed: the table has no room for it
        print(f"  trial {row['trial_id']} {row['status']}: {' '.join(str(row['message']).split())}")
    if result.n_completed and result.best:
        print(
            f"\nbest trial {result.best['trial_id']}: {METRIC}={result.best[METRIC]:.4f} "
            f"at threshold {metrics.threshold_text(result.best['val_thr_best'])}"
        )
        # the trial's own values, valid JSON that --set takes back
        print("  config: " + json.dumps(result.best_config))
        from bldseg.ensemble.library import member_checkpoint

        ckpt = member_checkpoint(result.best["run_dir"])  # best.pt, or a K-fold run's folds.json
        print(f"  checkpoint: {ckpt}" + ("" if ckpt.is_file() else " (missing!)"))
    # the whole search's: a resumed search's epochs include those of its earlier sessions
    sessions = f" in {result.sessions} sessions" if result.sessions > 1 else ""
    print(
        f"\nwall {result.wall_s:.1f} s{sessions}; trial epochs {result.train_s:.1f} s over "
        f"{result.slots} slot(s): {100 * result.overhead:.1f}% of slot time not training"
    )
    if len(t) and "trial_s" in t:
        inside = float(t["trial_s"].sum() - result.train_s)
        print(
            f"orchestration overhead (Ray, MLflow, start-up): "
            f"{100 * result.orchestration_overhead:.1f}% of the wall time (ideal schedule of "
            f"the same epochs {result.ideal_s:.1f} s; {inside:.1f} s of it inside trials: "
            "reporting, checkpointing, MLflow)"
        )
    print(f"results: {result.path} (Ray cluster {result.ray_address})")
    serve = (
        ""
        if result.tracking_uri.startswith(("http://", "https://"))
        # quoted: a command to copy, and paths may hold spaces
        else f"mlflow ui --backend-store-uri {shlex.quote(result.tracking_uri)}, then open "
    )
    print(
        f"MLflow: {serve}{result.mlflow_url}   (experiment {result.experiment!r}, "
        f"run {result.name!r}: {result.parent_run_id})"
    )
    if result.n_completed == 0:
        counts = t["status"].value_counts().items() if "status" in t else []
        print(
            f"\nerror: no trial of {result.name} completed, so there is no best model ("
            + (", ".join(f"{n} {s}" for s, n in counts) or "no trial ran")
            + f"); first failure: {result.first_failure or 'unknown'}",
            file=sys.stderr,
        )
        return EXIT_NO_TRIAL_COMPLETED
    return EXIT_COMPLETED

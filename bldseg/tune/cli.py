"""The command line shared by ``experiments/tune_aug.py``, ``tune_sched.py`` and ``tune_tau.py``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import pandas as pd

from bldseg.data.prepare import add_data_arguments, data_options
from bldseg.tune.runner import METRIC, SearchSpec, run_search

#: Fixed trial settings for the built-in synthetic world on a 2-core CPU: the tiny model on
#: 64-px crops, so a default search (12 trials, ASHA) finishes in about 5 minutes.
CPU_DEMO = {
    "model": "upernet_internimage_tiny",
    "aug.crop_size": 64,
    "batch_size": 8,
    "samples_per_epoch": 768,
    "val_fraction": 0.2,
    "optim.lr": 3e-3,
}


def parse_set(items: list[str]) -> dict[str, Any]:
    """``["optim.lr=1e-3", "model=upernet_internimage_t"]`` -> typed dict (JSON values)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--set {item!r}: expected key=value, e.g. --set optim.lr=1e-3")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v  # a bare string such as a model name
    return out


def fixed_config(
    data: str | None,
    model: str | None = None,
    sets: list[str] = (),
    *,
    gpu: bool | None = None,
    split_group: str | None = None,
    announce: bool = False,
) -> dict:
    """Run-config values fixed for every run of an entry script.

    The CPU demo settings (:data:`CPU_DEMO`) on the built-in synthetic world and on any data
    when there is no GPU, so a search on a laptop finishes in minutes; ``upernet_internimage_t``
    on the user's data with a GPU. Then ``--model``, ``--split-group`` and ``--set key=value``
    on top.

    Args:
        data: ``--data`` (None: the synthetic world).
        model: ``--model``.
        sets: ``--set key=value`` items.
        gpu: Whether trials get a GPU; None: ``torch.cuda.is_available()``.
        split_group: ``--split-group`` regex.
        announce: Print which defaults were chosen when they are the CPU ones on user data.
    """
    if gpu is None:
        import torch

        gpu = torch.cuda.is_available()
    small = data is None or not gpu
    base: dict[str, Any] = dict(CPU_DEMO) if small else {"model": "upernet_internimage_t"}
    if model:
        base["model"] = model
    if split_group:
        base["split_group"] = split_group
    sets = parse_set(list(sets))
    base.update(sets)
    if announce and small and data is not None:
        kept = {k: v for k, v in CPU_DEMO.items() if k not in sets and not (k == "model" and model)}
        print(
            "no GPU: training on your data with the CPU demo's small settings "
            + json.dumps(kept)
            + "; pass --model / --set key=value (and --gpus-per-trial on a GPU machine) to change",
            flush=True,
        )
    return base


def build_parser(space: str, description: str) -> argparse.ArgumentParser:
    """The shared flags, with ``space`` as the default search space."""
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
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
    a(
        "--model",
        default=None,
        help="model name (default: upernet_internimage_tiny on a CPU or the synthetic world, "
        "upernet_internimage_t on your data with a GPU); see bldseg.models.list_models()",
    )
    a("--trials", type=int, default=12, help="number of trials (default 12)")
    a("--epochs", type=int, default=10, help="epochs per trial, ASHA's max_t (default 10)")
    a("--cpus-per-trial", type=float, default=1.0, help="CPUs reserved per trial (default 1)")
    a(
        "--gpus-per-trial",
        type=float,
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
    a("--grace-period", type=int, default=2, help="ASHA: epochs before a trial can be stopped")
    a("--name", default=None, help="experiment name (default: <space>-<timestamp>)")
    a(
        "--storage",
        default="runs",
        help="results folder; shared storage on a cluster (default runs)",
    )
    a(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: sqlite:////<cwd>/mlflow.db); an http:// server works",
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
        help="continue the interrupted search --name (default: the latest of this space)",
    )
    a("--seed", type=int, default=0, help="searcher seed (default 0)")
    a("--max-concurrent", type=int, default=0, help="max trials at once (default: resources)")
    a(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fix a run-config value for all trials, e.g. --set loss=bce_dice (repeatable)",
    )
    return p


def main(
    space: str,
    description: str,
    argv: list[str] | None = None,
) -> int:
    """Parses flags, runs the search, prints the trial table and where to look next."""
    args = build_parser(space, description).parse_args(argv)
    base = fixed_config(
        args.data or args.images,
        args.model,
        args.set,
        gpu=args.gpus_per_trial > 0 or None,
        split_group=args.split_group,
        announce=True,
    )
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
        storage=args.storage,
        tracking_uri=args.tracking_uri,
        address=args.address,
        resume=args.resume,
        seed=args.seed,
        data=args.data,
        data_options=data_options(args),
        data_root=args.data_root,
        max_concurrent=args.max_concurrent,
    )
    try:
        result = run_search(spec)
    except (RuntimeError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t = result.table
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
        print(f"\n=== {result.name}: {len(t)} trials ===")
        print(t[[c for c in cols if c in t.columns]].to_string(index=False))
    if result.best:
        print(
            f"\nbest trial {result.best['trial_id']}: {METRIC}={result.best[METRIC]:.4f} "
            f"at threshold {result.best['val_thr_best']:.3f}"
        )
        print(
            "  config: "
            + json.dumps(
                {
                    k.removeprefix("config/"): v
                    for k, v in result.best.items()
                    if k.startswith("config/")
                }
            )
        )
        print(f"  checkpoint: {result.best['run_dir']}/best.pt")
    print(
        f"\nwall {result.wall_s:.1f} s; trial epochs {result.train_s:.1f} s over "
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
    print(
        f"MLflow: mlflow ui --backend-store-uri {result.tracking_uri}   "
        f"(experiment {result.name!r}, parent run {result.parent_run_id})"
    )
    return 0

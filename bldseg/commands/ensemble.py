"""Exact k-of-N ensemble + threshold search over a search's trained models (issue 7).

Chooses the ensemble and threshold on a selection half of the validation tiles (split by
source image), reports them on both halves next to the best single model, and writes
top_ensembles.csv, score_vs_k.png, threshold_curve.png, summary.json, best_ensemble.json,
best_single.json (the best single model as a one-member spec) and submit.json (what to pass to
``bldseg predict --ensemble``: the ensemble only where the 95% interval of its gain on the
check half lies above 0, else the single model) to --out; with --tracking-uri also an MLflow
run.

Rules (--rules, --empty-tile), each searched exactly on the selection half and reported per
rule with 95% bootstrap intervals on the check half (and the test library, when present):
  mean      mean of the members' probabilities, one threshold (the default; always searched)
  vote      each member's own mask (its best threshold on the selection half); a pixel is
            positive where >= v of the k masks agree, every v in 1..k
  weighted  whole weights 1..--max-weight per member by coordinate passes from the
            --weighted-starts best mean ensembles, threshold searched for every weight vector
  --empty-tile  with every rule: a tile is predicted empty (-1) when >= m of its k members'
            own masks hold fewer than a pixels, m in 1..k and a from --empty-areas
best_ensemble.json holds the best rule on the selection half, best_ensemble_<rule>.json each.

The models are the run folders under --runs whose status.json says completed or early-stopped
(or that have none: older runs, models copied by hand); those of trials that failed, diverged
or never finished are left out with one warning naming each (--include-failed takes them).
--models takes every model given, with a warning for those whose status.json says they failed.

A flag that does not apply to the chosen method or rule is refused, not ignored: -k, --k-range,
--workers N and --address size or spread the exhaustive search, --greedy-size and --greedy-init
the greedy one; --empty-areas and --empty-candidates need --empty-tile, --max-weight and
--weighted-starts need --rules weighted, --experiment and --parent-run-id need --tracking-uri,
--include-failed needs --runs.

    bldseg ensemble --runs runs/augmentation-20261206-101500 -k 6
    bldseg ensemble --models runs/a runs/b runs/c --k-range 2 3 --workers 0
    bldseg ensemble --runs runs --method greedy --greedy-size 12
    bldseg ensemble --runs runs -k 6 --rules mean vote weighted --empty-tile
    python experiments/ensemble_search.py --runs runs -k 6   # from a checkout
    # on a Ray cluster (the address is also read from RAY_ADDRESS); python -m puts the
    # uploaded working directory, with its bldseg/, on the path:
    # (--out on the shared folder: a relative one would lie in Ray's temporary job folder)
    ray job submit --working-dir . -- python -m bldseg ensemble --runs /shared/results \\
        --out /shared/ensemble
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Any

import numpy as np

from bldseg import metrics
from bldseg.commands import experiment_name, interruptible, warn_job_relative_paths
from bldseg.ensemble.library import STATUS_FILE, find_runs, unusable_runs
from bldseg.ensemble.rules import DEFAULT_EMPTY_AREAS, RULES
from bldseg.ensemble.run import (
    InterruptedAfterPublishing,
    SearchConfig,
    check_threshold_range,
    make_out_dir,
    run_search,
    summary_lines,
)
from bldseg.ensemble.search import default_workers

#: The job's own defaults, which the flags' defaults and their help texts read.
DEFAULTS = SearchConfig()


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The flags of ``bldseg ensemble`` (``experiments/ensemble_search.py``).

    Args:
        prog: Program name in the usage line (default: the running script's name).
    """
    p = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--runs", help="search results folder (run folders found recursively)")
    src.add_argument("--models", nargs="+", help="run folders or val_probs.npz files")
    p.add_argument(
        "--include-failed",
        action="store_true",
        help="--runs: also take the runs whose trial failed, diverged or never finished (their "
        "status.json says so), e.g. to inspect them (default: left out with a warning)",
    )
    # Flags that apply only to some methods or rules default to None, so that one given where
    # it does not apply can be refused (_refuse_inapplicable); main() fills in the defaults.
    p.add_argument(
        "-k",
        type=int,
        default=None,
        help=f"exhaustive: ensemble size (default {DEFAULTS.k[0]})",
    )
    p.add_argument(
        "--k-range",
        nargs=2,
        type=int,
        metavar=("KMIN", "KMAX"),
        help="exhaustive: search every k in KMIN..KMAX instead of one -k",
    )
    p.add_argument(
        "--lo", type=float, default=0.30, help="lowest threshold, in [0, --hi] (default 0.30)"
    )
    p.add_argument(
        "--hi", type=float, default=0.70, help="highest threshold, in [--lo, 1] (default 0.70)"
    )
    p.add_argument("--method", choices=("exhaustive", "greedy"), default="exhaustive")
    p.add_argument(
        "--greedy-size",
        type=int,
        default=None,
        help=f"greedy: members to stop at (default {DEFAULTS.greedy_size})",
    )
    p.add_argument(
        "--greedy-init",
        type=int,
        default=None,
        help="greedy: start from this many best single models (sorted initialisation; "
        f"default {DEFAULTS.greedy_init})",
    )
    p.add_argument("--kernel", choices=("native", "numpy"), default="native")
    p.add_argument(
        "--rules",
        nargs="+",
        choices=RULES,
        default=["mean"],
        help="ensemble rules to search (default: mean; mean is always searched)",
    )
    p.add_argument(
        "--empty-tile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also search the empty-tile rule with every rule (default: off)",
    )
    p.add_argument(
        "--empty-areas",
        nargs="+",
        type=int,
        default=None,
        metavar="PX",
        help="empty-tile rule: pixel counts a searched (default: "
        + " ".join(map(str, DEFAULT_EMPTY_AREAS))
        + "; 1: the member predicts nothing)",
    )
    p.add_argument(
        "--empty-candidates",
        type=int,
        default=None,
        help="empty-tile rule: searched on this many best ensembles per rule (default "
        f"{DEFAULTS.empty_candidates})",
    )
    p.add_argument(
        "--weighted-starts",
        type=int,
        default=None,
        help="weighted rule: start from this many best mean ensembles (default "
        f"{DEFAULTS.weighted_starts})",
    )
    p.add_argument(
        "--max-weight",
        type=int,
        default=None,
        help=f"weighted rule: weights 1..this (default {DEFAULTS.max_weight})",
    )
    p.add_argument(
        "--address",
        default=None,
        help="exhaustive: Ray cluster address (default: RAY_ADDRESS, else a local Ray)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="exhaustive: concurrent Ray tasks (default: the cluster's CPUs; 0: no Ray)",
    )
    p.add_argument("--top", type=int, default=20, help="rows of the result table")
    p.add_argument("--out", default="ensemble_out", help="output folder")
    p.add_argument(
        "--test-file",
        default="test_probs.npz",
        help="held-out test library file next to each val_probs.npz, if present; scored only, "
        "never chosen on: files that do not fit (stale, unreadable, other tiles) are left out "
        "with a warning ('': none)",
    )
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI, checked before the search starts (default: none)",
    )
    p.add_argument(
        "--experiment",
        type=experiment_name,
        default=None,
        help=(
            f"MLflow experiment (default {DEFAULTS.experiment}; with --parent-run-id, the "
            "parent run's)"
        ),
    )
    p.add_argument(
        "--parent-run-id", default=None, help="MLflow parent run id (checked: it must exist)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the selection/check split")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _refuse_inapplicable(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Exits with a usage error (status 2) when a flag is given where it has no effect.

    Such a flag used to be ignored without a word (``-k 2 --method greedy`` searched a greedy
    ensemble of up to --greedy-size members), so the run answered another question than the
    one asked. The flags that can be refused default to None: given is told from default.
    """
    if a.k is not None and a.k_range is not None:
        p.error("-k and --k-range both set the ensemble sizes; give one of them")
    if a.include_failed and a.models:
        p.error(
            "--include-failed takes the failed runs found under --runs; --models takes every "
            "model given (drop --include-failed)"
        )
    # checked here, before Ray starts; the search checks k against the library's size
    if a.k is not None and a.k < 1:
        p.error(f"-k must be at least 1, got {a.k}")
    if a.k_range is not None and not 1 <= a.k_range[0] <= a.k_range[1]:
        kmin, kmax = a.k_range
        p.error(f"--k-range {kmin} {kmax}: the sizes KMIN..KMAX need 1 <= KMIN <= KMAX")
    if a.workers is not None and a.workers < 0:
        p.error(f"--workers must be 0 (no Ray) or more, got {a.workers}")
    if a.method == "greedy":
        for flag, given in (("-k", a.k), ("--k-range", a.k_range)):
            if given is not None:
                p.error(
                    f"{flag} sizes the exhaustive search; --method greedy stops at "
                    "--greedy-size members (drop it, or drop --method greedy)"
                )
        if a.rules != ["mean"] or a.empty_tile:
            # run_search refuses these too, but only after the tracking check
            p.error("--rules vote/weighted and --empty-tile need --method exhaustive")
        # greedy runs in this process: it never starts or joins Ray (--workers 0 says so)
        if a.workers:
            p.error(
                "--workers splits the exhaustive search over Ray tasks; --method greedy runs "
                "in this process (drop --workers)"
            )
        if a.address is not None:
            p.error(
                "--address names the Ray cluster of the exhaustive search; --method greedy "
                "runs in this process (drop --address)"
            )
    else:
        for flag, given in (("--greedy-size", a.greedy_size), ("--greedy-init", a.greedy_init)):
            if given is not None:
                p.error(f"{flag} sets the greedy search; it needs --method greedy")
    if a.workers == 0 and a.address is not None:
        p.error("--address joins a Ray cluster, but --workers 0 runs without Ray; drop one")
    if not a.empty_tile:
        for flag, given in (
            ("--empty-areas", a.empty_areas),
            ("--empty-candidates", a.empty_candidates),
        ):
            if given is not None:
                p.error(f"{flag} sets the empty-tile rule; it needs --empty-tile")
    if "weighted" not in a.rules:
        for flag, given in (
            ("--max-weight", a.max_weight),
            ("--weighted-starts", a.weighted_starts),
        ):
            if given is not None:
                p.error(f"{flag} sets the weighted rule; it needs --rules weighted")
    # before the mean search: the weighted one refused them only after it, leaving --out
    for flag, given in (("--max-weight", a.max_weight), ("--weighted-starts", a.weighted_starts)):
        if given is not None and given < 1:
            p.error(f"{flag} must be at least 1, got {given}")
    if "weighted" in a.rules and a.max_weight is not None:
        k_max = a.k_range[1] if a.k_range else a.k if a.k is not None else max(DEFAULTS.k)
        if metrics.QUANT_MAX * a.max_weight * k_max > np.iinfo(np.uint16).max:
            p.error(
                f"--max-weight {a.max_weight} with ensembles of up to {k_max} members: weighted "
                f"sums of 0..{metrics.QUANT_MAX} maps must fit in uint16 (at most "
                f"{np.iinfo(np.uint16).max // (metrics.QUANT_MAX * k_max)} here)"
            )
    if not a.tracking_uri:
        for flag, given in (("--experiment", a.experiment), ("--parent-run-id", a.parent_run_id)):
            if given is not None:
                p.error(f"{flag} sets the MLflow run; it needs --tracking-uri")


def given(value: Any, default: Any) -> Any:
    """A flag's value, else the job's default."""
    return default if value is None else value


def _parent_experiment(client: Any, run_id: str, typed: str | None, uri: str) -> str:
    """The experiment the search logs to under ``--parent-run-id``: the parent run's own.

    MLflow's UI nests a child run only under a parent of its experiment; the parent was not
    looked up, so a mistyped id or one of another experiment (the default ``ensemble_search``
    beside a search's ``bldseg``) gave a run linked to nothing visible, exit 0.

    Raises:
        ValueError: No such run in the store, a deleted run or one of a deleted experiment,
            or an ``--experiment`` typed other than the parent's.
    """
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        raise ValueError(
            f"--parent-run-id {run_id}: no such run in MLflow tracking store {uri} ({e.message})"
        ) from None
    experiment = client.get_experiment(run.info.experiment_id)
    name = experiment.name
    if experiment.lifecycle_stage == "deleted":  # its runs are deleted with it
        raise ValueError(
            f"--parent-run-id {run_id} is a run of the deleted experiment {name!r}: restore it "
            f"(`mlflow experiments restore --experiment-id {experiment.experiment_id}`) or pass "
            "another parent"
        )
    if run.info.lifecycle_stage == "deleted":
        raise ValueError(
            f"--parent-run-id {run_id} is a deleted run: restore it (`mlflow runs restore "
            f"--run-id {run_id}`) or pass another parent"
        )
    if typed is not None and typed != name:
        raise ValueError(
            f"--parent-run-id {run_id} is a run of experiment {name!r}, not of --experiment "
            f"{typed!r}: MLflow nests a run only under a parent of its own experiment; leave "
            f"--experiment out (the parent's is taken) or pass --experiment {name}"
        )
    return name


def _warn_failed_models(models: list[str], prog: str, include_failed: bool) -> None:
    """One warning line naming the models whose ``status.json`` says their run failed.

    They are searched all the same: --models named them, or --include-failed asked for them.
    """
    failed = unusable_runs(models)
    if not failed:
        return
    listing = ", ".join(f"{path} ({status})" for path, status in failed)
    how = (
        "searched as --include-failed asks (without it they are left out)"
        if include_failed
        else "searched as given (leave them out of --models to search finished models only)"
    )
    print(
        f"{prog}: warning: {len(failed)} of the {len(models)} models did not complete (their "
        f"{STATUS_FILE} says they failed, diverged or never finished): {listing}; {how}",
        file=sys.stderr,
    )


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Runs the search and prints the chosen ensemble; returns the exit status.

    Bad input (a missing folder, k larger than the library, a flag that does not apply to the
    chosen method or rule, an unreachable --tracking-uri or --address, an --out that cannot be
    a folder, ...) is one line on stderr and status 2; the tracking store, --out and the Ray
    head are checked before Ray or the data are touched. Ctrl-C is one line and status 130.

    Args:
        argv: Arguments after the command (default: ``sys.argv[1:]``).
        prog: Program name in the usage line.
    """
    parser = build_parser(prog)
    a = parser.parse_args(argv)
    _refuse_inapplicable(parser, a)
    # without --tracking-uri the ensemble logs to no MLflow store
    warn_job_relative_paths(parser.prog, {"--out": a.out}, a.tracking_uri or False)
    try:  # outside [0, 1] the sweep was clipped without a word, and lo > hi said "widen"
        check_threshold_range(a.lo, a.hi)
    except ValueError as err:
        parser.error(str(err))
    return interruptible(parser.prog, lambda: _ensemble(parser, a), lambda e: _interrupted(a, e))


def _interrupted(a: argparse.Namespace, err: KeyboardInterrupt) -> str:
    """What an interrupted ``bldseg ensemble`` says it wrote."""
    if isinstance(err, InterruptedAfterPublishing):
        return (
            f"the outputs are in --out {a.out}, but the MLflow run was not finished (marked "
            "KILLED if it was started)"
        )
    # the outputs are staged and moved into --out only once all are written
    return (
        f"nothing was written to --out {a.out} (an earlier run's outputs there are as they "
        "were); run the same command again"
    )


def _ensemble(parser: argparse.ArgumentParser, a: argparse.Namespace) -> int:
    """Runs the search (``main`` after its flags are checked)."""
    if a.k_range:
        ks = list(range(a.k_range[0], a.k_range[1] + 1))
    else:
        ks = [a.k] if a.k is not None else list(DEFAULTS.k)
    workers = a.workers
    models = a.models or []
    if a.runs and not a.models:
        try:  # before Ray: a mistyped --runs should not first start or join a cluster
            with warnings.catch_warnings():
                # the search finds them again and warns of the runs it leaves out then, once
                warnings.simplefilter("ignore")
                found = find_runs(a.runs, include_failed=a.include_failed)
        except FileNotFoundError as err:
            print(f"{parser.prog}: error: {err}", file=sys.stderr)
            return 2
        if a.include_failed:
            _warn_failed_models([str(r) for r in found], parser.prog, True)
    _warn_failed_models(models, parser.prog, False)
    uri = None
    experiment = given(a.experiment, DEFAULTS.experiment)
    if a.tracking_uri:
        from bldseg.tune import tracking

        # Absolute, as bldseg tune and pipeline make it: sqlite:///x.db names one database
        # wherever the job's processes run. Checked now, with a short probe: an unreachable
        # server would otherwise let the whole search run, then fail after MLflow's minutes
        # of retries, with a traceback instead of the result.
        uri = tracking.absolute_uri(a.tracking_uri)
        try:
            client = tracking.check_tracking(uri, experiment=a.experiment or DEFAULTS.experiment)
            if a.parent_run_id:
                experiment = _parent_experiment(client, a.parent_run_id, a.experiment, uri)
        except (RuntimeError, ValueError) as err:  # its message names the URI and what to do
            print(f"{parser.prog}: error: {err}", file=sys.stderr)
            return 2
        except OSError as err:  # MLflow creating a sqlite store's folder, e.g. under a file
            msg = f"cannot use MLflow tracking store {uri}: {err}"
            print(f"{parser.prog}: error: {msg}", file=sys.stderr)
            return 2
    try:  # before Ray: an --out under a file should not first start or join a cluster
        make_out_dir(a.out)
    except ValueError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    if a.method == "exhaustive" and workers != 0:
        from bldseg.tune.runner import init_ray

        # Joins --address or RAY_ADDRESS (set under `ray job submit`); else a local Ray on
        # 127.0.0.1 only. An unreachable head is refused at once (ray.init waits minutes).
        try:
            init_ray(a.address)
        except ValueError as err:
            print(f"{parser.prog}: error: {err}", file=sys.stderr)
            return 2
        workers = workers or default_workers()

    cfg = SearchConfig(
        runs=a.runs,
        models=models,
        include_failed=a.include_failed,
        k=ks,
        lo=a.lo,
        hi=a.hi,
        method=a.method,
        greedy_size=given(a.greedy_size, DEFAULTS.greedy_size),
        greedy_init=given(a.greedy_init, DEFAULTS.greedy_init),
        kernel=a.kernel,
        workers=workers or 0,
        top=a.top,
        out=a.out,
        seed=a.seed,
        test_file=a.test_file,
        tracking_uri=uri,
        experiment=experiment,
        parent_run_id=a.parent_run_id,
        progress=not a.no_progress,
        rules=["mean", *(r for r in a.rules if r != "mean")],
        empty_tile=a.empty_tile,
        empty_areas=given(a.empty_areas, list(DEFAULT_EMPTY_AREAS)),
        empty_candidates=given(a.empty_candidates, DEFAULTS.empty_candidates),
        weighted_starts=given(a.weighted_starts, DEFAULTS.weighted_starts),
        max_weight=given(a.max_weight, DEFAULTS.max_weight),
    )
    try:
        s = run_search(cfg)
    except (ValueError, FileNotFoundError) as err:  # bad input: a message, not a traceback
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    for line in summary_lines(s):
        print(line)
    print(
        json.dumps(
            {"files": s.files, "mlflow_run_id": s.mlflow_run_id, "seconds": round(s.seconds, 2)},
            indent=2,
        )
    )
    return 0

"""Exact k-of-N ensemble + threshold search over a search's trained models (issue 7).

Chooses the ensemble and threshold on a selection half of the validation tiles (split by
source image), reports them on both halves next to the best single model, and writes
top_ensembles.csv, score_vs_k.png, threshold_curve.png, summary.json and best_ensemble.json
(for ``bldseg predict --ensemble``) to --out; with --tracking-uri also an MLflow run.

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

    bldseg ensemble --runs runs/augmentation-20261206-101500 -k 6
    bldseg ensemble --models runs/a runs/b runs/c --k-range 2 3 --workers 0
    bldseg ensemble --runs runs --method greedy --greedy-size 12
    bldseg ensemble --runs runs -k 6 --rules mean vote weighted --empty-tile
    python experiments/ensemble_search.py --runs runs -k 6   # from a checkout
    # on a Ray cluster (the address is also read from RAY_ADDRESS); python -m puts the
    # uploaded working directory, with its bldseg/, on the path:
    ray job submit --working-dir . -- python -m bldseg ensemble --runs /shared/results
"""

from __future__ import annotations

import argparse
import json
import sys

from bldseg.ensemble.library import find_runs
from bldseg.ensemble.rules import DEFAULT_EMPTY_AREAS, RULES
from bldseg.ensemble.run import SearchConfig, run_search, summary_lines
from bldseg.ensemble.search import default_workers


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
    p.add_argument("-k", type=int, default=6, help="ensemble size (default 6)")
    p.add_argument(
        "--k-range",
        nargs=2,
        type=int,
        metavar=("KMIN", "KMAX"),
        help="search every k in KMIN..KMAX instead of -k",
    )
    p.add_argument("--lo", type=float, default=0.30, help="lowest threshold (default 0.30)")
    p.add_argument("--hi", type=float, default=0.70, help="highest threshold (default 0.70)")
    p.add_argument("--method", choices=("exhaustive", "greedy"), default="exhaustive")
    p.add_argument("--greedy-size", type=int, default=10, help="greedy: members to stop at")
    p.add_argument("--greedy-init", type=int, default=0, help="greedy: sorted initialisation")
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
        default=list(DEFAULT_EMPTY_AREAS),
        metavar="PX",
        help="empty-tile rule: pixel counts a searched (default: "
        + " ".join(map(str, DEFAULT_EMPTY_AREAS))
        + "; 1: the member predicts nothing)",
    )
    p.add_argument(
        "--empty-candidates",
        type=int,
        default=5,
        help="empty-tile rule: searched on this many best ensembles per rule (default 5)",
    )
    p.add_argument(
        "--weighted-starts",
        type=int,
        default=3,
        help="weighted rule: start from this many best mean ensembles (default 3)",
    )
    p.add_argument(
        "--max-weight", type=int, default=3, help="weighted rule: weights 1..this (default 3)"
    )
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="concurrent Ray tasks (default: the cluster's CPUs; 0: no Ray)",
    )
    p.add_argument("--top", type=int, default=20, help="rows of the result table")
    p.add_argument("--out", default="ensemble_out", help="output folder")
    p.add_argument(
        "--test-file",
        default="test_probs.npz",
        help="held-out test library file next to each val_probs.npz, if present",
    )
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: none)")
    p.add_argument("--experiment", default="ensemble_search", help="MLflow experiment")
    p.add_argument("--parent-run-id", default=None, help="MLflow parent run id")
    p.add_argument("--seed", type=int, default=0, help="seed of the selection/check split")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Runs the search and prints the chosen ensemble; returns the exit status.

    Bad input (a missing folder, k larger than the library, ...) is one line on stderr and
    status 2.

    Args:
        argv: Arguments after the command (default: ``sys.argv[1:]``).
        prog: Program name in the usage line.
    """
    parser = build_parser(prog)
    a = parser.parse_args(argv)
    ks = list(range(a.k_range[0], a.k_range[1] + 1)) if a.k_range else [a.k]
    workers = a.workers
    if a.runs and not a.models:
        try:  # before Ray: a mistyped --runs should not first start or join a cluster
            find_runs(a.runs)
        except FileNotFoundError as err:
            print(f"{parser.prog}: error: {err}", file=sys.stderr)
            return 2
    if a.method == "exhaustive" and workers != 0:
        from bldseg.tune.runner import init_ray

        # Joins --address or RAY_ADDRESS (set under `ray job submit`); else a local Ray on
        # 127.0.0.1 only.
        init_ray(a.address)
        workers = workers or default_workers()
    cfg = SearchConfig(
        runs=a.runs,
        models=a.models or [],
        k=ks,
        lo=a.lo,
        hi=a.hi,
        method=a.method,
        greedy_size=a.greedy_size,
        greedy_init=a.greedy_init,
        kernel=a.kernel,
        workers=workers or 0,
        top=a.top,
        out=a.out,
        seed=a.seed,
        test_file=a.test_file,
        tracking_uri=a.tracking_uri,
        experiment=a.experiment,
        parent_run_id=a.parent_run_id,
        progress=not a.no_progress,
        rules=["mean", *(r for r in a.rules if r != "mean")],
        empty_tile=a.empty_tile,
        empty_areas=a.empty_areas,
        empty_candidates=a.empty_candidates,
        weighted_starts=a.weighted_starts,
        max_weight=a.max_weight,
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

"""Exact k-of-N ensemble + threshold search over a search's trained models (issue 7).

Chooses the ensemble and threshold on a selection half of the validation tiles (split by
source image), reports them on both halves next to the best single model, and writes
top_ensembles.csv, score_vs_k.png, threshold_curve.png, summary.json and best_ensemble.json
(for ``experiments/predict.py --ensemble``) to --out; with --tracking-uri also an MLflow run.

    python experiments/ensemble_search.py --runs ray_results/tune_aug -k 6
    python experiments/ensemble_search.py --models runs/a runs/b runs/c --k-range 2 3 --workers 0
    python experiments/ensemble_search.py --runs ray_results --method greedy --greedy-size 12
    # on a Ray cluster (the address is also read from RAY_ADDRESS):
    ray job submit --working-dir . -- python experiments/ensemble_search.py --runs /shared/results
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bldseg.ensemble.run import SearchConfig, run_search
from bldseg.ensemble.search import default_workers


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
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
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    ks = list(range(a.k_range[0], a.k_range[1] + 1)) if a.k_range else [a.k]
    workers = a.workers
    if a.method == "exhaustive" and workers != 0:
        import ray

        # ray.init() connects to RAY_ADDRESS when set (e.g. under `ray job submit`).
        address = a.address or os.environ.get("RAY_ADDRESS")
        ray.init(
            address=address,
            log_to_driver=False,
            **({} if address else {"include_dashboard": False}),
        )
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
    )
    try:
        s = run_search(cfg)
    except (ValueError, FileNotFoundError) as err:  # bad input: a message, not a traceback
        print(f"ensemble_search: error: {err}", file=sys.stderr)
        return 2
    for who, d in (("ensemble", s.best), ("best single", s.best_single)):
        extra = f", test {d['test_dice']:.5f}" if "test_dice" in d else ""
        print(
            f"{who:12s} {d['members']} @ t={d['threshold']:.4f}: selection "
            f"{d['selection_dice']:.5f}, check {d['check_dice']:.5f}{extra}"
        )
    print(
        json.dumps(
            {"files": s.files, "mlflow_run_id": s.mlflow_run_id, "seconds": round(s.seconds, 2)},
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

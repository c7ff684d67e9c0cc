"""Benchmark the exact searches of the ensemble rules (issue 16) against plain numpy loops.

On one synthetic library (``bldseg.ensemble.synthetic.fake_library``), on one core:

1. ``vote``: every k-combination's vote of the members' own masks at every count 1..k, by
   the exhaustive kernel on the masks (``rules.vote_search``) vs a plain loop (sum the masks,
   every count, ``metrics.competition_score``);
2. ``weighted``: coordinate passes over whole weights from the best mean ensembles
   (``rules.weighted_search``, one histogram per weight vector) vs the same passes scoring
   every level of the float weighted mean with ``competition_score``;
3. ``empty``: the empty-tile rule searched jointly with the cut for the best mean and the best
   vote ensemble (``rules.empty_search``, per-tile counts) vs a loop thresholding, emptying
   and scoring every (area, members, cut).

Each row checks that both give the same result (members, cut, weights, rule and score, bit
for bit); when a row disagrees, the script writes its table and JSON and exits with status 1,
naming the rows. Each pair is timed ``--repeats`` times, in rounds that run both once (the
order reversed every other round): the table and the JSON give the median and the min-max of
each (``spread`` in the JSON holds every round), and the JSON the CPU and thread counts.
Prints a table and writes JSON with --json. The defaults run in about a minute.

    python experiments/bench_ensemble_rules.py
    python experiments/bench_ensemble_rules.py --models 10 --tiles 64 --json bench/rules.json
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import platform
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bldseg import metrics
from bldseg.ensemble import kernels
from bldseg.ensemble import rules as R
from bldseg.ensemble.search import exhaustive_search
from bldseg.ensemble.synthetic import fake_library
from bldseg.io import write_json
from bldseg.timing import rounds, spread


def plain_vote(lib, levels, k):
    """Every combination's best vote count, plain loop; best first like the search."""
    out = []
    for rank, combo in enumerate(itertools.combinations(range(lib.n_models), k)):
        votes = sum((lib.probs[m] >= levels[m]).astype(np.uint8) for m in combo)  # (T, S, S)
        scores = [metrics.competition_score(votes >= v, lib.truth) for v in range(1, k + 1)]
        v = int(np.argmax(scores))
        out.append(R.RuleEnsemble("vote", combo, (1,) * k, v + 1, scores[v], rank))
    return sorted(out, key=lambda e: (-e.score, e.k, e.rank))


def plain_weighted(lib, starts, lo, hi, max_weight):
    """The coordinate passes of ``rules.weighted_search`` with plain scoring."""
    out = []
    for start in starts:
        w = [1] * start.k
        level, score = R.brute_force_weighted(lib, start.members, w, lo, hi)
        changed = True
        while changed:
            changed = False
            for i in range(len(w)):
                for value in range(1, max_weight + 1):
                    trial = [*w[:i], value, *w[i + 1 :]]
                    if value == w[i] or math.gcd(*trial) > 1:
                        continue
                    lv, sc = R.brute_force_weighted(lib, start.members, trial, lo, hi)
                    if sc > score:
                        w, level, score, changed = trial, lv, sc, True
        out.append(R.RuleEnsemble("weighted", start.members, tuple(w), level, score, start.rank))
    return sorted(out, key=lambda e: -e.score)


def run(args) -> list[dict]:
    lib = fake_library(
        args.models,
        args.tiles,
        args.size,
        seed=args.seed,
        empty_fraction=0.5,
        rho=0.2,
        tiles_per_image=2,
    )
    lo, hi, k = args.lo, args.hi, args.k
    kernels.load_native()  # built before any timing
    levels = R.member_levels(lib, lo, hi)
    top, _ = exhaustive_search(lib, k, lo, hi, top=max(args.starts, 2), progress=False)
    n_comb = math.comb(lib.n_models, k)
    rows = []

    def add(mode, units, unit, fast_fn, plain_fn):
        # side by side: a slow spell of the machine is shared
        seconds, first = rounds({"fast": fast_fn, "plain": plain_fn}, args.repeats)
        fast, t_fast, plain, t_plain = (
            first["fast"],
            seconds["fast"],
            first["plain"],
            seconds["plain"],
        )
        fast_s, plain_s = statistics.median(t_fast), statistics.median(t_plain)
        # paired within each round: both ran side by side
        ratios = [p / f if f > 0 else float("inf") for f, p in zip(t_fast, t_plain, strict=True)]
        rows.append(
            {
                "mode": mode,
                "units": units,
                "unit": unit,
                # medians over the rounds (min-max and every round in "spread")
                "fast_s": fast_s,
                "plain_s": plain_s,
                "speedup": plain_s / fast_s if fast_s > 0 else float("inf"),
                "spread": {
                    "fast_s": spread(t_fast),
                    "plain_s": spread(t_plain),
                    "speedup": spread(ratios),
                },
                "same_result": fast == plain,
                "best": {
                    "rule": fast[0].rule,
                    "members": list(fast[0].members),
                    "weights": list(fast[0].weights),
                    "cut": fast[0].cut,
                    "score": fast[0].score,
                    "empty": [fast[0].empty_votes, fast[0].empty_area],
                },
            }
        )

    add(
        "vote (all combinations x counts)",
        n_comb,
        "comb",
        lambda: R.vote_search(lib, levels, k, top=n_comb, method="native", progress=False)[0],
        lambda: plain_vote(lib, levels, k),
    )

    starts = top[: args.starts]
    add(
        "weighted (coordinate passes)",
        len(starts),
        "start",
        lambda: R.weighted_search(lib, starts, lo, hi, max_weight=3),
        lambda: plain_weighted(lib, starts, lo, hi, 3),
    )

    vote_best = R.vote_search(lib, levels, k, top=1, progress=False)[0][0]
    cands = [R.from_mean(top[0]), vote_best]
    areas = R.DEFAULT_EMPTY_AREAS
    add(
        "empty-tile (areas x m x cut)",
        len(cands),
        "ensemble",
        lambda: [R.empty_search(lib, e, levels, areas, lo, hi) for e in cands],
        lambda: [R.brute_force_empty(lib, e, levels, areas, lo, hi) for e in cands],
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", type=int, default=8, help="library size N (default 8)")
    p.add_argument("--tiles", type=int, default=32, help="tiles (default 32)")
    p.add_argument("--size", type=int, default=64, help="tile side in px (default 64)")
    p.add_argument("-k", "--k", type=int, default=3, help="ensemble size (default 3)")
    p.add_argument("--starts", type=int, default=2, help="weighted: starts (default 2)")
    p.add_argument("--lo", type=float, default=0.30)
    p.add_argument("--hi", type=float, default=0.70)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="rounds of each pair, both once per round (default 3): median and min-max",
    )
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    rows = run(args)
    print(
        f"library: {args.models} models x {args.tiles} tiles of {args.size}^2, k={args.k}, "
        f"thresholds [{args.lo}, {args.hi}], one process; seconds: median [min-max] of "
        f"{args.repeats} rounds"
    )
    head = (
        f"{'mode':34s} {'units':>9s} {'fast s':>9s} {'[min-max]':>15s} {'plain s':>9s} "
        f"{'[min-max]':>15s} {'speedup':>8s}  same"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        units = f"{r['units']} {r['unit']}"
        fs, ps = (r["spread"][key] for key in ("fast_s", "plain_s"))
        fast_span, plain_span = (f"[{s['min']:.3f}-{s['max']:.3f}]" for s in (fs, ps))
        print(
            f"{r['mode']:34s} {units:>9s} {r['fast_s']:9.3f} {fast_span:>15s} "
            f"{r['plain_s']:9.3f} {plain_span:>15s} "
            f"{r['speedup']:7.1f}x  {'yes' if r['same_result'] else 'NO'}"
        )
    if args.json:
        out = {
            "config": vars(args),
            "machine": {
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                # the searches run on one thread; recorded for comparisons
                "torch_threads": torch.get_num_threads(),
            },
            "rows": rows,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json, out)
        print(f"wrote {args.json}")
    # Checked explicitly, not by assert (python -O removes asserts): disagreeing searches make
    # the times meaningless, and a script or CI running this must see it fail.
    disagree = [r["mode"] for r in rows if not r["same_result"]]
    if disagree:
        print(
            f"bench_ensemble_rules: the fast and the plain search disagree: "
            f"{'; '.join(disagree)} (each row's fast best is in the JSON)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

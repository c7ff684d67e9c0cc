"""Benchmark the exact ensemble search (issue 7) on synthetic libraries.

1. Per combination, on one core, on the same combinations of one library (27 models):
   - ``naive``: the reference workflow's plain numpy loop: mean map, then for every threshold
     level of [lo, hi] binarise and compute the per-image Dice and its mean;
   - ``numpy-hist``: one per-image histogram of the summed map per combination
     (``bldseg.metrics.level_counts``), Dice at every level from cumulative counts;
   - ``native``: pruned pixels + incremental sums + block bounds + compiled kernel
     (``bldseg.ensemble``), as the search runs it (a top-20 heap: combinations that cannot
     enter it end after the bounds), and ``native-all`` with every combination scored to the
     end (no floor); ``--blocks`` also times other block sizes of the kernel's bounds.
   All must give the same best (combination, level, score): when any disagrees, the script
   writes its JSON and exits with status 1, naming the methods that disagree.
2. Scale: a 2,000-tile 224^2 library of 27 models, k=6: combinations per second with 1 and 2
   Ray workers on the same rank ranges spread over C(27, 6) = 296,010 (each task starting
   without a floor, so a conservative rate), the projected full-search time, and with
   ``--full`` the whole search as ``exhaustive_search`` runs it on 2 workers, timed.

Every timing is taken ``--repeats`` times, in rounds in which each arm runs once (the order
reversed every other round, so a slow spell of the machine does not land on one arm): the
table and the JSON give the median and the min-max over the rounds (``spread`` in the JSON
holds every round), and the JSON the CPU and thread counts. Prints a table and writes JSON
with --json.

    python experiments/bench_ensemble.py --full --json bench/ensemble.json
    python experiments/bench_ensemble.py --skip-scale --blocks 8,16,32,64
    python experiments/bench_ensemble.py --quick          # small sizes, a smoke test
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bldseg import metrics
from bldseg.ensemble import kernels
from bldseg.ensemble.combinatorics import chunk_ranges, n_combinations, unrank
from bldseg.ensemble.prune import level_window, prune
from bldseg.ensemble.search import exhaustive_search, score_members
from bldseg.ensemble.synthetic import fake_library
from bldseg.io import write_json
from bldseg.timing import rounds, spread
from bldseg.tune.runner import init_ray


def naive_best(probs, truth, combo, lo, hi) -> tuple[int, float]:
    """The plain loop: mean map, every level in [lo, hi], per-image Dice, mean."""
    k = len(combo)
    total = probs[list(combo)].astype(np.uint16).sum(axis=0)  # (T, S, S): the mean map x 255k
    first, last = level_window(k, lo, hi)
    best = (-1, -1.0)
    for level in range(first, last + 1):
        s = metrics.competition_score(total >= level, truth)
        if s > best[1]:
            best = (level, s)
    return best


def per_combination(args) -> dict:
    lib = fake_library(args.models, args.tiles, args.size, seed=args.seed)
    k, lo, hi = args.k, args.lo, args.hi
    n = lib.n_models
    combos = [unrank(r, n, k) for r in range(args.naive_combos)]

    kernels.load_native()
    first, last = level_window(k, lo, hi)
    t = time.perf_counter()
    pl = prune(lib.probs, lib.truth, k, first, last)
    t_prune = time.perf_counter() - t
    off, lev, sc = kernels.search_chunk(pl, combos[0], len(combos), len(combos))
    native = sorted(zip(off.tolist(), lev.tolist(), sc.tolist(), strict=True))
    native = [(lv, s) for _, lv, s in native]
    # Time per combination over a longer run (start-up amortised as in a real search).
    count = args.native_combos
    start = unrank(0, n, k)
    blocks = sorted(set(args.blocks))

    def chunk(top, block=kernels.DEFAULT_BLOCK):
        return lambda: kernels.search_chunk(pl, start, count, top, block=block)

    arms = {
        "naive": lambda: [naive_best(lib.probs, lib.truth, c, lo, hi) for c in combos],
        "numpy-hist": lambda: [score_members(lib.probs, lib.truth, c, lo, hi)[1:] for c in combos],
        "native": chunk(20),
        "native-all": chunk(count),
        **{f"block {b}": chunk(20, b) for b in blocks},
    }
    seconds, results = rounds(arms, args.repeats)
    per = {name: len(combos) if name in ("naive", "numpy-hist") else count for name in arms}
    ms = {name: [1e3 * s / per[name] for s in seconds[name]] for name in arms}  # per combination
    best, every = results["native"], results["native-all"]
    # The top-20 run and the run scoring everything agree on the best combinations.
    same_top = all(
        np.array_equal(a, b[: len(a)]) for a, b in zip(best, every, strict=True)
    ) and len(best[0]) == min(20, count)
    checks = {
        "numpy-hist vs naive": results["numpy-hist"] == results["naive"],
        "native vs naive": native == results["naive"],
        "native top-20 vs native-all": same_top,
    }
    for b in blocks:
        same_b = all(np.array_equal(x, y) for x, y in zip(results[f"block {b}"], best, strict=True))
        checks[f"block {b} vs block {kernels.DEFAULT_BLOCK}"] = same_b
    disagree = [name for name, ok in checks.items() if not ok]
    keys = {
        "naive": "naive_ms",
        "numpy-hist": "numpy_hist_ms",
        "native": "native_ms",
        "native-all": "native_all_ms",
    }
    med = {name: statistics.median(v) for name, v in ms.items()}

    def ratios(a: str, b: str) -> list[float]:
        # paired within each round: both arms ran minutes apart at most
        return [x / y for x, y in zip(ms[a], ms[b], strict=True)]

    return {
        "library": f"{n} models x {args.tiles} tiles x {args.size}^2, k={k}, [{lo}, {hi}]",
        "levels": last - first + 1,
        "kept_fraction": pl.kept_fraction,
        "prune_s": t_prune,
        "same_result": not disagree,
        "disagreements": disagree,
        # medians over the rounds (min-max and every round in "spread")
        **{key: med[name] for name, key in keys.items()},
        "speedup_vs_naive": med["naive"] / med["native"],
        "speedup_all_vs_naive": med["naive"] / med["native-all"],
        "speedup_vs_numpy_hist": med["numpy-hist"] / med["native"],
        "block": kernels.DEFAULT_BLOCK,
        "blocks_ms": {b: med[f"block {b}"] for b in blocks},
        "naive_combos": len(combos),
        "native_combos": count,
        "repeats": args.repeats,
        "spread": {
            **{key: spread(ms[name]) for name, key in keys.items()},
            "blocks_ms": {b: spread(ms[f"block {b}"]) for b in blocks},
            "speedup_vs_naive": spread(ratios("naive", "native")),
            "speedup_all_vs_naive": spread(ratios("naive", "native-all")),
            "speedup_vs_numpy_hist": spread(ratios("numpy-hist", "native")),
        },
    }


def scale(args) -> dict:
    import ray

    t = time.perf_counter()
    lib = fake_library(args.models, args.scale_tiles, args.size, seed=args.seed)
    t_gen = time.perf_counter() - t
    k, lo, hi = args.k, args.lo, args.hi
    n = lib.n_models
    total = n_combinations(n, k)
    first, last = level_window(k, lo, hi)
    t = time.perf_counter()
    pl = prune(lib.probs, lib.truth, k, first, last)
    t_prune = time.perf_counter() - t
    out = {
        "library": f"{n} models x {args.scale_tiles} tiles x {args.size}^2, k={k}",
        "combinations": total,
        "generate_s": t_gen,
        "prune_s": t_prune,
        "kept_fraction": pl.kept_fraction,
    }
    kernels.load_native()
    init_ray(num_cpus=2)
    try:

        @ray.remote(num_cpus=1)
        def run(pl, a, b):
            kernels.search_chunk(pl, unrank(a, n, k), b - a, 20)  # no floor: conservative
            return b - a

        @ray.remote(num_cpus=1)
        def warm():
            kernels.load_native()
            time.sleep(2.0)  # both tasks overlap, so two worker processes start

        ray.get([warm.remote(), warm.remote()])  # start both workers (import, load the kernel)
        ref = ray.put(pl)
        # Sample ranges spread over the whole rank space (costs vary with the prefix).
        spots = [r[0] for r in chunk_ranges(total, args.samples)]
        ranges = [(s, min(total, s + args.sample_size)) for s in spots]

        def sweep(workers: int) -> int:
            """All sampled ranges on ``workers`` Ray workers; the combinations scored."""
            pending, done = [], 0
            todo = list(ranges)
            while todo or pending:
                while todo and len(pending) < workers:
                    a, b = todo.pop(0)
                    pending.append(run.remote(ref, a, b))
                ready, pending = ray.wait(pending, num_returns=1)
                done += sum(ray.get(ready))
            return done

        seconds, done = rounds({w: lambda w=w: sweep(w) for w in (1, 2)}, args.repeats)
        rates = {w: [done[w] / s for s in seconds[w]] for w in (1, 2)}
        out["repeats"] = args.repeats
        out["spread"] = {}
        for w in (1, 2):
            out[f"rate_{w}w"] = statistics.median(rates[w])  # min-max in "spread"
            out[f"projected_full_{w}w_min"] = total / out[f"rate_{w}w"] / 60
            out["spread"][f"rate_{w}w"] = spread(rates[w])
        out["speedup_2w_vs_1w"] = out["rate_2w"] / out["rate_1w"]
        paired = [b / a for a, b in zip(rates[1], rates[2], strict=True)]  # per round
        out["spread"]["speedup_2w_vs_1w"] = spread(paired)
        if args.full:
            t = time.perf_counter()
            best, _ = exhaustive_search(lib, k, lo, hi, top=20, workers=2, progress=True)
            out["full_search_min"] = (time.perf_counter() - t) / 60
            out["full_rate"] = total / (out["full_search_min"] * 60)
            out["full_best"] = {
                "members": best[0].members,
                "level": best[0].level,
                "score": best[0].score,
            }
    finally:
        ray.shutdown()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", type=int, default=27)
    p.add_argument("-k", type=int, default=6)
    p.add_argument("--lo", type=float, default=0.30)
    p.add_argument("--hi", type=float, default=0.70)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--tiles", type=int, default=200, help="tiles of the per-combination library")
    p.add_argument("--naive-combos", type=int, default=2, help="combinations the naive loop runs")
    p.add_argument("--native-combos", type=int, default=3000)
    p.add_argument("--scale-tiles", type=int, default=2000)
    p.add_argument("--samples", type=int, default=8, help="rank ranges sampled for the rate")
    p.add_argument("--sample-size", type=int, default=1000, help="combinations per range")
    p.add_argument(
        "--blocks",
        type=lambda x: [int(b) for b in x.split(",")],
        default=[],
        help="also time these block sizes of the kernel's bounds, e.g. 8,16,32",
    )
    p.add_argument("--full", action="store_true", help="also run the whole C(27,6) search")
    p.add_argument("--skip-scale", action="store_true")
    p.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="rounds of every timing, each arm once per round (default 3): median and min-max",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.quick:
        args.models, args.tiles, args.size, args.scale_tiles = 12, 20, 64, 40
        args.native_combos, args.sample_size = 200, 20
        args.blocks = args.blocks or [4, 1000]
    res = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            # the kernel and the numpy loops run on one thread; recorded for comparisons
            "torch_threads": torch.get_num_threads(),
        },
        "per_combination": per_combination(args),
    }
    pc = res["per_combination"]
    print(
        f"\nper combination, one core: {pc['library']}, {pc['levels']} levels, "
        f"{100 * pc['kept_fraction']:.1f}% pixels kept; median [min-max] of {args.repeats} rounds"
    )
    print(f"{'method':<12}{'ms/comb':>12}{'[min-max]':>22}{'vs native':>12}")
    rows = [
        ("naive", pc["naive_ms"], pc["spread"]["naive_ms"]),
        ("numpy-hist", pc["numpy_hist_ms"], pc["spread"]["numpy_hist_ms"]),
        ("native-all", pc["native_all_ms"], pc["spread"]["native_all_ms"]),
        ("native", pc["native_ms"], pc["spread"]["native_ms"]),
    ]
    for b, ms in pc["blocks_ms"].items():
        name = f"block {b}" + (" *" if b == pc["block"] else "")
        rows.append((name, ms, pc["spread"]["blocks_ms"][b]))
    for name, ms, sp in rows:
        span = f"[{sp['min']:.3f}-{sp['max']:.3f}]"
        print(f"{name:<12}{ms:>12.3f}{span:>22}{ms / pc['native_ms']:>11.1f}x")
    print(f"same best result: {pc['same_result']}")
    if not args.skip_scale:
        sc = res["scale"] = scale(args)
        print(
            f"\nscale: {sc['library']}: {sc['combinations']} combinations, "
            f"{100 * sc['kept_fraction']:.1f}% pixels kept (generate {sc['generate_s']:.0f} s,"
            f" prune {sc['prune_s']:.1f} s)"
        )
        print(f"{'workers':<10}{'comb/s':>10}{'[min-max]':>18}{'full search (min)':>20}")
        for w in (1, 2):
            sp = sc["spread"][f"rate_{w}w"]
            span = f"[{sp['min']:.1f}-{sp['max']:.1f}]"
            print(
                f"{w:<10}{sc[f'rate_{w}w']:>10.1f}{span:>18}{sc[f'projected_full_{w}w_min']:>20.1f}"
            )
        sp = sc["spread"]["speedup_2w_vs_1w"]
        print(
            f"2 vs 1 worker: {sc['speedup_2w_vs_1w']:.2f}x "
            f"(per round {sp['min']:.2f}-{sp['max']:.2f}x, {args.repeats} rounds)"
        )
        if "full_search_min" in sc:
            print(
                f"full search, 2 workers: {sc['full_search_min']:.1f} min "
                f"({sc['full_rate']:.1f} comb/s), best {sc['full_best']}"
            )
    if args.json:
        write_json(args.json, res, default=str)
    if not pc["same_result"]:
        where = f" (results in {args.json})" if args.json else ""
        print(
            "bench_ensemble: the methods disagree on the best (combination, level, score): "
            f"{', '.join(pc['disagreements'])}{where}; the times compare different answers",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

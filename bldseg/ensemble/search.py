"""Exact k-of-N ensemble search: every combination, every threshold level, in parallel on Ray.

For each ensemble size k the library is pruned once (``prune.py``: only pixels that can change
decision inside the threshold window are kept), the pruned arrays are put in the Ray object
store once, and the ``C(N, k)`` combinations are split into rank ranges; each task unranks the
first combination of its range, scores the range with the compiled kernel (``kernels.py``)
and returns its top-m; the driver merges. Each task also gets the score floor of what has been
merged so far (a combination below it can neither enter the top nor be its k's best), which
lets the kernel drop most combinations after one cheap bound. Without Ray (``workers=0``) the
same chunks run in this process.

A combination's result is ``(level, score)``: the lowest level of the window with the best
official mean Dice, and that Dice; it equals ``bldseg.metrics.best_level`` on the uint16 sum
of the members' maps bit for bit (see :func:`brute_force`). Results are ordered by score, then
by k, then by lexicographic rank.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from bldseg import metrics
from bldseg.ensemble import kernels
from bldseg.ensemble.combinatorics import check_k, chunk_ranges, n_combinations, unrank
from bldseg.ensemble.library import ModelLibrary
from bldseg.ensemble.prune import PrunedLibrary, level_window, prune

__all__ = [
    "Ensemble",
    "brute_force",
    "default_workers",
    "exhaustive_search",
    "greedy_search",
    "score_members",
]

# Combinations per task at most: bounds the time between progress updates (~45 s at 2,000
# tiles on one core) while keeping each task's start-up (rebuilding the k-1 prefix states, a
# fraction of a second) negligible.
_MAX_CHUNK = 5_000


@dataclass(frozen=True)
class Ensemble:
    """One scored ensemble (members may repeat for greedy ensembles)."""

    members: tuple[int, ...]  # model indices, sorted
    level: int  # positive iff sum of members' uint8 maps >= level
    score: float  # official mean Dice at that level on the data it was chosen on
    rank: int = -1  # lexicographic rank among C(N, k) (-1 for greedy ensembles)

    @property
    def k(self) -> int:
        return len(self.members)

    @property
    def max_value(self) -> int:
        return metrics.QUANT_MAX * self.k

    @property
    def threshold(self) -> float:
        """The float threshold of ``level`` on the mean map (``level / 255k``)."""
        return self.level / self.max_value


def _k_values(k: int | Iterable[int], n: int) -> list[int]:
    ks = [k] if isinstance(k, int | np.integer) else list(k)
    if not ks:
        raise ValueError("give at least one ensemble size k")
    return sorted({check_k(int(x), n) for x in ks})


def score_members(
    probs: np.ndarray, truth: np.ndarray, members: Sequence[int], lo: float, hi: float
) -> tuple[np.ndarray, int, float]:
    """Scores at every level of one ensemble (members may repeat) and its best level in range.

    Args:
        probs: (N, T, S, S) uint8 library maps.
        truth: (T, S, S) bool truth.
        members: model indices.
        lo: lowest threshold considered.
        hi: highest threshold considered.

    Returns:
        ``(scores (255k+1,), best level, best score)``.
    """
    total = np.zeros(probs.shape[1:], dtype=np.uint16)
    for m in members:
        total += probs[m]
    mv = metrics.QUANT_MAX * len(members)
    c = metrics.level_counts(total, truth, mv)
    scores = metrics.scores_from_counts(c.tp, c.pp, c.gt)
    level, score = metrics.best_level(scores, mv, lo, hi)
    return scores, level, score


def brute_force(
    lib: ModelLibrary, k: int | Iterable[int] = 6, lo: float = 0.30, hi: float = 0.70
) -> list[Ensemble]:
    """Every combination scored on the full maps with ``bldseg.metrics`` (tests, small N).

    Returns:
        All ensembles, best first (score, then k, then rank).
    """
    out = []
    for kk in _k_values(k, lib.n_models):
        for r, combo in enumerate(itertools.combinations(range(lib.n_models), kk)):
            _, level, score = score_members(lib.probs, lib.truth, combo, lo, hi)
            out.append(Ensemble(combo, level, score, r))
    return _order(out)


def _order(ens: list[Ensemble]) -> list[Ensemble]:
    return sorted(ens, key=lambda e: (-e.score, e.k, e.rank))


def _floor(found: list[Ensemble], res: list[Ensemble], top: int) -> float:
    """The score a combination of the k being searched needs to matter, or ``-inf``.

    ``found`` is the merged top of the sizes already searched, ``res`` that of this k so far
    (both ordered). A combination scoring below the ``top``-th best of both cannot enter the
    result, and one below this k's best cannot be the best of its k (ties can still win on
    k or rank, so the kernel keeps scores equal to the floor).
    """
    scores = sorted((e.score for e in (*found, *res)), reverse=True)
    enter = scores[top - 1] if len(scores) >= top else -np.inf
    return min(enter, res[0].score) if res else -np.inf


def _run_chunk(
    pl: PrunedLibrary, n: int, start: int, stop: int, top: int, method: str, floor: float
) -> list[Ensemble]:
    combo = unrank(start, n, pl.k)
    off, lev, sc = kernels.search_chunk(pl, combo, stop - start, top, method, floor)
    # The kernel reports offsets along the lexicographic order; unrank them on the driver side.
    return [
        Ensemble(unrank(start + int(o), n, pl.k), int(lv), float(s), start + int(o))
        for o, lv, s in zip(off, lev, sc, strict=True)
    ]


def _ray_task():
    import ray

    @ray.remote(num_cpus=1)
    def search_range(pl, n, start, stop, top, method, floor):
        return _run_chunk(pl, n, start, stop, top, method, floor)

    return search_range


def exhaustive_search(
    lib: ModelLibrary,
    k: int | Iterable[int] = 6,
    lo: float = 0.30,
    hi: float = 0.70,
    *,
    top: int = 20,
    workers: int = 0,
    method: str = "native",
    chunk_size: int | None = None,
    progress: bool = True,
) -> tuple[list[Ensemble], dict[int, Ensemble]]:
    """Scores every k-model combination at every threshold level in ``[lo, hi]``.

    Args:
        lib: the model library (tiles to choose on, e.g. the selection half).
        k: ensemble size, or several sizes.
        lo: lowest threshold considered (inclusive).
        hi: highest threshold considered (inclusive).
        top: how many ensembles to return.
        workers: concurrent Ray tasks (Ray must be initialised by the caller); 0 runs every
            chunk in this process.
        method: ``"native"`` (compiled kernel) or ``"numpy"`` (reference kernel).
        chunk_size: combinations per task; default: enough chunks for ``4 * workers`` tasks,
            at most 5,000 combinations each.
        progress: show a tqdm bar over combinations.

    Returns:
        ``(best, best_per_k)``: the ``top`` best ensembles over all k (score, then k, then
        rank), and the best ensemble of each k.

    Raises:
        ValueError: for a bad k (k > N, k < 1) or an empty threshold window.
    """
    ks = _k_values(k, lib.n_models)
    if top < 1:
        raise ValueError(f"top must be at least 1, got {top}")
    if method == "native":
        kernels.native_available()  # build once here, so Ray workers on this machine only load
    n = lib.n_models
    total = sum(n_combinations(n, kk) for kk in ks)
    bar = tqdm(total=total, desc="ensembles", unit="comb", disable=not progress, smoothing=0.05)
    found: list[Ensemble] = []
    per_k: dict[int, Ensemble] = {}
    try:
        for kk in ks:
            first, last = level_window(kk, lo, hi)
            pl = prune(lib.probs, lib.truth, kk, first, last)
            n_k = n_combinations(n, kk)
            size = chunk_size or max(1, min(_MAX_CHUNK, math.ceil(n_k / max(4 * workers, 1))))
            ranges = chunk_ranges(n_k, math.ceil(n_k / size))
            if workers > 0:
                res = _search_ray(pl, n, ranges, top, method, workers, bar, found)
            else:
                res = []
                for a, b in ranges:
                    res.extend(_run_chunk(pl, n, a, b, top, method, _floor(found, res, top)))
                    bar.update(b - a)
                    res = _order(res)[:top]
            res = _order(res)
            per_k[kk] = res[0]
            found = _order(found + res)[:top]
    finally:
        bar.close()
    return found, per_k


def _search_ray(pl, n, ranges, top, method, workers, bar, found) -> list[Ensemble]:
    """Runs the rank ranges as Ray tasks, at most ``workers`` at a time; merges top-m.

    Tasks are submitted as slots free up, each with the floor of what is merged by then.
    """
    import ray

    if not ray.is_initialized():
        raise RuntimeError("workers > 0 needs Ray: call ray.init() (or pass --address) first")
    task = _ray_task()
    ref = ray.put(pl)  # the read-only arrays travel to each node once
    pending: dict = {}
    todo = list(ranges)
    best: list[Ensemble] = []
    while todo or pending:
        while todo and len(pending) < workers:
            a, b = todo.pop(0)
            floor = _floor(found, best, top)
            pending[task.remote(ref, n, a, b, top, method, floor)] = b - a
        done, _ = ray.wait(list(pending), num_returns=1)
        for d in done:
            best = _order(best + ray.get(d))[:top]
            bar.update(pending.pop(d))
    return best


def default_workers() -> int:
    """Concurrent tasks for an initialised Ray: its CPUs; else the CPUs of this machine."""
    try:
        import ray

        if ray.is_initialized():
            return max(1, int(ray.cluster_resources().get("CPU", 1)))
    except ImportError:
        pass
    return os.cpu_count() or 1


def greedy_search(
    lib: ModelLibrary,
    max_size: int = 10,
    lo: float = 0.30,
    hi: float = 0.70,
    *,
    init: int = 0,
    progress: bool = True,
) -> tuple[Ensemble, list[Ensemble]]:
    """Greedy forward selection with replacement (Caruana et al., ICML 2004).

    Start from the ``init`` best single models (sorted initialisation; 0: empty), then add,
    step by step, the model (possibly one already in) whose addition gives the best score at
    its best level in ``[lo, hi]``; keep the best ensemble seen. For libraries too large for
    the exhaustive search: ``N * max_size`` evaluations instead of ``C(N, k)``.

    Args:
        lib: the model library.
        max_size: ensemble size at which to stop (members counted with repetition).
        lo: lowest threshold considered.
        hi: highest threshold considered.
        init: number of best single models to start from.
        progress: show a tqdm bar over steps.

    Returns:
        ``(best, history)``: the best ensemble (ties: the smallest) and the ensemble after
        each step. Members of an ensemble with repetition appear repeatedly.
    """
    n = lib.n_models
    if not 1 <= max_size <= 257:
        raise ValueError(f"max_size must lie in 1..257, got {max_size}")
    if not 0 <= init <= min(n, max_size):
        raise ValueError(f"init must lie in 0..min(N={n}, max_size={max_size}), got {init}")
    members: list[int] = []
    if init:
        singles = [score_members(lib.probs, lib.truth, [m], lo, hi)[2] for m in range(n)]
        members = sorted(np.argsort(-np.asarray(singles), kind="stable")[:init].tolist())
    history: list[Ensemble] = []
    if members:
        _, level, score = score_members(lib.probs, lib.truth, members, lo, hi)
        history.append(Ensemble(tuple(members), level, score))
    for _ in tqdm(range(len(members), max_size), desc="greedy", disable=not progress):
        step = None
        for m in range(n):
            cand = sorted([*members, m])
            _, level, score = score_members(lib.probs, lib.truth, cand, lo, hi)
            if step is None or score > step.score:  # ties: the lowest model index
                step = Ensemble(tuple(cand), level, score)
        assert step is not None
        members = list(step.members)
        history.append(step)
    best = max(history, key=lambda e: (e.score, -e.k))
    return best, history

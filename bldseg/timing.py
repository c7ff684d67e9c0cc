"""Timing arms side by side, for the benchmarks: alternating rounds and their spread."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any


def rounds(arms: dict[Any, Callable[[], Any]], repeats: int) -> tuple[dict[Any, list], dict]:
    """Seconds of every arm in ``repeats`` rounds, and each arm's result of the first round.

    Every round runs each arm once, in reversed order every other round: arms timed side by
    side share the machine's slow and fast spells instead of one arm taking them all.
    """
    times: dict[Any, list[float]] = {name: [] for name in arms}
    results: dict[Any, Any] = {}
    for r in range(repeats):
        for name in list(arms) if r % 2 == 0 else list(reversed(arms)):
            t = time.perf_counter()
            out = arms[name]()
            times[name].append(time.perf_counter() - t)
            results.setdefault(name, out)
    return times, results


def spread(values: Sequence[float]) -> dict[str, Any]:
    """One arm's rounds: their median, min and max, and the rounds in the order run."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "rounds": list(values),
    }

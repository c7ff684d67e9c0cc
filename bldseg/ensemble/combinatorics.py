"""k-combinations of N models in lexicographic order: counting, ranking, unranking, chunks.

Rank ``r`` is the position of a sorted combination ``(c_0 < c_1 < ... < c_{k-1})`` in the
lexicographic list of all ``C(N, k)`` combinations, ``(0, 1, ..., k-1)`` having rank 0. A
parallel search splits ``[0, C(N, k))`` into rank ranges and unranks the first combination of
each, so every worker starts in the middle of the list without enumerating what comes before.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from math import comb

__all__ = ["check_k", "chunk_ranges", "n_combinations", "rank", "unrank"]


def check_k(k: int, n: int) -> int:
    """Validates an ensemble size ``k`` for a library of ``n`` models.

    Raises:
        ValueError: if ``k`` is not an integer in ``1..n`` (or the sum would overflow uint16).
    """
    if isinstance(k, bool) or int(k) != k:
        raise ValueError(f"k must be an integer, got {k!r}")
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if k > n:
        raise ValueError(
            f"k={k} is larger than the library, which holds {n} model(s); pass k <= {n}"
        )
    if 255 * k > 65535:
        raise ValueError(f"k={k} is too large: sums of k uint8 maps must fit in uint16 (k<=257)")
    return k


def n_combinations(n: int, k: int) -> int:
    """``C(n, k)``, the number of k-model ensembles of n models."""
    return comb(n, k)


def rank(combo: Sequence[int], n: int) -> int:
    """The lexicographic rank of a sorted combination of ``range(n)``.

    Raises:
        ValueError: if the members are not strictly increasing indices in ``0..n-1``.
    """
    k = len(combo)
    _check_combo(combo, n)
    r, prev = 0, -1
    for i, c in enumerate(combo):
        # combinations that agree up to position i-1 and have a smaller member at position i
        for x in range(prev + 1, c):
            r += comb(n - 1 - x, k - 1 - i)
        prev = c
    return r


def unrank(r: int, n: int, k: int) -> tuple[int, ...]:
    """The combination of lexicographic rank ``r`` among ``C(n, k)``.

    Raises:
        ValueError: if ``r`` is outside ``0..C(n, k)-1``.
    """
    total = comb(n, k)
    if not 0 <= r < total:
        raise ValueError(f"rank {r} is outside 0..{total - 1} for C({n}, {k})")
    out: list[int] = []
    x = 0
    for i in range(k):
        while True:
            below = comb(n - 1 - x, k - 1 - i)  # combinations with member i equal to x
            if r < below:
                break
            r -= below
            x += 1
        out.append(x)
        x += 1
    return tuple(out)


def chunk_ranges(total: int, n_chunks: int) -> list[tuple[int, int]]:
    """Splits ``[0, total)`` into at most ``n_chunks`` contiguous, near-equal rank ranges.

    Returns:
        ``[(start, stop), ...]`` covering every rank exactly once, none empty.
    """
    if total < 0 or n_chunks < 1:
        raise ValueError(f"need total >= 0 and n_chunks >= 1, got {total} and {n_chunks}")
    n_chunks = min(n_chunks, total)
    bounds = [total * i // n_chunks for i in range(n_chunks + 1)] if n_chunks else [0]
    return [(a, b) for a, b in itertools.pairwise(bounds) if b > a]


def _check_combo(combo: Sequence[int], n: int) -> None:
    if any(not 0 <= c < n for c in combo) or any(b <= a for a, b in itertools.pairwise(combo)):
        raise ValueError(f"{tuple(combo)} is not a strictly increasing combination of 0..{n - 1}")

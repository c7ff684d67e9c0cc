"""Scoring a run of consecutive combinations: the compiled hot loop and its numpy reference.

Both take a :class:`~bldseg.ensemble.prune.PrunedLibrary`, the first combination of a rank
range, its length and a score floor, and return the best ``top_m`` of the range's
combinations that score at least the floor as ``(offsets from the start, levels, scores)``,
best first (ties: lower rank first). A combination's level is
the lowest best level of the window and its score the official mean Dice at that level,
equal bit for bit to ``bldseg.metrics.scores_from_counts`` on the full maps.

The compiled kernel (``csrc/ensemble/ensemble_search.cpp``, built by the one JIT loader)
reuses partial sums along the lexicographic order, drops decided pixels at every depth, bounds
each block of ``block`` threshold levels from one histogram pass and looks level by level only
at the blocks that can still hold the best score; a floor (the worst of a merged top-m so far)
lets it end most combinations right after the bounds. ``search_chunk_numpy`` is the readable
reference and the fallback when no compiler is found.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from bldseg import metrics
from bldseg.ensemble.prune import PrunedLibrary
from bldseg.ops._build import CSRC_DIR, BuildError, NativeExtension

__all__ = ["DEFAULT_BLOCK", "load_native", "native_available", "search_chunk", "search_chunk_numpy"]

# Threshold levels per block of the kernel's bounds: smaller blocks bound more tightly (fewer
# levels walked one by one) but cost more divisions and reads per image. With
# experiments/bench_ensemble.py --blocks 8,16,32 (200 tiles, k=6): 0.64 / 0.54 / 0.49 ms per
# combination; on 2,000 tiles 16 and 32 were within 1% of each other.
DEFAULT_BLOCK = 16

_EXT = NativeExtension(
    "bldseg_ensemble",
    [CSRC_DIR / "ensemble" / "ensemble_search.cpp"],
    is_python_module=True,
    # not a PyTorch reference: the search's own numpy kernel (--kernel numpy)
    fallback="the numpy kernel (--kernel numpy: the same results, slower)",
)


def load_native():
    """The compiled module (built on first use). Raises ``BuildError`` when it cannot be."""
    _EXT.load()
    return _EXT.library


def native_available() -> bool:
    """True when the compiled kernel loads; warns once with the reason when it does not."""
    return _EXT.try_load()


def search_chunk(
    lib: PrunedLibrary,
    start: Sequence[int],
    count: int,
    top_m: int,
    method: str = "native",
    floor: float = -np.inf,
    block: int = DEFAULT_BLOCK,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The best ``top_m`` of ``count`` combinations from ``start`` (see the module docstring).

    Args:
        lib: the pruned library (its ``k`` must equal ``len(start)``).
        start: the first combination, k increasing model indices.
        count: how many combinations to score, in lexicographic order.
        top_m: how many to return.
        method: ``"native"`` (compiled; falls back to numpy with a warning when it cannot be
            built) or ``"numpy"``.
        floor: only combinations scoring at least this are returned (``-inf``: all).
        block: threshold levels per block of the native kernel's bounds (any value gives the
            same result).

    Returns:
        ``(offsets, levels, scores)``: int64, int64, float64 arrays of length at most
        ``min(top_m, count)`` (shorter when fewer combinations reach ``floor``).
    """
    if len(start) != lib.k:
        raise ValueError(f"start {tuple(start)} has {len(start)} members, the library k={lib.k}")
    if block < 1:
        raise ValueError(f"block must be at least 1, got {block}")
    if np.isnan(floor):
        raise ValueError("floor must be a number or -inf, got NaN")
    if method == "native":
        try:
            mod = load_native()
        except BuildError as err:
            _EXT.warn_once(str(err))
        else:
            import torch

            with warnings.catch_warnings():
                # Ray hands out read-only views of the object store; the kernel only reads.
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                t = [
                    torch.from_numpy(a)
                    for a in (
                        lib.vals,
                        lib.suf_min,
                        lib.suf_max,
                        lib.truth,
                        lib.img_start,
                        lib.above_tp,
                        lib.above_pp,
                        lib.gt,
                    )
                ]
            first_combo = torch.tensor(list(start), dtype=torch.int64)
            off, lev, sc = mod.search_chunk(
                *t,
                first_combo,
                int(count),
                lib.first,
                lib.last,
                int(top_m),
                float(floor),
                int(block),
            )
            return off.numpy(), lev.numpy(), sc.numpy()
    elif method != "numpy":
        raise ValueError(f"method must be 'native' or 'numpy', got {method!r}")
    return search_chunk_numpy(lib, start, count, top_m, floor)


def window_scores(lib: PrunedLibrary, combo: Sequence[int]) -> np.ndarray:
    """The official score at every level ``first..last`` of one combination, from counts.

    Returns:
        (last - first + 1,) float64, equal bit for bit to ``scores_from_counts`` of the full
        maps' level counts restricted to the window.
    """
    nlev = lib.last - lib.first + 1
    n_img = lib.gt.size
    s = np.zeros(lib.vals.shape[1], dtype=np.int64)
    for c in combo:
        s += lib.vals[c]
    # Bin 0: below the window; bin b: level first - 1 + b; sums >= last land in the top bin.
    b = np.clip(s, lib.first - 1, lib.last) - (lib.first - 1)
    img = np.repeat(np.arange(n_img), np.diff(lib.img_start))
    key = (img * (nlev + 1) + b) * 2 + lib.truth
    hist = np.bincount(key, minlength=n_img * (nlev + 1) * 2).reshape(n_img, nlev + 1, 2)
    rev = np.cumsum(hist[:, :0:-1], axis=1)[:, ::-1]  # (T, nlev, 2): pixels with sum >= level
    tp = rev[:, :, 1] + lib.above_tp[:, None]
    pp = rev[:, :, 0] + rev[:, :, 1] + lib.above_pp[:, None]
    return metrics.scores_from_counts(tp, pp, lib.gt)


def search_chunk_numpy(
    lib: PrunedLibrary, start: Sequence[int], count: int, top_m: int, floor: float = -np.inf
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference implementation of :func:`search_chunk` (one combination at a time)."""
    n, k = lib.n_models, lib.k
    combo = list(start)
    offs, levels, scores = [], [], []
    for off in range(count):
        sc = window_scores(lib, combo)
        i = int(np.argmax(sc))  # first maximum: the lowest level wins ties
        if sc[i] >= floor:
            offs.append(off)
            levels.append(lib.first + i)
            scores.append(float(sc[i]))
        if off + 1 < count:
            j = k - 1
            while j >= 0 and combo[j] == n - k + j:
                j -= 1
            if j < 0:
                raise ValueError("ran past the last combination")
            combo[j] += 1
            for q in range(j + 1, k):
                combo[q] = combo[q - 1] + 1
    order = np.lexsort((np.asarray(offs), -np.asarray(scores)))[:top_m]
    return (
        np.asarray(offs, dtype=np.int64)[order],
        np.asarray(levels, dtype=np.int64)[order],
        np.asarray(scores, dtype=np.float64)[order],
    )

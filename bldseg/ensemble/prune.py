"""Threshold windows and pixel pruning for the exact k-of-N search.

The mean of k uint8 maps is thresholded as the uint16 sum ``S`` on the ``0..255k`` scale
(``bldseg.metrics``): a pixel is positive at level ``L`` iff ``S >= L``. The search looks at
every level ``first..last`` whose threshold ``L / 255k`` lies in ``[lo, hi]``.

Most pixels of segmentation outputs are confidently 0 or 255 in every model, so whatever k
models are summed, their sum stays below ``first`` (negative at every level of the window) or
reaches ``last`` (positive at every level). Per pixel the sum of any k of the N models lies
between the sum of its k smallest and its k largest values, so a pixel can only change its
decision inside the window when ``top_k >= first`` and ``bottom_k < last``. Only those pixels
are kept; the others become constant per-image counts. This is exact, not an approximation.

The search adds members in increasing model order, so after the member ``m`` the rest come
from models ``m+1..N-1``: per kept pixel the library also holds the min and max over every
such suffix of models, which the search uses to drop pixels decided by the prefix so far.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bldseg.metrics import QUANT_MAX, level_from_threshold

__all__ = ["PrunedLibrary", "level_window", "prune"]

# Tiles per pruning chunk: bounds the (N, chunk pixels) temporaries (27 models x 64 x 224^2
# uint8 is 87 MB).
_CHUNK_TILES = 64


def level_window(k: int, lo: float, hi: float) -> tuple[int, int]:
    """The levels ``first..last`` of a sum of k maps whose thresholds lie in ``[lo, hi]``.

    The same window as ``bldseg.metrics.best_level(scores, 255 * k, lo, hi)``.

    Raises:
        ValueError: if ``lo > hi``, or no level lies in the range.
    """
    if lo > hi:  # "widen the range" would send the user the wrong way
        raise ValueError(f"lo = {lo} > hi = {hi}: swap them")
    m = QUANT_MAX * k
    first = int(level_from_threshold(lo, m))
    last = min(int(np.searchsorted(np.arange(m + 1) / m, hi, side="right")) - 1, m)
    if first > last:
        raise ValueError(
            f"no threshold level L/{m} lies in [lo, hi] = [{lo}, {hi}]; widen the range"
        )
    return first, last


@dataclass
class PrunedLibrary:
    """The pixels of a library that can change decision inside the window, for one k."""

    vals: np.ndarray  # (N, P) uint8: kept pixels of every model, model-major
    truth: np.ndarray  # (P,) uint8 0/1
    suf_min: np.ndarray  # (N, P) uint8: suf_min[m] = smallest value over models m..N-1
    suf_max: np.ndarray  # (N, P) uint8: suf_max[m] = largest value over models m..N-1
    img_start: np.ndarray  # (T+1,) int64: kept pixels of tile t are [img_start[t], ...[t+1])
    above_tp: np.ndarray  # (T,) int64: building pixels positive at every window level
    above_pp: np.ndarray  # (T,) int64: pixels positive at every window level
    gt: np.ndarray  # (T,) int64: building pixels per tile
    k: int  # ensemble size the pruning is valid for
    first: int  # lowest level of the window
    last: int  # highest level of the window
    n_pixels_total: int  # pixels of the library before pruning

    @property
    def n_models(self) -> int:
        return int(self.vals.shape[0])

    @property
    def kept_fraction(self) -> float:
        """Share of the library's pixels that the search has to look at."""
        return self.vals.shape[1] / max(self.n_pixels_total, 1)


def prune(probs: np.ndarray, truth: np.ndarray, k: int, first: int, last: int) -> PrunedLibrary:
    """Keeps the pixels whose k-model sum can fall inside ``[first, last)``.

    Args:
        probs: (N, T, S, S) uint8 maps of the library.
        truth: (T, S, S) bool ground truth.
        k: ensemble size.
        first: lowest level of the window (see :func:`level_window`).
        last: highest level of the window.

    Returns:
        The pruned library; its constant counts plus the kept pixels give exactly the counts
        of the full maps at every level of the window for every k-combination.
    """
    n, t = probs.shape[:2]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must lie in 1..{n}")
    per = int(np.prod(probs.shape[2:]))
    maps = probs.reshape(n, t, per)  # (N, T, S*S)
    gts = truth.reshape(t, per)
    vals, tru, counts = [], [], []
    above_tp = np.zeros(t, dtype=np.int64)
    above_pp = np.zeros(t, dtype=np.int64)
    gt = np.count_nonzero(gts, axis=1).astype(np.int64)
    for s in range(0, t, _CHUNK_TILES):
        x = maps[:, s : s + _CHUNK_TILES].reshape(n, -1)  # (N, c*S*S)
        g = gts[s : s + _CHUNK_TILES].reshape(-1)
        nt = min(_CHUNK_TILES, t - s)
        mn = x.min(axis=0)
        mx = x.max(axis=0)
        # Cheap bounds first: k*min <= bottom_k and top_k <= k*max.
        above = mn.astype(np.int32) * k >= last
        maybe = (mx.astype(np.int32) * k >= first) & ~above
        cand = np.flatnonzero(maybe)
        keep = np.zeros(x.shape[1], dtype=bool)
        if cand.size:
            srt = np.sort(x[:, cand], axis=0).astype(np.int32)  # (N, C) ascending per pixel
            bottom = srt[:k].sum(axis=0)
            top = srt[n - k :].sum(axis=0)
            keep[cand] = (top >= first) & (bottom < last)
            above[cand] = bottom >= last
        above_pp[s : s + nt] = above.reshape(nt, per).sum(axis=1)
        above_tp[s : s + nt] = (above & g).reshape(nt, per).sum(axis=1)
        idx = np.flatnonzero(keep)
        counts.append(keep.reshape(nt, per).sum(axis=1))
        vals.append(x[:, idx])
        tru.append(g[idx].astype(np.uint8))
    img_start = np.zeros(t + 1, dtype=np.int64)
    np.cumsum(np.concatenate(counts), out=img_start[1:])
    kept = np.ascontiguousarray(np.concatenate(vals, axis=1))  # (N, P)
    suf_min, suf_max = _suffix_min_max(kept)
    return PrunedLibrary(
        vals=kept,
        truth=np.concatenate(tru),
        suf_min=suf_min,
        suf_max=suf_max,
        img_start=img_start,
        above_tp=above_tp,
        above_pp=above_pp,
        gt=gt,
        k=int(k),
        first=int(first),
        last=int(last),
        n_pixels_total=int(t * per),
    )


def _suffix_min_max(kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Running min / max from the last model backwards: row m covers models m..N-1.

    Filled row by row into fresh arrays rather than by accumulating over a reversed view:
    ``np.ascontiguousarray`` does not copy a reversed view of one row (a (1, P) array counts
    as contiguous whatever its row stride), so a one-model library kept a negative stride,
    which ``torch.from_numpy`` refuses in the native kernel.

    Args:
        kept: (N, P) uint8 kept pixels, model-major.

    Returns:
        ``(suf_min, suf_max)``: (N, P) uint8 each, C-contiguous with positive strides.
    """
    suf_min = np.empty_like(kept, order="C")  # (N, P)
    suf_max = np.empty_like(kept, order="C")
    if kept.shape[0]:
        suf_min[-1] = kept[-1]
        suf_max[-1] = kept[-1]
    for m in range(kept.shape[0] - 2, -1, -1):
        np.minimum(suf_min[m + 1], kept[m], out=suf_min[m])
        np.maximum(suf_max[m + 1], kept[m], out=suf_max[m])
    return suf_min, suf_max

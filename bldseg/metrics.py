"""The competition metric, and Dice at every threshold at once.

Official score
    Per-image Dice ``(2|P∩G| + 1e-7) / (|P| + |G| + 1e-7)``; an image where the prediction and
    the ground truth are both empty is left out; the score is the plain mean over the rest. A
    false positive on an empty image scores ~0, as does a missed building. If *every* image is
    empty/empty there is nothing to average; this module then returns 1.0 (nothing was missed
    and nothing was wrongly predicted), so that threshold and ensemble searches never see NaN.

Threshold convention
    A pixel is predicted positive iff ``probability >= threshold``.

    Probability maps are stored quantised: ``q = round(p * 255)`` as uint8 (round half up, see
    :func:`quantise`), and ``q`` represents the probability ``q / 255``. The mean of ``k``
    such maps is ``S / (255 k)`` where ``S`` is the uint16 sum of the maps; in general an
    integer map with values ``0..M`` (``M = max_value``; 255 for one map, ``255 k`` for a sum
    of ``k``) represents ``v / M``. Threshold integer sums, not a float mean of the maps: a
    float ``mean(q_i / 255)`` can differ from ``S / (255 k)`` by an ulp and flip a pixel lying
    exactly on a threshold.

    Integer *level* ``L`` means "positive iff ``v >= L``". Levels and float thresholds map
    exactly onto each other:

    - :func:`level_from_threshold`: ``L(t)`` = the smallest ``L`` in ``0..M+1`` with
      ``L / M >= t``, where ``L / M`` is the float64 division. Hence ``v >= L(t)`` selects
      exactly the pixels for which ``v / M >= t`` holds when evaluated in float64, with no
      off-by-one at the boundaries (``t = 99/765``, a level of a sum of three maps, gives 99
      although ``ceil(t * 765)`` is 100). Level ``M + 1`` (``t > 1``) selects nothing.
    - :func:`threshold_from_level`: ``t(L) = L / M``; ``L(t(L)) == L`` for every level.

    A threshold chosen on quantised maps is applied to fresh probabilities with
    :func:`binarise`, which quantises first; comparing raw float probabilities with ``t``
    instead differs only for pixels within half a quantisation step (1/510) below ``t``.

Dice at every level
    :func:`level_counts` builds one histogram per image (one ``np.bincount`` with an offset per
    image, building and background pixels interleaved), and reverse cumulative sums give, for
    every image and level at once, the true-positive count ``tp`` and the predicted-positive
    count ``pp``; ``gt`` is the number of building pixels. :func:`scores_from_counts` turns
    counts into the official score per level, equal (bit for bit) to thresholding each level
    and calling :func:`competition_score`. The ensemble search combines these counts.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from bldseg.data.rle import rle_decode

__all__ = [
    "QUANT_MAX",
    "SMOOTH",
    "WIDE_RANGE",
    "LevelChoice",
    "LevelCounts",
    "best_level",
    "best_threshold",
    "binarise",
    "choose_level",
    "competition_score",
    "dice_at_levels",
    "dice_from_counts",
    "dice_per_image",
    "level_counts",
    "level_from_threshold",
    "level_range",
    "on_range_edge",
    "quantise",
    "roc_curve",
    "score_csv",
    "score_csv_per_image",
    "scores_from_counts",
    "threshold_from_level",
    "widened_range",
    "youden_threshold",
]

SMOOTH = 1e-7
"""The competition's Dice smoothing term, added to numerator and denominator."""

QUANT_MAX = 255
"""Quantised probability maps are uint8 with 255 meaning probability 1."""

WIDE_RANGE = (0.05, 0.95)
"""The threshold sweep a choice falls back to when its best threshold lies on an edge of the
default range (``[0.30, 0.70]``); see :func:`choose_level` and ``docs/thresholds.md``. Not
``[0, 1]``: near the ends a threshold is decided by a handful of pixels."""

# Pixels per chunk when quantising: bounds the float64 temporaries to 128 MiB.
_CHUNK_PIXELS = 1 << 24
# Pixels per np.bincount call in the level machinery: an 8 MiB int64 key buffer that stays in
# cache (measured: 1M-pixel chunks ~2x faster than 16M on 100M pixels).
_HIST_CHUNK_PIXELS = 1 << 20


# --------------------------------------------------------------------------------------------
# Quantisation and the threshold <-> level mapping
# --------------------------------------------------------------------------------------------


def quantise(probs: np.ndarray) -> np.ndarray:
    """Quantise probabilities to uint8 levels ``q = round(p * 255)``, rounding half up.

    ``x = p * 255`` is computed in float64 whatever the input precision (so float32 and
    float64 inputs holding the same value quantise identically), and ``x`` is then rounded
    half up exactly: floor, then compare the (exact) fractional part with 0.5.

    Args:
        probs: float array of any shape with values in [0, 1].

    Returns:
        uint8 array of the same shape.

    Raises:
        TypeError: if ``probs`` is not a floating-point array.
        ValueError: if a value is NaN or outside [0, 1].
    """
    probs = np.asarray(probs)
    if probs.dtype.kind != "f":
        raise TypeError(
            f"quantise expects float probabilities in [0, 1], got dtype {probs.dtype}; uint8 "
            "maps are already quantised, pass them to the metric functions directly"
        )
    out = np.empty(probs.shape, dtype=np.uint8)
    if probs.size == 0:
        return out
    lo, hi = probs.min(), probs.max()
    if not (lo >= 0.0 and hi <= 1.0):  # also catches NaN, for which both comparisons are False
        raise ValueError(
            f"probabilities must lie in [0, 1] and not be NaN, got min {lo} and max {hi}; "
            "apply a sigmoid (or np.clip) first"
        )
    flat_in = probs.reshape(-1)
    flat_out = out.reshape(-1)
    # Chunked so that a (2000, 224, 224) float32 library never needs a float64 copy at once.
    for start in range(0, flat_in.size, _CHUNK_PIXELS):
        x = flat_in[start : start + _CHUNK_PIXELS].astype(np.float64) * QUANT_MAX
        r = np.floor(x)
        r += (x - r) >= 0.5  # x - r is exact for x < 2**52, so this is exact round-half-up
        flat_out[start : start + _CHUNK_PIXELS] = r
    return out


def level_from_threshold(
    threshold: float | np.ndarray, max_value: int = QUANT_MAX
) -> int | np.ndarray:
    """The integer level equivalent to a float threshold (see the module docstring).

    Args:
        threshold: scalar or array of thresholds; values below 0 give level 0 (everything
            positive), values above 1 give ``max_value + 1`` (nothing positive).
        max_value: the largest value of the integer maps (255, or 255 k for a sum of k maps).

    Returns:
        The smallest ``L`` in ``0..max_value+1`` with ``L / max_value >= threshold`` (float64),
        an ``int`` for a scalar threshold, else an int64 array of the threshold's shape.

    Raises:
        ValueError: if a threshold is NaN or ``max_value`` is not a positive integer.
    """
    m = _check_max_value(max_value)
    t = np.asarray(threshold, dtype=np.float64)
    if np.isnan(t).any():
        raise ValueError("threshold is NaN; pass a number in [0, 1]")
    # The float64 values the levels represent; strictly increasing because 1/m >> one ulp.
    grid = np.arange(m + 1) / m  # (m + 1,)
    levels = np.searchsorted(grid, t, side="left").astype(np.int64)
    return int(levels) if levels.ndim == 0 else levels


def threshold_text(threshold: float) -> str:
    """A chosen threshold as printed: 4 decimals, rounded down, so that the printed value typed
    back (``predict --threshold``) is the same level. A level's threshold ``L/255`` rounded to
    nearest (77/255 = 0.30196 as 0.3020) is the next level up (``level_from_threshold``:
    the smallest level at or above it), another mask for about half of the 256 levels.
    """
    if not math.isfinite(threshold):
        return f"{threshold}"
    return f"{math.floor(threshold * 1e4) / 1e4:.4f}"


def threshold_from_level(level: int | np.ndarray, max_value: int = QUANT_MAX) -> float | np.ndarray:
    """The float threshold a level stands for: ``level / max_value``.

    Args:
        level: integer level(s) in ``0..max_value+1``.
        max_value: the largest value of the integer maps.

    Returns:
        ``level / max_value`` as a float (or float64 array); ``level_from_threshold`` maps it
        back to ``level`` exactly.

    Raises:
        ValueError: if a level is outside ``0..max_value+1`` or not an integer.
    """
    m = _check_max_value(max_value)
    arr = np.asarray(level)
    if arr.dtype.kind not in "iu" or (arr.size and (arr.min() < 0 or arr.max() > m + 1)):
        raise ValueError(f"levels must be integers in 0..{m + 1} for max_value={m}, got {level!r}")
    out = arr / m
    return float(out) if out.ndim == 0 else out


def binarise(values: np.ndarray, threshold: float, max_value: int | None = None) -> np.ndarray:
    """Apply a threshold exactly as the level machinery does: positive iff value >= threshold.

    Args:
        values: float probabilities in [0, 1] (quantised first, see :func:`quantise`), uint8
            quantised maps, or integer sums of ``k`` maps with ``max_value=255*k``.
        threshold: the float threshold, e.g. from :func:`best_threshold`.
        max_value: the largest value of integer maps; 255 for uint8 and floats, required
            for other integer dtypes.

    Returns:
        bool array of the shape of ``values``.
    """
    levels, m = _as_levels(values, max_value)
    return levels >= level_from_threshold(threshold, m)


# --------------------------------------------------------------------------------------------
# The official score
# --------------------------------------------------------------------------------------------


def dice_per_image(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-image Dice ``(2|P∩G| + 1e-7) / (|P| + |G| + 1e-7)``.

    Args:
        pred: (N, H, W) binary prediction, bool or integer 0/1.
        truth: (N, H, W) binary ground truth, bool or integer 0/1.

    Returns:
        (N,) float64; NaN where prediction and truth are both empty (the competition leaves
        those images out of the mean).

    Raises:
        ValueError: on a shape mismatch, a non-(N, H, W) shape or non-binary values.
        TypeError: on float or other non-binary dtypes.
    """
    pred = _as_binary(pred, "pred")
    truth = _as_binary(truth, "truth")
    if pred.shape != truth.shape:
        raise ValueError(f"pred has shape {pred.shape} but truth has shape {truth.shape}")
    n = pred.shape[0]
    p = pred.reshape(n, -1)  # (N, H*W)
    g = truth.reshape(n, -1)
    inter = (p & g).sum(axis=1)  # (N,) int64
    return _dice(inter, p.sum(axis=1), g.sum(axis=1))


def competition_score(pred: np.ndarray, truth: np.ndarray) -> float:
    """The official score: mean per-image Dice over images that are not empty/empty.

    Args:
        pred: (N, H, W) binary prediction, bool or integer 0/1.
        truth: (N, H, W) binary ground truth.

    Returns:
        The mean Dice; 1.0 if every image is empty in both prediction and truth.
    """
    return float(_mean_valid(dice_per_image(pred, truth)[None, :])[0])


# --------------------------------------------------------------------------------------------
# Dice at every level at once
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LevelCounts:
    """Per-image pixel counts at every threshold level of integer maps with values 0..M."""

    tp: np.ndarray  # (N, M+1) int64: building pixels with value >= L (true positives)
    pp: np.ndarray  # (N, M+1) int64: all pixels with value >= L (predicted positives)
    gt: np.ndarray  # (N,) int64: building pixels in the ground truth
    max_value: int  # M: the value that stands for probability 1 (255 k for a sum of k maps)

    @property
    def thresholds(self) -> np.ndarray:
        """(M+1,) float64: the threshold each level column stands for, ``L / M``."""
        return np.arange(self.max_value + 1) / self.max_value


def level_counts(
    values: np.ndarray, truth: np.ndarray, max_value: int | None = None
) -> LevelCounts:
    """Per-image true-positive and predicted-positive counts at every level at once.

    One ``np.bincount`` over keys ``((image * (M+1)) + value) * 2 + truth`` (in chunks of
    images) gives every image's histogram of values split by truth; reverse cumulative sums
    over the value axis turn histograms into counts of pixels with ``value >= L``.

    Args:
        values: (N, H, W) float probabilities in [0, 1] (quantised with :func:`quantise`),
            uint8 quantised maps, or integer sums of ``k`` uint8 maps (e.g. uint16) with
            ``max_value=255*k``.
        truth: (N, H, W) binary ground truth, bool (fastest) or integer 0/1.
        max_value: M, the value standing for probability 1; defaults to 255 for uint8 and
            float maps and is required for other integer dtypes.

    Returns:
        The counts; level ``L`` (column ``L``) means "positive iff value >= L".

    Raises:
        ValueError: on shape mismatch, no images, non-binary truth, or values outside 0..M.
        TypeError: on unsupported dtypes.
    """
    levels, m = _as_levels(values, max_value)
    truth = _as_binary(truth, "truth")
    if levels.shape != truth.shape:
        raise ValueError(f"values have shape {levels.shape} but truth has shape {truth.shape}")
    hist = _histograms(levels, truth, m, per_image=True)  # (N, M+1, 2)
    tp = _reverse_cumsum(hist[:, :, 1])  # (N, M+1)
    pp = _reverse_cumsum(hist[:, :, 0] + hist[:, :, 1])
    return LevelCounts(tp=tp, pp=pp, gt=tp[:, 0].copy(), max_value=m)


def dice_from_counts(tp: np.ndarray, pp: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Per-image Dice at every level from counts.

    Args:
        tp: (N, L) true-positive counts per image and level.
        pp: (N, L) predicted-positive counts.
        gt: (N,) ground-truth building pixels per image.

    Returns:
        (N, L) float64 Dice, NaN where the image is empty/empty at that level.
    """
    tp, pp, gt = _check_counts(tp, pp, gt)
    return _dice(tp, pp, gt[:, None])


def scores_from_counts(tp: np.ndarray, pp: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """The official score at every level from per-image counts.

    Equal, bit for bit, to ``competition_score`` of each level's binary maps: the per-image
    Dice is the same float64 expression and the mean sums images in the same order.

    Args:
        tp: (N, L) true-positive counts per image and level (e.g. ``LevelCounts.tp``).
        pp: (N, L) predicted-positive counts.
        gt: (N,) ground-truth building pixels per image.

    Returns:
        (L,) float64 score per level; images empty/empty at a level are left out of that
        level's mean, and a level where every image is empty/empty scores 1.0.
    """
    tp, pp, gt = _check_counts(tp, pp, gt)
    # Level-major, C-contiguous, so each level's mean is a reduction over a contiguous row:
    # numpy then uses the same pairwise summation as for the 1-D array competition_score sees.
    dice = _dice(np.ascontiguousarray(tp.T), np.ascontiguousarray(pp.T), gt[None, :])  # (L, N)
    return _mean_valid(dice)


def dice_at_levels(
    values: np.ndarray, truth: np.ndarray, max_value: int | None = None
) -> np.ndarray:
    """The official score at every level ``0..M``; see :func:`level_counts` for the arguments.

    Returns:
        (M+1,) float64; entry ``L`` is the score of ``values >= L`` (threshold ``L / M``).
    """
    c = level_counts(values, truth, max_value)
    return scores_from_counts(c.tp, c.pp, c.gt)


def best_level(
    scores: np.ndarray, max_value: int, lo: float = 0.30, hi: float = 0.70
) -> tuple[int, float]:
    """The best-scoring level whose threshold lies in ``[lo, hi]``.

    Ties go to the lowest threshold (the first maximum), so the choice is deterministic.

    Args:
        scores: (M+1,) score per level, e.g. from :func:`scores_from_counts`.
        max_value: M.
        lo: smallest threshold considered (inclusive).
        hi: largest threshold considered (inclusive).

    Returns:
        ``(level, score)``.

    Raises:
        ValueError: if no level's threshold lies in the range, or ``scores`` has the wrong
            length or contains NaN.
    """
    m = _check_max_value(max_value)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (m + 1,):
        raise ValueError(f"scores must have shape ({m + 1},) for max_value={m}, got {scores.shape}")
    first, last = level_range(m, lo, hi)
    window = scores[first : last + 1]
    if np.isnan(window).any():
        raise ValueError("scores contain NaN; compute them with scores_from_counts")
    i = int(np.argmax(window))
    return first + i, float(window[i])


def level_range(max_value: int, lo: float, hi: float) -> tuple[int, int]:
    """The levels ``first..last`` whose thresholds ``L / M`` lie in ``[lo, hi]``.

    Raises:
        ValueError: if no level lies in the range.
    """
    m = _check_max_value(max_value)
    first = int(level_from_threshold(lo, m))
    # Last level with L / m <= hi: one before the first level with L / m > hi.
    last = min(int(np.searchsorted(np.arange(m + 1) / m, hi, side="right")) - 1, m)
    if first > last:
        raise ValueError(
            f"no threshold level k/{m} lies in [lo, hi] = [{lo}, {hi}]; widen the range"
        )
    return first, last


def widened_range(
    lo: float, hi: float, wide: tuple[float, float] = WIDE_RANGE
) -> tuple[float, float]:
    """The sweep range after widening: ``[lo, hi]`` grown to cover ``wide``, never shrunk."""
    return min(lo, wide[0]), max(hi, wide[1])


def on_range_edge(
    level: int,
    max_value: int,
    lo: float,
    hi: float,
    wide: tuple[float, float] = WIDE_RANGE,
) -> bool:
    """Whether ``level`` is the first or last level of ``[lo, hi]`` on a side ``wide`` extends.

    Such a choice is clipped by the range: the score may still rise beyond the edge. An edge
    that already reaches the wide range's end (or beyond) is not one the range can move.
    """
    first, last = level_range(max_value, lo, hi)
    return (level == first and lo > wide[0]) or (level == last and hi < wide[1])


@dataclass(frozen=True)
class LevelChoice:
    """A chosen threshold level and how it was found (see :func:`choose_level`)."""

    level: int  # positive iff value >= level
    score: float  # official score at that level
    max_value: int  # M of the maps (255 k for a sum of k maps)
    widened: bool  # the default range's best lay on its edge, so the sweep was widened
    lo: float  # the range the choice was made in (the widened one when ``widened``)
    hi: float

    @property
    def threshold(self) -> float:
        """``level / M``: the float threshold the level stands for."""
        return self.level / self.max_value


def choose_level(
    scores: np.ndarray,
    max_value: int,
    lo: float = 0.30,
    hi: float = 0.70,
    wide: tuple[float, float] | None = WIDE_RANGE,
) -> LevelChoice:
    """The best level in ``[lo, hi]``, widened to ``wide`` when that best sits on an edge.

    A best threshold on the edge of the default range means the range cut the curve while it
    was still rising (the optimum lies outside), so the sweep widens to
    :func:`widened_range`. The wider sweep replaces the default choice only when it scores
    strictly higher: among equal scores the default range wins, because a threshold far from
    0.5 that buys nothing on a small validation set is noise, not signal
    (``docs/thresholds.md``).

    Args:
        scores: (M+1,) score per level, e.g. from :func:`scores_from_counts`.
        max_value: M.
        lo: Low end of the default range.
        hi: High end of the default range.
        wide: The range to widen to; None never widens.

    Returns:
        The choice, with ``widened`` set when the sweep was widened.
    """
    level, score = best_level(scores, max_value, lo, hi)
    if wide is None or not on_range_edge(level, max_value, lo, hi, wide):
        return LevelChoice(level, score, int(max_value), False, lo, hi)
    w_lo, w_hi = widened_range(lo, hi, wide)
    w_level, w_score = best_level(scores, max_value, w_lo, w_hi)
    if w_score > score:
        level, score = w_level, w_score
    return LevelChoice(level, score, int(max_value), True, w_lo, w_hi)


def best_threshold(
    values: np.ndarray,
    truth: np.ndarray,
    lo: float = 0.30,
    hi: float = 0.70,
    *,
    max_value: int | None = None,
) -> tuple[float, float]:
    """The threshold in ``[lo, hi]`` with the best official score.

    Every level ``L`` with ``lo <= L / M <= hi`` is tried (256 levels span [0, 1] for one
    uint8 map); ties go to the lowest threshold.

    Args:
        values: (N, H, W) probabilities, uint8 maps or integer sums (see :func:`level_counts`).
        truth: (N, H, W) binary ground truth.
        lo: smallest threshold considered (inclusive).
        hi: largest threshold considered (inclusive).
        max_value: M for integer sums; see :func:`level_counts`.

    Returns:
        ``(threshold, score)``; ``binarise(values, threshold)`` reproduces the score exactly.
    """
    c = level_counts(values, truth, max_value)
    level, score = best_level(scores_from_counts(c.tp, c.pp, c.gt), c.max_value, lo, hi)
    return level / c.max_value, score


def roc_curve(
    values: np.ndarray, truth: np.ndarray, *, max_value: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel-level ROC curve with one point per level.

    Args:
        values: (N, H, W) probabilities, uint8 maps or integer sums (see :func:`level_counts`).
        truth: (N, H, W) binary ground truth with at least one building and one background
            pixel.
        max_value: M for integer sums.

    Returns:
        ``(fpr, tpr, thresholds)``, each (M+1,), in order of *increasing* threshold ``L / M``
        (so fpr and tpr decrease from 1); pixels are positive iff value >= threshold.

    Raises:
        ValueError: if the truth has no building pixel or no background pixel.
    """
    levels, m = _as_levels(values, max_value)
    truth = _as_binary(truth, "truth")
    if levels.shape != truth.shape:
        raise ValueError(f"values have shape {levels.shape} but truth has shape {truth.shape}")
    hist = _histograms(levels, truth, m, per_image=False)  # (M+1, 2)
    tp = _reverse_cumsum(hist[:, 1])  # (M+1,)
    fp = _reverse_cumsum(hist[:, 0])
    n_pos, n_neg = int(tp[0]), int(fp[0])
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"the ROC curve needs building and background pixels, got {n_pos} building and "
            f"{n_neg} background pixels"
        )
    return fp / n_neg, tp / n_pos, np.arange(m + 1) / m


def youden_threshold(
    values: np.ndarray,
    truth: np.ndarray,
    lo: float = 0.0,
    hi: float = 1.0,
    *,
    max_value: int | None = None,
) -> tuple[float, float]:
    """The threshold maximising Youden's J = TPR - FPR over pixel counts.

    Ties go to the lowest threshold.

    Args:
        values: (N, H, W) probabilities, uint8 maps or integer sums (see :func:`level_counts`).
        truth: (N, H, W) binary ground truth with building and background pixels.
        lo: smallest threshold considered (inclusive).
        hi: largest threshold considered (inclusive).
        max_value: M for integer sums.

    Returns:
        ``(threshold, j)``.
    """
    fpr, tpr, thresholds = roc_curve(values, truth, max_value=max_value)
    m = thresholds.size - 1
    level, j = best_level(tpr - fpr, m, lo, hi)
    return level / m, j


# --------------------------------------------------------------------------------------------
# Scoring CSV files
# --------------------------------------------------------------------------------------------


def score_csv_per_image(
    truth_csv: str | os.PathLike[str],
    submission_csv: str | os.PathLike[str],
    shape: tuple[int, int] | None = None,
) -> pd.DataFrame:
    """Per-image Dice of a submission CSV against a ground-truth CSV.

    Both files need ``img_id`` and ``mask_rle`` columns; rows are matched by ``img_id``. Each
    image's shape comes from ``height`` and ``width`` columns of the truth file when it has
    them (they take precedence), else from ``shape`` (224 x 224 for the competition's test
    tiles).

    Args:
        truth_csv: ground-truth CSV.
        submission_csv: submission CSV, one row per ground-truth image.
        shape: ``(H, W)`` of every image when the truth CSV has no height/width columns.

    Returns:
        One row per ground-truth image, in the truth file's order, with columns ``img_id``,
        ``dice`` (NaN when both masks are empty), ``intersection``, ``pred_pixels`` and
        ``truth_pixels``.

    Raises:
        ValueError: naming the file, line and img_id, for missing columns, duplicate ids, ids
            missing from or extra in the submission, bad shapes, or malformed RLE.
    """
    truth = _read_rle_csv(truth_csv)
    sub = _read_rle_csv(submission_csv)
    truth_ids = pd.Index(truth["img_id"])
    sub_ids = pd.Index(sub["img_id"])
    missing = truth_ids.difference(sub_ids, sort=False)
    if len(missing):
        raise ValueError(
            f"{submission_csv} has no row for {len(missing)} img_id(s) of {truth_csv}, e.g. "
            f"{list(missing[:5])}; write '-1' for images with no building"
        )
    extra = sub_ids.difference(truth_ids, sort=False)
    if len(extra):
        raise ValueError(
            f"{submission_csv} has {len(extra)} img_id(s) that {truth_csv} does not have, e.g. "
            f"{list(extra[:5])}; is it scored against the right ground truth?"
        )
    shapes = _row_shapes(truth, truth_csv, shape)  # (N, 2)
    sub_row = sub_ids.get_indexer(truth_ids)  # (N,) row in sub of each truth image

    n = len(truth)
    inter = np.empty(n, dtype=np.int64)
    pred_pixels = np.empty(n, dtype=np.int64)
    truth_pixels = np.empty(n, dtype=np.int64)
    img_ids = truth["img_id"].tolist()
    truth_rles = truth["mask_rle"].tolist()
    sub_rles = sub["mask_rle"].tolist()
    for i in range(n):
        hw = (int(shapes[i, 0]), int(shapes[i, 1]))
        g = _decode_cell(truth_rles[i], hw, truth_csv, i, img_ids[i])
        p = _decode_cell(sub_rles[sub_row[i]], hw, submission_csv, int(sub_row[i]), img_ids[i])
        inter[i] = np.count_nonzero(g & p)
        pred_pixels[i] = np.count_nonzero(p)
        truth_pixels[i] = np.count_nonzero(g)
    return pd.DataFrame(
        {
            "img_id": img_ids,
            "dice": _dice(inter, pred_pixels, truth_pixels),
            "intersection": inter,
            "pred_pixels": pred_pixels,
            "truth_pixels": truth_pixels,
        }
    )


def truth_masks(
    truth_csv: str | os.PathLike[str],
    ids: Sequence[str],
    shape: tuple[int, int] | None = None,
) -> np.ndarray:
    """Ground-truth masks of ``ids``, in that order, from a truth CSV: (N, H, W) bool.

    Read as :func:`score_csv_per_image` reads it: ids as text (``0007`` and ``NA`` stay
    themselves), shapes from height/width columns, else ``shape``.

    Raises:
        ValueError: naming the file, for the reasons of :func:`score_csv_per_image`, or an
            id it has no row for.
    """
    truth = _read_rle_csv(truth_csv)
    shapes = _row_shapes(truth, truth_csv, shape)  # (N, 2)
    rows = pd.Index(truth["img_id"]).get_indexer(list(ids))  # (len(ids),) -1 where absent
    if (rows < 0).any():
        missing = [i for i, r in zip(ids, rows, strict=True) if r < 0]
        raise ValueError(f"{truth_csv} has no row for {len(missing)} image(s), e.g. {missing[:5]}")
    rles, img_ids = truth["mask_rle"].tolist(), truth["img_id"].tolist()
    return np.stack(
        [
            _decode_cell(rles[r], (int(shapes[r, 0]), int(shapes[r, 1])), truth_csv, r, img_ids[r])
            for r in rows
        ]
    )


def score_csv(
    truth_csv: str | os.PathLike[str],
    submission_csv: str | os.PathLike[str],
    shape: tuple[int, int] | None = None,
) -> float:
    """The official score of a submission CSV; see :func:`score_csv_per_image`.

    Returns:
        The mean Dice over images that are not empty/empty (1.0 if all are).
    """
    return official_score(score_csv_per_image(truth_csv, submission_csv, shape)["dice"])


def official_score(dice: np.ndarray | pd.Series) -> float:
    """The official score of per-image Dice (NaN for empty/empty images, left out): their
    mean, 1.0 if every image is empty in both."""
    return float(_mean_valid(np.asarray(dice, np.float64)[None, :])[0])


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _dice(inter: np.ndarray, pred_sum: np.ndarray, truth_sum: np.ndarray) -> np.ndarray:
    """Dice from integer counts (broadcasting); NaN where prediction and truth are empty.

    The single place the formula lives, so that every path computes identical floats.
    """
    denom = pred_sum + truth_sum
    dice = (2 * inter + SMOOTH) / (denom + SMOOTH)
    dice[np.broadcast_to(denom == 0, dice.shape)] = np.nan
    return dice


def _mean_valid(dice: np.ndarray) -> np.ndarray:
    """Row means of a C-contiguous (R, N) Dice array ignoring NaN; 1.0 for all-NaN rows.

    Same arithmetic as ``np.nanmean(row)``: zero the NaNs, sum (pairwise, along the contiguous
    axis), divide by the count.
    """
    valid = ~np.isnan(dice)
    total = np.where(valid, dice, 0.0).sum(axis=1)  # (R,)
    count = valid.sum(axis=1)
    out = np.ones(dice.shape[0], dtype=np.float64)
    np.divide(total, count, out=out, where=count > 0)
    return out


def _reverse_cumsum(hist: np.ndarray) -> np.ndarray:
    """Counts of values >= L along the last axis: (..., M+1) -> (..., M+1), C-contiguous."""
    return np.ascontiguousarray(np.cumsum(hist[..., ::-1], axis=-1)[..., ::-1])


def _histograms(levels: np.ndarray, truth: np.ndarray, m: int, *, per_image: bool) -> np.ndarray:
    """Histograms of integer values split by truth: (N, M+1, 2) per image, else (M+1, 2).

    Values must already be known to lie in ``0..m`` for unsigned dtypes of at most 8 bits;
    wider dtypes are range-checked here chunk by chunk, while the chunk is in cache.
    """
    n = levels.shape[0]
    per = int(np.prod(levels.shape[1:]))
    n_bins = m + 1
    v_all = levels.reshape(n, per)  # (N, H*W)
    t_all = truth.reshape(n, per)
    check = not (levels.dtype == np.uint8 and m >= QUANT_MAX)
    out = np.zeros((n, n_bins, 2) if per_image else (n_bins, 2), dtype=np.int64)
    step = max(1, _HIST_CHUNK_PIXELS // max(per, 1))  # images per chunk
    # One key buffer reused for every chunk: small enough to stay in cache across the passes
    # below, and no fresh pages to fault in per chunk (3x faster than 128 MiB chunks).
    buf = np.empty((min(step, n), per), dtype=np.int64)
    # Key = (image offset + value) * 2 + truth: even bins background, odd bins building.
    offsets = np.arange(buf.shape[0], dtype=np.int64)[:, None] * (2 * n_bins if per_image else 0)
    for s in range(0, n, step):
        v = v_all[s : s + step]  # (n_c, H*W)
        if check and v.size and (v.min() < 0 or v.max() > m):
            raise ValueError(
                f"values must lie in 0..max_value={m}, found {v.min()}..{v.max()}; for a sum of "
                "k uint8 maps pass max_value=255*k"
            )
        key = buf[: v.shape[0]]  # (n_c, H*W)
        np.multiply(v, 2, out=key, dtype=np.int64)  # int64 loop: no uint8 overflow
        key |= t_all[s : s + step]
        key += offsets[: v.shape[0]]
        n_hist = key.shape[0] if per_image else 1
        counts = np.bincount(key.reshape(-1), minlength=n_hist * n_bins * 2)
        if per_image:
            out[s : s + step] = counts.reshape(-1, n_bins, 2)
        else:
            out += counts.reshape(n_bins, 2)
    return out


def _check_max_value(max_value: int) -> int:
    """Validate M (the value standing for probability 1)."""
    if isinstance(max_value, (bool, np.bool_)) or not isinstance(max_value, (int, np.integer)):
        raise ValueError(f"max_value must be a positive integer, got {max_value!r}")
    if max_value < 1:
        raise ValueError(f"max_value must be a positive integer, got {max_value!r}")
    return int(max_value)


def _as_levels(values: np.ndarray, max_value: int | None) -> tuple[np.ndarray, int]:
    """Integer maps and their M from floats (quantised), uint8 or wider integer sums."""
    values = np.asarray(values)
    kind = values.dtype.kind
    if kind == "f":
        if max_value not in (None, QUANT_MAX):
            raise ValueError(
                f"float probabilities are quantised to 0..{QUANT_MAX}; max_value={max_value} "
                "only applies to integer sums of maps"
            )
        return quantise(values), QUANT_MAX
    if kind in "iu":
        if max_value is None:
            if values.dtype != np.uint8:
                raise ValueError(
                    f"integer maps of dtype {values.dtype} need max_value (255*k for a sum of k "
                    "uint8 maps)"
                )
            max_value = QUANT_MAX
        return values, _check_max_value(max_value)
    raise TypeError(
        f"values must be float probabilities or integer (quantised) maps, got dtype "
        f"{values.dtype}; a boolean map is already binary, use competition_score"
    )


def _as_binary(mask: np.ndarray, name: str) -> np.ndarray:
    """Validate an (N, H, W) binary array and return it as bool."""
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(
            f"{name} must be an (N, H, W) batch, got shape {mask.shape}; use mask[None] for one "
            "image"
        )
    if mask.shape[0] == 0:
        raise ValueError(f"{name} holds no images (shape {mask.shape}); nothing to score")
    if mask.dtype == np.bool_:
        return mask
    if mask.dtype.kind not in "iu":
        raise TypeError(
            f"{name} must be bool or integer 0/1, got dtype {mask.dtype}; threshold "
            "probabilities first (binarise) or use the level functions"
        )
    if mask.size and (mask.min() < 0 or mask.max() > 1):
        raise ValueError(f"{name} must hold only 0 and 1, found {mask.min()}..{mask.max()}")
    return mask.astype(bool)


def _check_counts(
    tp: np.ndarray, pp: np.ndarray, gt: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate count shapes: tp and pp (N, L), gt (N,)."""
    tp, pp, gt = np.asarray(tp), np.asarray(pp), np.asarray(gt)
    if tp.ndim != 2 or tp.shape != pp.shape or gt.shape != tp.shape[:1]:
        raise ValueError(
            f"counts must be tp (N, L), pp (N, L) and gt (N,), got {tp.shape}, {pp.shape} and "
            f"{gt.shape}"
        )
    if tp.shape[0] == 0:
        raise ValueError("counts hold no images; nothing to score")
    return tp, pp, gt


def _read_rle_csv(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a CSV with img_id and mask_rle as strings; empty cells stay empty strings."""
    try:
        # No NaN conversion: an empty cell must reach rle_decode as "" to get its message.
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as err:
        raise ValueError(f"{path}: cannot read as CSV ({err})") from err
    absent = [c for c in ("img_id", "mask_rle") if c not in df.columns]
    if absent:
        raise ValueError(
            f"{path} lacks column(s) {absent}; it has {list(df.columns)}, needs img_id and mask_rle"
        )
    dup = df["img_id"].duplicated(keep=False)
    if dup.any():
        first = df.loc[dup, "img_id"].iloc[0]
        lines = [int(i) + 2 for i in np.flatnonzero(df["img_id"].to_numpy() == first)]
        raise ValueError(
            f"{path} has {int(dup.sum())} rows with duplicate img_id, e.g. {first!r} on lines "
            f"{lines}; keep one row per image"
        )
    return df


def _row_shapes(
    truth: pd.DataFrame, path: str | os.PathLike[str], shape: tuple[int, int] | None
) -> np.ndarray:
    """(N, 2) image shapes from height/width columns, else from ``shape``."""
    has = [c in truth.columns for c in ("height", "width")]
    if all(has):
        out = np.empty((len(truth), 2), dtype=np.int64)
        for j, col in enumerate(("height", "width")):
            num = pd.to_numeric(truth[col], errors="coerce").to_numpy(dtype=np.float64)
            bad = np.flatnonzero(~(num >= 0) | (num != np.floor(num)))
            if bad.size:
                i = int(bad[0])
                raise ValueError(
                    f"{path} line {i + 2} (img_id {truth['img_id'].iloc[i]!r}): {col} "
                    f"{truth[col].iloc[i]!r} is not a non-negative integer"
                )
            out[:, j] = num
        return out
    if any(has):
        raise ValueError(f"{path} has only one of the height/width columns; give both or neither")
    if shape is None:
        raise ValueError(
            f"{path} has no height/width columns, so pass shape=(H, W) (the competition test "
            "tiles are 224x224)"
        )
    try:
        h, w = (int(x) for x in shape)
        ok = h >= 0 and w >= 0 and all(int(x) == x for x in shape)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"shape must be a pair of non-negative integers (H, W), got {shape!r}")
    return np.tile(np.array([h, w], dtype=np.int64), (len(truth), 1))


def _decode_cell(
    rle: str, shape: tuple[int, int], path: str | os.PathLike[str], row: int, img_id: str
) -> np.ndarray:
    """rle_decode, with errors naming the file, line and img_id."""
    try:
        return rle_decode(rle, shape).astype(bool)
    except ValueError as err:
        raise ValueError(f"{path} line {row + 2} (img_id {img_id!r}): {err}") from err

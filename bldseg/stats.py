"""Uncertainty for every comparison: bootstrap intervals over source images.

The competition score is a mean of per-image Dice, so a difference between two models (or an
ensemble and its best member) measured on a few hundred tiles is partly luck. Tiles cut from
one source image are not independent, so the bootstrap resamples *source images* (clusters)
with replacement and recomputes the mean over all tiles of the drawn images: a cluster
bootstrap. Tiles whose score is undefined (NaN: empty prediction on an empty truth, which the
official score leaves out) are left out of every mean, as in the score itself.

A *paired* comparison (two models on the same tiles) uses the same draws for both, so the
interval is on the difference and the shared difficulty of the tiles cancels.

Fewer than two source images give no interval (every resample is that one image): its ends are
-inf and inf, ``null`` in strict JSON (:func:`bldseg.io.finite_json`), and
:func:`format_interval` prints it as ``0.5000 [no interval: 1 source image]``.

Everything is vectorised over draws: per-cluster sums ``S_g`` and counts ``N_g`` and a
(draws, clusters) matrix ``W`` of multinomial draw counts give every resampled mean as
``(W @ S) / (W @ N)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Draws per interval: enough for stable 2.5/97.5 percentiles (their Monte-Carlo error is
#: well below the intervals' own width at the sizes used here).
DEFAULT_DRAWS = 2000


@dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap percentile interval.

    Attributes:
        estimate: The statistic on the data itself.
        low: Lower end of the interval.
        high: Upper end of the interval.
        level: Coverage, e.g. 0.95.
        n: Number of scored tiles (a difference: the smaller arm's or side's).
        clusters: Number of source images with a scored tile, the resampled unit (a
            difference: the smaller arm's or side's); below 2 the interval is unbounded.
        unit: What ``clusters`` counts, as the printed text names it.
    """

    estimate: float
    low: float
    high: float
    level: float = 0.95
    n: int = 0
    clusters: int = 0
    unit: str = "source image"

    @property
    def excludes_zero(self) -> bool:
        """Whether the whole interval lies on one side of zero (a difference beyond noise)."""
        return self.low > 0 or self.high < 0

    @property
    def bounded(self) -> bool:
        """Whether both ends are finite (not so below 2 clusters, or when no draw scored)."""
        return math.isfinite(self.low) and math.isfinite(self.high)

    def __str__(self) -> str:
        return format_interval(self)

    def to_dict(self) -> dict[str, float | int | str]:
        """Plain dict for JSON and MLflow; unbounded ends stay +-inf (write it through
        :func:`bldseg.io.write_json` or :func:`bldseg.io.finite_json`: strict JSON, null)."""
        return {
            "estimate": self.estimate,
            "low": self.low,
            "high": self.high,
            "level": self.level,
            "n": self.n,
            "clusters": self.clusters,
            "unit": self.unit,
        }


def _finite(x: Any) -> bool:
    return x is not None and math.isfinite(x)


def format_interval(
    iv: Interval | Mapping[str, Any],
    value: float | None = None,
    *,
    signed: bool = False,
    digits: int = 4,
) -> str:
    """``estimate [low, high]`` for people; an interval without finite ends says why instead.

    One source image gives ``0.5000 [no interval: 1 source image]``, not ``[-inf, inf]`` (or
    ``[None, None]`` once read back from strict JSON, where its ends are null).

    Args:
        iv: An interval, or its :meth:`Interval.to_dict` (also as read back from JSON).
        value: Printed in place of the estimate (e.g. the exact official score).
        signed: Signed numbers (a difference).
        digits: Decimals.
    """
    d = iv.to_dict() if isinstance(iv, Interval) else iv
    f = f"{'+' if signed else ''}.{digits}f"
    est = d["estimate"] if value is None else value
    return f"{est:{f}} {format_bounds(d, signed=signed, digits=digits)}"


def format_bounds(
    iv: Interval | Mapping[str, Any], *, signed: bool = False, digits: int = 4, sep: str = ", "
) -> str:
    """The ``[low, high]`` part of :func:`format_interval` alone (e.g. a seed interval printed
    beside a tile interval): ``[no interval: 1 value]`` without finite ends."""
    d = iv.to_dict() if isinstance(iv, Interval) else iv
    f = f"{'+' if signed else ''}.{digits}f"
    low, high = d.get("low"), d.get("high")
    if _finite(low) and _finite(high):
        return f"[{low:{f}}{sep}{high:{f}}]"
    clusters = d.get("clusters")
    if clusters is not None and clusters < 2:
        unit = d.get("unit") or "source image"
        return f"[no interval: {clusters} {unit}{'' if clusters == 1 else 's'}]"
    return "[no interval]"  # no resample had a score in both arms (NaN ends)


def _cluster_sums(
    scores: np.ndarray, groups: Sequence | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-cluster sums of the valid scores, their counts, and the cluster code of each tile.

    Every cluster is listed, also those without a valid score (count 0): the callers drop them
    (:func:`_scored`) once they know which clusters a statistic uses.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"scores must be 1-D (one per tile), got shape {scores.shape}")
    if groups is None:
        codes = np.arange(len(scores))
    else:
        if len(groups) != len(scores):
            raise ValueError(f"{len(groups)} group labels for {len(scores)} scores")
        _, codes = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    valid = np.isfinite(scores)
    k = int(codes.max()) + 1 if len(codes) else 0
    sums = np.bincount(codes[valid], weights=scores[valid], minlength=k)
    counts = np.bincount(codes[valid], minlength=k).astype(np.float64)
    return sums, counts, codes


def _scored(keep: np.ndarray, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """``arrays`` (per cluster) restricted to the clusters ``keep``.

    A source image none of whose tiles is scored adds nothing to a mean, but resampling it
    would count it as a cluster: one scored image plus one all-NaN image passed the "at least
    two clusters" guard with a zero-width interval.
    """
    return tuple(a[keep] for a in arrays)


def _draws(n_clusters: int, draws: int, seed: int) -> np.ndarray:
    """(draws, clusters) counts: how often each cluster is drawn in each resample."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_clusters, np.full(n_clusters, 1.0 / n_clusters), size=draws).astype(
        np.float64
    )


def _interval(est: float, samples: np.ndarray, level: float, n: int, clusters: int) -> Interval:
    if clusters < 2:
        # every resample of one source image is that image: a zero-width interval would
        # present one image's tiles as certainty (and pass any "interval above 0" rule)
        return Interval(float(est), -np.inf, np.inf, level, n, clusters)
    samples = samples[np.isfinite(samples)]
    if not len(samples):
        return Interval(est, float("nan"), float("nan"), level, n, clusters)
    lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(est), float(lo), float(hi), level, n, clusters)


def bootstrap_mean(
    scores: Sequence[float] | np.ndarray,
    groups: Sequence | None = None,
    *,
    level: float = 0.95,
    draws: int = DEFAULT_DRAWS,
    seed: int = 0,
) -> Interval:
    """Mean of per-tile scores with a cluster-bootstrap interval.

    Args:
        scores: One score per tile; NaN tiles are left out (empty/empty in the official score).
        groups: Source image of every tile (the resampled unit); None: tiles are independent.
        level: Coverage of the interval.
        draws: Bootstrap resamples.
        seed: Seed of the resampling (fixed: reports are reproducible).

    Raises:
        ValueError: No valid score, or mismatched lengths.
    """
    sums, counts, _ = _cluster_sums(np.asarray(scores), groups)
    if counts.sum() == 0:
        raise ValueError("no valid (finite) score to average")
    sums, counts = _scored(counts > 0, sums, counts)
    w = _draws(len(sums), draws, seed)
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = (w @ sums) / (w @ counts)  # (draws,)
    est = sums.sum() / counts.sum()
    return _interval(est, boot, level, int(counts.sum()), len(sums))


def paired_difference(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    groups: Sequence | None = None,
    *,
    level: float = 0.95,
    draws: int = DEFAULT_DRAWS,
    seed: int = 0,
) -> Interval:
    """Mean score of ``a`` minus mean score of ``b`` on the same tiles, with a paired interval.

    Each arm's mean leaves out its own NaN tiles (as the official score does per submission);
    both arms are resampled with the same draws of the source images that either arm scores.
    Each arm's mean needs at least two scored source images for an interval (``clusters`` is
    the smaller arm's count): an arm scored on one image only has no measured uncertainty.

    Args:
        a: Per-tile scores of the first model (or ensemble).
        b: Per-tile scores of the second, on the same tiles in the same order.
        groups: Source image of every tile; None: tiles are independent.
        level: Coverage of the interval.
        draws: Bootstrap resamples.
        seed: Seed of the resampling.

    Raises:
        ValueError: Different lengths, or an arm without a valid score.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired scores need the same tiles: {a.shape} vs {b.shape}")
    sa, na, _ = _cluster_sums(a, groups)
    sb, nb, _ = _cluster_sums(b, groups)
    if na.sum() == 0 or nb.sum() == 0:
        raise ValueError("an arm has no valid (finite) score")
    # a tile scored in one arm only counts in that arm's mean, so an image counts when either
    # arm scores it; draws in which an arm has no scored image are left out (NaN)
    sa, na, sb, nb = _scored((na > 0) | (nb > 0), sa, na, sb, nb)
    w = _draws(len(sa), draws, seed)
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = (w @ sa) / (w @ na) - (w @ sb) / (w @ nb)
    est = sa.sum() / na.sum() - sb.sum() / nb.sum()
    clusters = int(min((na > 0).sum(), (nb > 0).sum()))
    return _interval(est, boot, level, int(min(na.sum(), nb.sum())), clusters)


def unpaired_difference(
    a: Sequence[float] | np.ndarray,
    groups_a: Sequence | None,
    b: Sequence[float] | np.ndarray,
    groups_b: Sequence | None,
    *,
    level: float = 0.95,
    draws: int = DEFAULT_DRAWS,
    seed: int = 0,
) -> Interval:
    """Mean of ``a`` minus mean of ``b`` on *different* tiles (e.g. validation vs test Dice).

    Each side is resampled by its own source images with its own draws (the two samples are
    independent), so the interval carries both sides' uncertainty. ``n`` and ``clusters`` of
    the result are the smaller side's.

    Raises:
        ValueError: A side without a valid score, or mismatched lengths.
    """
    sa, na, _ = _cluster_sums(np.asarray(a), groups_a)
    sb, nb, _ = _cluster_sums(np.asarray(b), groups_b)
    if na.sum() == 0 or nb.sum() == 0:
        raise ValueError("a side has no valid (finite) score")
    sa, na = _scored(na > 0, sa, na)
    sb, nb = _scored(nb > 0, sb, nb)
    wa, wb = _draws(len(sa), draws, seed), _draws(len(sb), draws, seed + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = (wa @ sa) / (wa @ na) - (wb @ sb) / (wb @ nb)
    est = sa.sum() / na.sum() - sb.sum() / nb.sum()
    return _interval(est, boot, level, int(min(na.sum(), nb.sum())), min(len(sa), len(sb)))


def mean_interval(values: Sequence[float], *, level: float = 0.95) -> Interval:
    """Mean of a few independent values (e.g. one score per seed) with Student's t interval.

    A bootstrap of 3 values cannot reach beyond their minimum and maximum, so its "95%"
    interval excluded zero whenever three seeds agreed in sign (a quarter of the time with no
    effect at all); the t interval (``mean +- t * sd / sqrt(n)``, n - 1 degrees of freedom)
    covers as it says for normal seed-to-seed noise. Fewer than 2 values give an unbounded
    interval.
    """
    from scipy.stats import t as student_t

    v = np.asarray(values, dtype=np.float64)
    mean = float(v.mean()) if v.size else float("nan")
    if v.size < 2:
        return Interval(mean, -np.inf, np.inf, level, int(v.size), int(v.size), "value")
    half = float(student_t.ppf(0.5 + level / 2, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size))
    return Interval(mean, mean - half, mean + half, level, int(v.size), int(v.size), "value")

"""Quality against time budgets: what a run gives a user who stops it after t seconds.

A run's epochs are points (cumulative seconds, validation Dice, test Dice). Stopped at a budget
``t``, the user keeps the checkpoint of the best validation Dice among the epochs finished by
``t`` (``best.pt`` at that moment), so its test Dice is the run's value at ``t``: a step
function, not an interpolation, and not the best *test* Dice seen (that would be chosen on the
test split). Used by ``experiments/bench_train.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["EpochPoint", "behind_at_epoch_ends", "cumulative", "epoch_at", "first_reaching"]


@dataclass(frozen=True)
class EpochPoint:
    """One finished epoch of a run.

    Attributes:
        epoch: 1-based epoch.
        seconds: Cumulative seconds (CPU or wall) when the epoch finished, validation included.
        val: Validation Dice of the epoch (what ``best.pt`` is chosen by).
        test: Test Dice of the epoch's model.
    """

    epoch: int
    seconds: float
    val: float
    test: float


def cumulative(per_epoch: Sequence[float]) -> list[float]:
    """Per-epoch seconds -> cumulative seconds at the end of each epoch."""
    if any(s < 0 or not np.isfinite(s) for s in per_epoch):
        raise ValueError(f"epoch times must be finite and >= 0, got {list(per_epoch)}")
    return [float(v) for v in np.cumsum(per_epoch)]


def epoch_at(points: Sequence[EpochPoint], budget: float) -> EpochPoint | None:
    """The epoch a user stopping at ``budget`` seconds keeps (best validation so far).

    Ties in validation Dice keep the earlier epoch, as the training loop does (it replaces
    ``best.pt`` only on a strictly better score). None when no epoch finished by ``budget``.
    """
    done = [p for p in points if p.seconds <= budget]
    if not done:
        return None
    best = done[0]
    for p in done[1:]:
        if p.val > best.val:
            best = p
    return best


def first_reaching(points: Sequence[EpochPoint], target: float) -> EpochPoint | None:
    """The first epoch at which the kept checkpoint's test Dice is >= ``target``.

    The kept checkpoint is :func:`epoch_at` of that epoch's end; None if it never gets there.
    """
    for p in points:
        kept = epoch_at(points, p.seconds)
        if kept is not None and kept.test >= target:
            return p
    return None


def behind_at_epoch_ends(
    ours: Sequence[EpochPoint], other: Sequence[EpochPoint]
) -> tuple[int, list[tuple[float, float]]]:
    """Where the kept checkpoint of ``ours`` has a lower test Dice than ``other``'s.

    Compared at every epoch end of either run (the moments either curve changes) once both
    have finished an epoch, so no choice of budgets can hide a stretch where ``ours`` is behind.
    Returns the number of moments compared and, for those where ``ours`` is behind,
    ``(seconds, ours - other)`` in time order.
    """
    times = sorted({p.seconds for p in (*ours, *other)})
    compared, behind = 0, []
    for t in times:
        a, b = epoch_at(ours, t), epoch_at(other, t)
        if a is None or b is None:
            continue
        compared += 1
        if a.test < b.test:
            behind.append((t, a.test - b.test))
    return compared, behind

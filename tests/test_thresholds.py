"""Threshold choice: the default sweep, and its widening when the best lies on an edge."""

import numpy as np
import pytest

from bldseg import metrics
from bldseg.metrics import WIDE_RANGE, choose_level, level_range, on_range_edge, widened_range


def _peaked(peak: int, m: int = 255) -> np.ndarray:
    """Scores over levels 0..m with one maximum at ``peak``, falling off linearly."""
    return 0.9 - 0.001 * np.abs(np.arange(m + 1) - peak)


def test_level_range_matches_best_level_window():
    assert level_range(255, 0.3, 0.7) == (77, 178)
    assert level_range(765, 0.3, 0.7) == (230, 535)
    with pytest.raises(ValueError, match="widen the range"):
        level_range(255, 0.5001, 0.5019)


def test_widened_range_only_grows():
    assert widened_range(0.3, 0.7) == WIDE_RANGE == (0.05, 0.95)
    assert widened_range(0.0, 0.7) == (0.0, 0.95)
    assert widened_range(0.3, 1.0) == (0.05, 1.0)


@pytest.mark.parametrize(
    ("level", "lo", "hi", "edge"),
    [
        (77, 0.3, 0.7, True),  # first level of [0.3, 0.7]
        (178, 0.3, 0.7, True),  # last level
        (78, 0.3, 0.7, False),
        (13, 0.05, 0.7, False),  # the low end already is the wide range's: nothing to widen
        (178, 0.05, 0.7, True),
        (242, 0.3, 0.95, False),
    ],
)
def test_on_range_edge(level, lo, hi, edge):
    assert on_range_edge(level, 255, lo, hi) is edge


def test_inside_the_range_nothing_widens():
    c = choose_level(_peaked(120), 255)
    assert (c.level, c.widened, c.lo, c.hi) == (120, False, 0.3, 0.7)
    assert c.threshold == 120 / 255


@pytest.mark.parametrize("peak", [30, 230])
def test_best_on_an_edge_widens_to_the_wide_range(peak):
    scores = _peaked(peak)
    c = choose_level(scores, 255)
    assert c.widened and (c.lo, c.hi) == WIDE_RANGE
    assert (c.level, c.score) == metrics.best_level(scores, 255, *WIDE_RANGE)
    assert c.level == peak
    # without widening the same scores give the edge
    n = choose_level(scores, 255, wide=None)
    assert not n.widened and n.level in level_range(255, 0.3, 0.7)


def test_widening_keeps_the_default_choice_on_a_tie():
    scores = np.full(256, 0.5)  # flat: the first level of [0.3, 0.7] is "best", on the edge
    c = choose_level(scores, 255)
    assert c.widened and c.level == 77 and c.score == 0.5


def test_widening_never_leaves_the_wide_range():
    scores = _peaked(2)  # the optimum lies below 0.05
    c = choose_level(scores, 255)
    assert c.widened and c.level == metrics.level_from_threshold(0.05)


def test_sums_of_maps_widen_on_their_own_scale():
    m = 255 * 3
    c = choose_level(_peaked(100, m), m)
    assert c.widened and c.level == 100 and c.threshold == 100 / m

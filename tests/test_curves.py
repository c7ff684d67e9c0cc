"""Quality at a time budget: the checkpoint a user keeps when stopping a run at t seconds."""

import pytest

from bldseg.curves import EpochPoint, behind_at_epoch_ends, cumulative, epoch_at, first_reaching

# Validation peaks at epoch 2 while test keeps rising: the kept checkpoint follows validation.
POINTS = [
    EpochPoint(1, 10.0, val=0.50, test=0.40),
    EpochPoint(2, 20.0, val=0.70, test=0.60),
    EpochPoint(3, 30.0, val=0.65, test=0.65),
    EpochPoint(4, 40.0, val=0.70, test=0.70),  # ties epoch 2: the earlier one is kept
]


def test_cumulative():
    assert cumulative([10, 10, 5.5]) == [10.0, 20.0, 25.5]
    with pytest.raises(ValueError, match="finite"):
        cumulative([1.0, float("nan")])


@pytest.mark.parametrize(
    ("budget", "epoch"), [(9.9, None), (10.0, 1), (19.0, 1), (25.0, 2), (35.0, 2), (1e9, 2)]
)
def test_epoch_at_keeps_the_best_validation_epoch_finished_by_the_budget(budget, epoch):
    kept = epoch_at(POINTS, budget)
    assert (kept.epoch if kept else None) == epoch


def test_first_reaching_uses_the_kept_checkpoint_not_the_best_test_epoch():
    # Epoch 3 and 4 test at 0.65/0.70, but the kept checkpoint stays epoch 2 (0.60).
    assert first_reaching(POINTS, 0.6).epoch == 2
    assert first_reaching(POINTS, 0.65) is None
    assert first_reaching(POINTS, 0.4).epoch == 1


def test_behind_at_epoch_ends_checks_every_moment_either_curve_changes():
    # The other run's epochs end at 15 and 25 s; ours at 10, 20, 30, 40 (POINTS: kept tests
    # 0.40, 0.60, 0.60, 0.60). Budgets 20 and 40 alone would show ours level or ahead.
    other = [EpochPoint(1, 15.0, val=0.5, test=0.55), EpochPoint(2, 25.0, val=0.6, test=0.62)]
    compared, behind = behind_at_epoch_ends(POINTS, other)
    # 10 s: the other run has no epoch yet; 15, 20, 25, 30, 40 s are compared.
    assert compared == 5
    assert behind == [
        (15.0, pytest.approx(0.40 - 0.55)),
        (25.0, pytest.approx(0.60 - 0.62)),
        (30.0, pytest.approx(0.60 - 0.62)),
        (40.0, pytest.approx(0.60 - 0.62)),
    ]
    assert behind_at_epoch_ends(other, other) == (2, [])

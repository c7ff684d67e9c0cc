"""Cluster-bootstrap intervals: exact estimates, coverage, pairing, NaN handling."""

import json

import numpy as np
import pytest

from bldseg import stats
from bldseg.io import write_json
from bldseg.stats import (
    bootstrap_mean,
    format_interval,
    mean_interval,
    paired_difference,
    unpaired_difference,
)


def test_estimate_is_the_mean_of_valid_tiles():
    scores = np.array([0.5, np.nan, 1.0, 0.0, np.nan])
    iv = bootstrap_mean(scores, ["a", "a", "b", "c", "c"])
    assert iv.estimate == pytest.approx(0.5)
    assert iv.n == 3 and iv.clusters == 3
    assert iv.low <= iv.estimate <= iv.high
    with pytest.raises(ValueError, match="no valid"):
        bootstrap_mean([np.nan, np.nan])


def test_interval_is_deterministic_and_narrows_with_more_data():
    rng = np.random.default_rng(0)
    small = bootstrap_mean(rng.random(50))
    assert small == bootstrap_mean(np.random.default_rng(0).random(50))
    large = bootstrap_mean(rng.random(5000))
    assert large.high - large.low < (small.high - small.low) / 5


def test_clusters_widen_the_interval():
    # 20 images x 10 tiles whose scores share the image's level: the tiles are not 200
    # independent samples, and resampling images gives a much wider interval than tiles.
    rng = np.random.default_rng(1)
    level = rng.random(20)
    scores = np.repeat(level, 10) + rng.normal(0, 0.01, 200)
    groups = np.repeat(np.arange(20), 10)
    by_tile = bootstrap_mean(scores)
    by_image = bootstrap_mean(scores, groups)
    assert by_image.high - by_image.low > 2.5 * (by_tile.high - by_tile.low)


def test_coverage_of_a_known_mean():
    # 95% intervals around the mean of Bernoulli(0.7) samples cover 0.7 about 95% of the time.
    rng = np.random.default_rng(2)
    hits = 0
    for trial in range(200):
        x = (rng.random(100) < 0.7).astype(float)
        iv = bootstrap_mean(x, draws=500, seed=trial)
        hits += iv.low <= 0.7 <= iv.high
    assert 0.88 <= hits / 200 <= 0.99


def test_paired_difference_cancels_shared_difficulty():
    rng = np.random.default_rng(3)
    difficulty = rng.random(300)
    a = difficulty + 0.02  # a beats b by exactly 0.02 on every tile
    b = difficulty
    paired = paired_difference(a, b)
    assert paired.estimate == pytest.approx(0.02)
    assert paired.low == pytest.approx(0.02) and paired.high == pytest.approx(0.02)
    assert paired.excludes_zero
    # Unpaired intervals of the two means overlap heavily: pairing is what shows the gain.
    ia, ib = bootstrap_mean(a), bootstrap_mean(b)
    assert ia.low < ib.high
    # No real difference: the interval contains zero.
    noise = paired_difference(difficulty + rng.normal(0, 0.05, 300), difficulty)
    assert not noise.excludes_zero


def test_paired_difference_handles_each_arms_nan():
    a = np.array([1.0, np.nan, 0.5, 0.5])
    b = np.array([0.5, 0.5, np.nan, 0.5])
    d = paired_difference(a, b, ["x", "x", "y", "y"])
    assert d.estimate == pytest.approx((2.0 / 3) - 0.5)
    with pytest.raises(ValueError, match="same tiles"):
        paired_difference([1.0], [1.0, 2.0])


def test_mean_interval_of_seeds():
    iv = mean_interval([0.70, 0.72, 0.74])
    assert iv.estimate == pytest.approx(0.72)
    # t(0.975, 2 d.f.) = 4.3027; sd 0.02; 0.02 * 4.3027 / sqrt(3) = 0.0497
    assert iv.low == pytest.approx(0.72 - 0.049683, abs=1e-6)
    assert iv.high == pytest.approx(0.72 + 0.049683, abs=1e-6)
    assert str(iv) == f"0.7200 [{iv.low:.4f}, {iv.high:.4f}]"
    assert mean_interval([0.5]).low == -np.inf


def test_seed_interval_excludes_zero_as_often_as_its_level_says():
    # No effect, 3 seeds: three differences of one sign (a quarter of repeats) must not be
    # enough; a bootstrap over 3 values excluded zero in ~28% of repeats.
    rng = np.random.default_rng(0)
    repeats = 2000
    hits = sum(mean_interval(rng.normal(0.0, 0.01, 3)).excludes_zero for _ in range(repeats))
    assert 0.03 < hits / repeats < 0.07


def test_unpaired_difference_of_independent_samples():
    rng = np.random.default_rng(3)
    a = rng.normal(0.8, 0.1, 400)
    b = rng.normal(0.7, 0.1, 300)
    ga, gb = np.repeat(np.arange(100), 4), np.repeat(np.arange(100, 200), 3)
    d = unpaired_difference(a, ga, b, gb)
    assert d.estimate == pytest.approx(a.mean() - b.mean())
    assert d.low < 0.1 < d.high and d.excludes_zero
    # wider than either side alone: both sides' uncertainty is carried
    width = d.high - d.low
    for side, g in ((a, ga), (b, gb)):
        iv = bootstrap_mean(side, g)
        assert width > iv.high - iv.low
    # equal distributions: an interval around zero
    same = unpaired_difference(a, ga, a[::-1].copy(), ga)
    assert same.low < 0 < same.high
    with pytest.raises(ValueError, match="no valid"):
        unpaired_difference([np.nan], None, [1.0], None)


def test_one_source_image_gives_no_interval():
    # every resample of one cluster is that cluster: the interval was [estimate, estimate], and
    # the ensemble's "gain interval above 0" rule took any gain as certain
    d = paired_difference([0.3, 0.9, 0.6, 0.8], [0.2, 0.9, 0.5, 0.7], ["s"] * 4)
    assert d.estimate == pytest.approx(0.075)
    assert (d.low, d.high) == (-np.inf, np.inf) and not d.excludes_zero
    m = bootstrap_mean([0.3, 0.9, 0.6], ["s"] * 3)
    assert (m.low, m.high) == (-np.inf, np.inf)
    assert np.isfinite(bootstrap_mean([0.3, 0.9, 0.6], ["s", "s", "t"]).low)


def test_no_interval_prints_why_in_words_and_stays_strict_json(tmp_path):
    # it printed as "0.6000 [-inf, inf]", and a report cell as "0.6000 [-inf, inf]" too
    m = bootstrap_mean([0.3, 0.9, 0.6], ["s"] * 3)
    assert not m.bounded and str(m) == "0.6000 [no interval: 1 source image]"
    d = paired_difference([0.3, 0.9], [0.2, 0.9], ["s", "s"])
    assert format_interval(d, signed=True) == "+0.0500 [no interval: 1 source image]"
    assert str(mean_interval([0.7])) == "0.7000 [no interval: 1 value]"
    # as the project writes it: strict JSON (null ends), read back with the same wording
    path = write_json(tmp_path / "iv.json", {"iv": m.to_dict()})

    def refuse(word):
        raise AssertionError(f"non-strict JSON: {word}")

    back = json.loads(path.read_text(), parse_constant=refuse)["iv"]
    assert (back["low"], back["high"]) == (None, None)
    assert format_interval(back, 0.61) == "0.6100 [no interval: 1 source image]"
    # every printing site of bldseg says the same
    from bldseg.report import _err, _iv

    assert _iv(m) == _iv(back) == "0.6000 [no interval: 1 source image]"
    assert _iv(d, signed=True) == "+0.0500 [no interval: 1 source image]"
    assert _err(m, 0.6) == (0.0, 0.0)  # no infinite error bar
    # a bounded interval prints as before
    two = bootstrap_mean([0.3, 0.9, 0.6], ["s", "s", "t"])
    assert two.bounded and str(two) == f"{two.estimate:.4f} [{two.low:.4f}, {two.high:.4f}]"


def test_source_images_without_a_scored_tile_are_no_clusters():
    # an image whose tiles are all NaN (empty/empty) counted as a second cluster: one scored
    # image then passed the two-cluster guard with a zero-width interval that "excluded zero"
    a, b = [0.3, 0.9, 0.6, 0.8, np.nan], [0.2, 0.9, 0.5, 0.7, np.nan]
    groups = ["s"] * 4 + ["t"]
    d = paired_difference(a, b, groups)
    assert d.clusters == 1 and (d.low, d.high) == (-np.inf, np.inf) and not d.excludes_zero
    m = bootstrap_mean(a, groups)
    assert m.clusters == 1 and (m.low, m.high) == (-np.inf, np.inf)
    u = unpaired_difference(a, groups, [0.1, 0.4, 0.7], ["u", "v", "w"])
    assert u.clusters == 1 and (u.low, u.high) == (-np.inf, np.inf)
    # an arm scored on one image only: its mean has no measured uncertainty, whatever the
    # other arm's images
    d = paired_difference([0.3, 0.9, np.nan, np.nan], [0.2, 0.8, 0.5, 0.1], ["s", "s", "t", "t"])
    assert d.clusters == 1 and not d.excludes_zero
    # all-NaN images change neither the estimate nor the interval of the scored ones
    rng = np.random.default_rng(4)
    x, y = rng.random(40), rng.random(40)
    g = np.repeat(np.arange(10), 4)
    padded = [np.concatenate([v, [np.nan] * 8]) for v in (x, y)]
    g_padded = np.concatenate([g, np.repeat([10, 11], 4)])
    assert paired_difference(*padded, g_padded) == paired_difference(x, y, g)
    assert bootstrap_mean(padded[0], g_padded) == bootstrap_mean(x, g)


def test_bounds_alone_say_why_there_is_no_interval():
    one = stats.mean_interval([0.5])
    assert stats.format_bounds(one) == "[no interval: 1 value]"
    two = stats.bootstrap_mean([0.2, 0.4, 0.6, 0.8], ["a", "a", "b", "b"])
    low, high = two.low, two.high
    assert stats.format_bounds(two, digits=2, sep=",") == f"[{low:.2f},{high:.2f}]"
    assert stats.format_interval(two.to_dict(), signed=True).startswith("+0.5000 [+")

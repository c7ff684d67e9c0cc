"""Tests for bldseg.metrics: the official score, the threshold machinery and CSV scoring."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bldseg.data.rle import rle_encode
from bldseg.metrics import (
    SMOOTH,
    best_level,
    best_threshold,
    binarise,
    competition_score,
    dice_at_levels,
    dice_from_counts,
    dice_per_image,
    level_counts,
    level_from_threshold,
    quantise,
    roc_curve,
    score_csv,
    score_csv_per_image,
    scores_from_counts,
    threshold_from_level,
    truth_masks,
    youden_threshold,
)


def _brute_nanmean(dice: np.ndarray) -> float:
    """The official mean as a user would write it, with the documented all-empty rule."""
    return 1.0 if np.isnan(dice).all() else float(np.nanmean(dice))


def _random_library(
    rng: np.random.Generator, n: int, hw: tuple[int, int], max_value: int, dtype: type
) -> tuple[np.ndarray, np.ndarray]:
    """Integer maps and truths with the awkward cases: empty truths, empty predictions."""
    values = rng.integers(0, max_value + 1, (n, *hw)).astype(dtype)
    truth = rng.random((n, *hw)) < rng.random((n, 1, 1))  # per-image building fraction
    truth[: n // 5] = False  # empty truths (some also get empty predictions below)
    values[n // 10 : n // 3] = 0  # no pixel above any level > 0
    values[n // 3 : n // 2] //= 4  # low maps: predictions that vanish at mid levels
    return values, truth


# --------------------------------------------------------------------------------------------
# Quantisation and the threshold <-> level mapping
# --------------------------------------------------------------------------------------------


def test_quantise_known_values() -> None:
    p = np.array([0.0, 1.0, 0.5, 0.25, 0.5 / 255, 1.5 / 255, 254.5 / 255, 0.3])
    np.testing.assert_array_equal(quantise(p), [0, 255, 128, 64, 1, 2, 255, 77])
    assert quantise(p).dtype == np.uint8


def test_quantise_rounds_half_up_exactly() -> None:
    # Values whose product with 255 sits at or one ulp around k + 0.5; floor(x + 0.5) gets
    # 0.49999999999999994 wrong (it rounds up to 1).
    halves = (np.arange(255) + 0.5) / 255
    p = np.concatenate(
        [halves, np.nextafter(halves, 0), np.nextafter(halves, 1), [np.nextafter(0.5 / 255, 0)]]
    )
    expected = [int((Fraction(float(x) * 255) + Fraction(1, 2)) // 1) for x in p]
    np.testing.assert_array_equal(quantise(p), expected)


def test_quantise_same_for_float32_and_float64() -> None:
    p32 = np.random.default_rng(0).random((3, 17, 5), dtype=np.float32)
    np.testing.assert_array_equal(quantise(p32), quantise(p32.astype(np.float64)))
    assert quantise(p32).shape == (3, 17, 5)


@pytest.mark.parametrize(
    ("probs", "error", "match"),
    [
        (np.array([0.5, np.nan]), ValueError, "NaN"),
        (np.array([-0.01, 0.5]), ValueError, r"\[0, 1\]"),
        (np.array([0.5, 1.0001]), ValueError, "sigmoid"),
        (np.array([1, 0], dtype=np.uint8), TypeError, "already quantised"),
        (np.array([True]), TypeError, "float probabilities"),
    ],
)
def test_quantise_rejects(probs: np.ndarray, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        quantise(probs)


def test_level_from_threshold_boundaries() -> None:
    assert np.ceil(99 / 765 * 765) == 100  # the float trap the mapping must avoid
    assert level_from_threshold(99 / 765, max_value=765) == 99
    assert level_from_threshold(np.nextafter(99 / 765, 1), max_value=765) == 100
    assert level_from_threshold(128 / 255) == 128
    assert level_from_threshold(0.5) == 128
    assert level_from_threshold(0.0) == 0
    assert level_from_threshold(-0.2) == 0
    assert level_from_threshold(1.0) == 255
    assert level_from_threshold(np.nextafter(1.0, 2)) == 256
    assert level_from_threshold(np.nextafter(128 / 255, 0)) == 128
    assert level_from_threshold(np.nextafter(128 / 255, 1)) == 129
    assert isinstance(level_from_threshold(0.5), int)


@pytest.mark.parametrize("max_value", [1, 7, 255, 510, 255 * 6, 255 * 27])
def test_levels_round_trip_and_match_float_comparison(max_value: int) -> None:
    levels = np.arange(max_value + 2)
    thresholds = threshold_from_level(levels, max_value)
    np.testing.assert_array_equal(level_from_threshold(thresholds, max_value), levels)
    # Against the rule itself: v >= L(t) iff v / M >= t in float64, for every value v and
    # thresholds at, just below and just above every level, plus random ones.
    # (A sample of ~600 levels for large M keeps the (T, M+1) comparison small.)
    rng = np.random.default_rng(max_value)
    some = thresholds[np.unique(rng.integers(0, max_value + 2, 600))]
    t = np.concatenate([some, np.nextafter(some, -1), np.nextafter(some, 2), rng.random(50)])
    v = np.arange(max_value + 1)
    by_float = (v[None, :] / max_value) >= t[:, None]  # (T, M+1)
    by_level = v[None, :] >= level_from_threshold(t, max_value)[:, None]
    np.testing.assert_array_equal(by_level, by_float)


def test_threshold_from_level_scalar_and_errors() -> None:
    assert threshold_from_level(51) == 51 / 255
    assert isinstance(threshold_from_level(51), float)
    with pytest.raises(ValueError, match=r"levels must be integers in 0\.\.256"):
        threshold_from_level(257)
    with pytest.raises(ValueError, match="levels must be integers"):
        threshold_from_level(-1)
    with pytest.raises(ValueError, match="levels must be integers"):
        threshold_from_level(np.array([0.5]))
    with pytest.raises(ValueError, match="max_value must be a positive integer"):
        threshold_from_level(1, max_value=0)
    with pytest.raises(ValueError, match="NaN"):
        level_from_threshold(float("nan"))
    with pytest.raises(ValueError, match="max_value"):
        level_from_threshold(0.5, max_value=2.5)  # type: ignore[arg-type]


def test_binarise_matches_the_rule() -> None:
    rng = np.random.default_rng(1)
    s = rng.integers(0, 3 * 255 + 1, (4, 8, 8)).astype(np.uint16)  # sum of 3 maps
    for t in [0.0, 0.5, 200 / 765, np.nextafter(200 / 765, 0), 1.0]:
        np.testing.assert_array_equal(binarise(s, t, max_value=765), s / 765 >= t)
    p = rng.random((2, 5, 5))
    np.testing.assert_array_equal(binarise(p, 0.5), quantise(p) >= 128)
    with pytest.raises(ValueError, match="need max_value"):
        binarise(s, 0.5)


# --------------------------------------------------------------------------------------------
# The official score
# --------------------------------------------------------------------------------------------


def test_dice_per_image_known_values() -> None:
    pred = np.zeros((4, 2, 3), dtype=np.uint8)
    truth = np.zeros((4, 2, 3), dtype=bool)
    pred[0, 0, :2] = 1  # |P| = 2
    truth[0, 0, 1:] = True  # |G| = 2, |P∩G| = 1
    pred[1, 1, 1] = 1  # false positive on an empty image
    truth[2, 0, 0] = True  # missed building
    # image 3: empty / empty
    dice = dice_per_image(pred, truth)
    assert dice[0] == (2 * 1 + SMOOTH) / (4 + SMOOTH)
    assert dice[1] < 1e-6
    assert dice[2] < 1e-6
    assert np.isnan(dice[3])
    assert competition_score(pred, truth) == pytest.approx((0.5 + dice[1] + dice[2]) / 3)


def test_competition_score_perfect_and_all_empty() -> None:
    truth = np.zeros((3, 4, 4), dtype=bool)
    truth[0, 1:3, 1:3] = True
    assert competition_score(truth, truth) == pytest.approx(1.0)
    empty = np.zeros((3, 4, 4), dtype=bool)
    assert competition_score(empty, empty) == 1.0  # documented: nothing to average
    assert competition_score(truth, empty) < 1e-6  # a false positive on an empty image


@pytest.mark.parametrize(
    ("pred", "truth", "error", "match"),
    [
        (np.zeros((2, 4, 4), bool), np.zeros((2, 4, 5), bool), ValueError, "shape"),
        (np.zeros((4, 4), bool), np.zeros((4, 4), bool), ValueError, r"mask\[None\]"),
        (np.zeros((0, 4, 4), bool), np.zeros((0, 4, 4), bool), ValueError, "no images"),
        (np.zeros((1, 4, 4)), np.zeros((1, 4, 4), bool), TypeError, "binarise"),
        (np.full((1, 4, 4), 2), np.zeros((1, 4, 4), bool), ValueError, "only 0 and 1"),
        (np.zeros((1, 4, 4), bool), np.full((1, 4, 4), -1), ValueError, "only 0 and 1"),
    ],
)
def test_dice_per_image_rejects(
    pred: np.ndarray, truth: np.ndarray, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        dice_per_image(pred, truth)


# --------------------------------------------------------------------------------------------
# Dice at every level
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("max_value", "dtype"), [(255, np.uint8), (3 * 255, np.uint16)])
def test_levels_equal_brute_force_exactly(max_value: int, dtype: type) -> None:
    rng = np.random.default_rng(max_value)
    values, truth = _random_library(rng, 300, (9, 7), max_value, dtype)
    counts = level_counts(values, truth, max_value=max_value)
    scores = scores_from_counts(counts.tp, counts.pp, counts.gt)
    per_image = dice_from_counts(counts.tp, counts.pp, counts.gt)
    assert scores.shape == (max_value + 1,)
    assert np.isnan(per_image).any()  # the fixture does exercise empty/empty images
    for level in range(max_value + 1):
        pred = values >= level
        dice = dice_per_image(pred, truth)
        np.testing.assert_array_equal(per_image[:, level], dice)
        # Bit-for-bit equal to the plain loop, not just close.
        assert scores[level] == _brute_nanmean(dice)
        assert scores[level] == competition_score(pred, truth)
        np.testing.assert_array_equal(counts.tp[:, level], (pred & truth).sum(axis=(1, 2)))
        np.testing.assert_array_equal(counts.pp[:, level], pred.sum(axis=(1, 2)))
    np.testing.assert_array_equal(counts.gt, truth.sum(axis=(1, 2)))
    np.testing.assert_array_equal(counts.thresholds, np.arange(max_value + 1) / max_value)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 6),
    st.integers(1, 6),
    st.integers(1, 6),
    st.integers(1, 12),
    st.integers(0, 2**32 - 1),
)
def test_levels_equal_brute_force_property(n: int, h: int, w: int, m: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    values = rng.integers(0, m + 1, (n, h, w)).astype(np.int32)
    truth = (rng.random((n, h, w)) < rng.random()).astype(np.uint8)
    scores = dice_at_levels(values, truth, max_value=m)
    expected = [_brute_nanmean(dice_per_image(values >= lv, truth)) for lv in range(m + 1)]
    np.testing.assert_array_equal(scores, expected)


def test_levels_beyond_one_chunk() -> None:
    # More pixels than one bincount chunk (2**20) so the chunk loop and offsets are exercised.
    rng = np.random.default_rng(3)
    values, truth = _random_library(rng, 70, (128, 128), 255, np.uint8)
    counts = level_counts(values, truth)
    for level in [0, 1, 100, 255]:
        pred = values >= level
        np.testing.assert_array_equal(counts.tp[:, level], (pred & truth).sum(axis=(1, 2)))
        np.testing.assert_array_equal(counts.pp[:, level], pred.sum(axis=(1, 2)))


def test_level_counts_of_floats_are_counts_of_quantised() -> None:
    rng = np.random.default_rng(4)
    probs = rng.random((5, 6, 6)).astype(np.float32)
    truth = rng.random((5, 6, 6)) < 0.4
    a, b = level_counts(probs, truth), level_counts(quantise(probs), truth)
    np.testing.assert_array_equal(a.tp, b.tp)
    np.testing.assert_array_equal(a.pp, b.pp)
    assert a.max_value == 255


@pytest.mark.parametrize(
    ("values", "max_value", "error", "match"),
    [
        (np.zeros((1, 2, 2), np.uint16), None, ValueError, "need max_value"),
        (np.full((1, 2, 2), 766, np.uint16), 765, ValueError, r"found 766\.\.766"),
        (np.full((1, 2, 2), 200, np.uint8), 100, ValueError, "0..max_value=100"),
        (np.full((1, 2, 2), -1, np.int16), 765, ValueError, "found -1"),
        (np.zeros((1, 2, 2)), 510, ValueError, "quantised to 0..255"),
        (np.zeros((1, 2, 2), bool), None, TypeError, "already binary"),
        (np.zeros((1, 2, 3), np.uint8), None, ValueError, "shape"),
        (np.zeros((1, 2, 2), np.uint8), 0, ValueError, "positive integer"),
    ],
)
def test_level_counts_rejects(
    values: np.ndarray, max_value: int | None, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        level_counts(values, np.zeros((1, 2, 2), bool), max_value=max_value)


def test_counts_functions_reject_bad_shapes() -> None:
    tp = np.zeros((3, 256), np.int64)
    with pytest.raises(ValueError, match="tp"):
        scores_from_counts(tp, np.zeros((3, 255), np.int64), np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="gt"):
        dice_from_counts(tp, tp, np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="no images"):
        scores_from_counts(tp[:0], tp[:0], np.zeros(0, np.int64))


def test_scores_from_counts_all_empty_level_is_one() -> None:
    tp = pp = np.zeros((2, 3), np.int64)
    np.testing.assert_array_equal(scores_from_counts(tp, pp, np.zeros(2, np.int64)), [1, 1, 1])


# --------------------------------------------------------------------------------------------
# Threshold selection
# --------------------------------------------------------------------------------------------


def test_best_level_range_and_ties() -> None:
    scores = np.zeros(256)
    scores[[70, 100, 120, 200]] = [0.9, 0.8, 0.8, 0.95]
    # 70/255 and 200/255 lie outside [0.3, 0.7]; the tie between 100 and 120 goes low.
    assert best_level(scores, 255, 0.3, 0.7) == (100, 0.8)
    assert best_level(scores, 255, 0.0, 1.0) == (200, 0.95)
    assert best_level(scores, 255, 120 / 255, 120 / 255) == (120, 0.8)  # bounds inclusive
    with pytest.raises(ValueError, match="widen the range"):
        best_level(scores, 255, 0.5001, 0.5019)  # strictly between 128/255 and 129/255
    with pytest.raises(ValueError, match="shape"):
        best_level(scores[:-1], 255)
    with pytest.raises(ValueError, match="NaN"):
        best_level(np.full(256, np.nan), 255)


@pytest.mark.parametrize(("max_value", "dtype"), [(255, np.uint8), (2 * 255, np.uint16)])
def test_best_threshold_equals_brute_force(max_value: int, dtype: type) -> None:
    rng = np.random.default_rng(5)
    values, truth = _random_library(rng, 30, (10, 10), max_value, dtype)
    threshold, score = best_threshold(values, truth, 0.3, 0.7, max_value=max_value)
    grid = [lv for lv in range(max_value + 1) if 0.3 <= lv / max_value <= 0.7]
    brute = [competition_score(values >= lv, truth) for lv in grid]
    i = int(np.argmax(brute))
    assert (threshold, score) == (grid[i] / max_value, brute[i])
    assert competition_score(binarise(values, threshold, max_value), truth) == score


def test_best_threshold_on_float_probabilities() -> None:
    rng = np.random.default_rng(6)
    truth = rng.random((8, 12, 12)) < 0.3
    # Building pixels around 0.62, background around 0.38: the best cut lies between.
    probs = np.where(truth, 0.62, 0.38) + rng.normal(0, 0.05, truth.shape)
    probs = np.clip(probs, 0, 1)
    threshold, score = best_threshold(probs, truth)
    assert 0.4 < threshold < 0.6
    assert score == competition_score(binarise(probs, threshold), truth)
    assert score > 0.9


def test_youden_threshold_equals_brute_force() -> None:
    rng = np.random.default_rng(7)
    values, truth = _random_library(rng, 20, (10, 10), 255, np.uint8)
    values[truth] = np.maximum(values[truth], 90)  # make the optimum non-trivial
    threshold, j = youden_threshold(values, truth)
    n_pos, n_neg = truth.sum(), (~truth).sum()
    brute = [
        ((values >= lv) & truth).sum() / n_pos - ((values >= lv) & ~truth).sum() / n_neg
        for lv in range(256)
    ]
    level = int(np.argmax(brute))
    assert threshold == level / 255
    assert j == pytest.approx(brute[level], abs=1e-15)
    # Restricting the range keeps the best level inside it.
    t_lo, _ = youden_threshold(values, truth, lo=0.5, hi=0.6)
    assert 0.5 <= t_lo <= 0.6


def test_roc_curve_matches_counts() -> None:
    rng = np.random.default_rng(8)
    values = rng.integers(0, 511, (6, 7, 7)).astype(np.uint16)
    truth = rng.random((6, 7, 7)) < 0.3
    fpr, tpr, thresholds = roc_curve(values, truth, max_value=510)
    assert fpr.shape == tpr.shape == thresholds.shape == (511,)
    assert fpr[0] == tpr[0] == 1.0
    for lv in [0, 17, 255, 510]:
        pred = values >= lv
        assert tpr[lv] == (pred & truth).sum() / truth.sum()
        assert fpr[lv] == (pred & ~truth).sum() / (~truth).sum()
    assert (np.diff(tpr) <= 0).all() and (np.diff(fpr) <= 0).all()
    np.testing.assert_array_equal(thresholds, np.arange(511) / 510)


def test_roc_and_youden_need_both_classes() -> None:
    values = np.zeros((1, 3, 3), np.uint8)
    with pytest.raises(ValueError, match="0 building"):
        youden_threshold(values, np.zeros((1, 3, 3), bool))
    with pytest.raises(ValueError, match="0 background"):
        roc_curve(values, np.ones((1, 3, 3), bool))


# --------------------------------------------------------------------------------------------
# CSV scoring
# --------------------------------------------------------------------------------------------


def _write(path: Path, rows: list[dict[str, object]]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture
def library() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(9)
    truth = rng.random((6, 5, 4)) < 0.3
    pred = rng.random((6, 5, 4)) < 0.3
    truth[0] = pred[0] = False  # empty / empty: left out
    truth[1] = False  # false positive on an empty image
    pred[2] = False  # missed buildings
    return pred, truth


def test_score_csv_equals_array_score(
    tmp_path: Path, library: tuple[np.ndarray, np.ndarray]
) -> None:
    pred, truth = library
    ids = [f"TEST_{i:05d}" for i in range(len(truth))]
    truth_csv = _write(
        tmp_path / "truth.csv",
        [
            {"img_id": i, "mask_rle": rle_encode(m), "height": 5, "width": 4}
            for i, m in zip(ids, truth, strict=True)
        ],
    )
    # Submission rows in another order: rows are matched by img_id, not position.
    order = [3, 0, 5, 1, 4, 2]
    sub_csv = _write(
        tmp_path / "sub.csv", [{"img_id": ids[k], "mask_rle": rle_encode(pred[k])} for k in order]
    )
    expected = competition_score(pred, truth)
    assert score_csv(truth_csv, sub_csv) == expected
    table = score_csv_per_image(truth_csv, sub_csv)
    assert table["img_id"].tolist() == ids
    np.testing.assert_array_equal(table["dice"], dice_per_image(pred, truth))
    np.testing.assert_array_equal(table["pred_pixels"], pred.sum(axis=(1, 2)))
    np.testing.assert_array_equal(table["truth_pixels"], truth.sum(axis=(1, 2)))
    np.testing.assert_array_equal(table["intersection"], (pred & truth).sum(axis=(1, 2)))

    # Without height/width columns the shape argument is needed.
    plain = _write(
        tmp_path / "plain.csv",
        [{"img_id": i, "mask_rle": rle_encode(m)} for i, m in zip(ids, truth, strict=True)],
    )
    assert score_csv(plain, sub_csv, shape=(5, 4)) == expected
    with pytest.raises(ValueError, match=r"pass shape=\(H, W\).*224x224"):
        score_csv(plain, sub_csv)
    with pytest.raises(ValueError, match="shape must be a pair"):
        score_csv(plain, sub_csv, shape=(5, 4, 1))  # type: ignore[arg-type]


def test_score_csv_all_empty(tmp_path: Path) -> None:
    rows = [{"img_id": "a", "mask_rle": "-1"}, {"img_id": "b", "mask_rle": "-1"}]
    truth_csv = _write(tmp_path / "t.csv", rows)
    assert score_csv(truth_csv, _write(tmp_path / "s.csv", rows), shape=(4, 4)) == 1.0


def _csvs(tmp_path: Path, truth: str, sub: str) -> tuple[Path, Path]:
    (tmp_path / "t.csv").write_text(truth)
    (tmp_path / "s.csv").write_text(sub)
    return tmp_path / "t.csv", tmp_path / "s.csv"


_TRUTH = "img_id,mask_rle\na,1 2\nb,-1\nc,3 1\n"


@pytest.mark.parametrize(
    ("truth", "sub", "match"),
    [
        (_TRUTH, "img_id,mask_rle\na,1 2\nb,-1\n", r"s\.csv has no row for 1 .*\['c'\]"),
        (_TRUTH, "img_id,mask_rle\na,-1\nb,-1\nc,-1\nd,-1\n", r"s\.csv has 1 img_id.*\['d'\]"),
        (_TRUTH, "img_id,mask_rle\na,-1\nb,-1\nb,-1\nc,-1\n", r"s\.csv.*duplicate.*'b'.*\[3, 4\]"),
        ("img_id,mask_rle\na,-1\na,-1\n", "img_id,mask_rle\na,-1\n", r"t\.csv.*duplicate"),
        (_TRUTH, "id,mask_rle\na,-1\n", r"s\.csv lacks column\(s\) \['img_id'\]"),
        ("img_id,rle\na,-1\n", "img_id,mask_rle\na,-1\n", r"t\.csv lacks.*'mask_rle'"),
        (_TRUTH, "img_id,mask_rle\na,1 2\nb,0 1\nc,-1\n", r"s\.csv line 3 \(img_id 'b'\).*start 0"),
        (_TRUTH, "img_id,mask_rle\na,-1\nb,\nc,-1\n", r"s\.csv line 3 \(img_id 'b'\).*'-1'"),
        (_TRUTH, "img_id,mask_rle\nc,99 1\nb,-1\na,-1\n", r"s\.csv line 2 \(img_id 'c'\).*past"),
        ("img_id,mask_rle\na,1 2 3\n", "img_id,mask_rle\na,-1\n", r"t\.csv line 2 .*'a'.*odd"),
        ("img_id,mask_rle,height\na,-1,4\n", "img_id,mask_rle\na,-1\n", "only one of the height"),
        (
            "img_id,mask_rle,height,width\na,-1,4,4\nb,-1,x,4\n",
            "img_id,mask_rle\na,-1\nb,-1\n",
            r"t\.csv line 3 \(img_id 'b'\): height 'x'",
        ),
        ("", "img_id,mask_rle\na,-1\n", r"t\.csv: cannot read as CSV"),
    ],
)
def test_score_csv_rejects(tmp_path: Path, truth: str, sub: str, match: str) -> None:
    truth_csv, sub_csv = _csvs(tmp_path, truth, sub)
    with pytest.raises(ValueError, match=match):
        score_csv(truth_csv, sub_csv, shape=(4, 4))


def test_truth_masks_read_ids_as_text_in_the_asked_order(tmp_path):
    # the competition's truth has no height/width; ids like 0007 and NA must stay themselves
    # (pandas read them as 7 and NaN, and the pipeline's stage 4 failed with a KeyError)
    a = np.zeros((4, 6), bool)
    a[1, 2:5] = True
    b = np.ones((4, 6), bool)
    path = tmp_path / "truth.csv"
    pd.DataFrame(
        {"img_id": ["0007", "NA", "x"], "mask_rle": [rle_encode(a), rle_encode(b), "-1"]}
    ).to_csv(path, index=False)
    got = truth_masks(path, ["NA", "0007"], shape=(4, 6))
    assert got.dtype == bool and got.shape == (2, 4, 6)
    assert (got[0] == b).all() and (got[1] == a).all()
    with pytest.raises(ValueError, match=r"no row for 1 image.*'7'"):
        truth_masks(path, ["7"], shape=(4, 6))
    with pytest.raises(ValueError, match="pass shape"):
        truth_masks(path, ["x"])


def test_a_printed_threshold_typed_back_is_the_same_level():
    # printed to nearest, 77/255 = 0.30196 was 0.3020: typed back (predict --threshold), the
    # next level, another mask, for 125 of the 256 levels
    from bldseg.metrics import level_from_threshold, threshold_from_level, threshold_text

    for level in range(256):
        shown = threshold_text(threshold_from_level(level))
        assert level_from_threshold(float(shown)) == level, (level, shown)
    assert threshold_text(77 / 255) == "0.3019" and threshold_text(0.5) == "0.5000"
    assert threshold_text(float("nan")) == "nan"

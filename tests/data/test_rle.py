"""Tests for bldseg.data.rle: the competition's run-length encoding."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bldseg.data.rle import EMPTY_RLE, rle_decode, rle_encode

# Masks of random shape (1xN and Nx1 included). hypothesis' array strategy often fills most of
# the array with one value and sets a few elements, so long runs, runs touching the first and
# last pixel, and constant masks all occur, not only salt-and-pepper noise.
_shapes = st.tuples(st.integers(1, 40), st.integers(1, 40))
_masks = _shapes.flatmap(lambda s: hnp.arrays(np.bool_, s))


def _loop_encode(mask: np.ndarray) -> str:
    """A plain-Python reference encoder, written independently of the vectorised one."""
    flat = mask.ravel().tolist()
    pairs: list[int] = []
    i = 0
    while i < len(flat):
        if flat[i]:
            j = i
            while j < len(flat) and flat[j]:
                j += 1
            pairs += [i + 1, j - i]
            i = j
        else:
            i += 1
    return " ".join(map(str, pairs)) if pairs else "-1"


@settings(max_examples=300, deadline=None)
@given(_masks)
def test_round_trip_random_masks(mask: np.ndarray) -> None:
    rle = rle_encode(mask)
    assert rle == _loop_encode(mask)
    decoded = rle_decode(rle, mask.shape)
    assert decoded.dtype == np.uint8
    assert decoded.shape == mask.shape
    np.testing.assert_array_equal(decoded, mask.astype(np.uint8))


@settings(max_examples=100, deadline=None)
@given(_shapes, st.sampled_from([0, 1]))
def test_round_trip_constant_masks(shape: tuple[int, int], value: int) -> None:
    mask = np.full(shape, value, dtype=np.uint8)
    rle = rle_encode(mask)
    if value == 0:
        assert rle == EMPTY_RLE
    else:
        assert rle == f"1 {shape[0] * shape[1]}"
    np.testing.assert_array_equal(rle_decode(rle, shape), mask)


@settings(max_examples=100, deadline=None)
@given(_shapes.flatmap(lambda s: hnp.arrays(np.float32, s, elements=st.sampled_from([0.0, 0.3]))))
def test_encode_treats_any_nonzero_as_building(mask: np.ndarray) -> None:
    np.testing.assert_array_equal(rle_decode(rle_encode(mask), mask.shape), mask != 0)


def test_known_example() -> None:
    # flat (row-major): 0 1 1 | 1 0 0 | 0 0 1 -> runs at 1-based 2 (len 3) and 9 (len 1).
    mask = np.array([[0, 1, 1], [1, 0, 0], [0, 0, 1]], dtype=np.uint8)
    assert rle_encode(mask) == "2 3 9 1"
    np.testing.assert_array_equal(rle_decode("2 3 9 1", (3, 3)), mask)


def test_row_major_not_column_major() -> None:
    mask = np.array([[1, 1], [0, 0]], dtype=bool)
    assert rle_encode(mask) == "1 2"  # column-major would give "1 1 3 1"
    assert rle_encode(mask.T) == "1 1 3 1"


def test_large_mask_round_trip() -> None:
    rng = np.random.default_rng(0)
    mask = rng.random((1024, 1024)) < 0.5  # ~262k runs
    np.testing.assert_array_equal(rle_decode(rle_encode(mask), mask.shape), mask)


def test_decode_tolerates_whitespace_and_touching_runs() -> None:
    expected = np.array([[1, 1, 1], [1, 0, 1]], dtype=np.uint8)
    np.testing.assert_array_equal(rle_decode(" 1\t2\n3  2 6 1 ", (2, 3)), expected)
    np.testing.assert_array_equal(rle_decode(" -1 ", (2, 3)), np.zeros((2, 3), np.uint8))


def test_decode_accepts_numpy_string() -> None:
    np.testing.assert_array_equal(rle_decode(np.str_("1 1"), (1, 2)), [[1, 0]])


def test_empty_mask_shape_zero() -> None:
    assert rle_encode(np.zeros((0, 5))) == EMPTY_RLE
    assert rle_decode(EMPTY_RLE, (0, 5)).shape == (0, 5)


@pytest.mark.parametrize(
    ("rle", "match"),
    [
        ("", "empty string.*'-1'"),
        ("   ", "empty string"),
        ("1", "odd number of tokens"),
        ("1 2 3", "odd number of tokens"),
        ("1 x", r"token 1 \('x', pair 0\) is not an integer"),
        ("1.0 2", r"token 0 \('1.0'.*not an integer"),
        ("1 2 3e1 1", r"token 2 \('3e1', pair 1\)"),
        ("1-2 3", "not an integer"),
        ("--1 2", "not an integer"),
        ("1 2 - 3", r"token 2 \('-'"),
        ("1\u00a02", "not an integer"),
        ("1 2 3\x1c4", "not an integer"),
        ("1 12345678901234567890", "absurdly large"),
        ("0 1", r"pair 0 \('0 1'\) has start 0 < 1"),
        ("1 1 -3 1", r"pair 1 \('-3 1'\) has start -3 < 1"),
        ("-1 2", "start -1 < 1"),
        ("1 0", r"pair 0 \('1 0'\) has length 0 < 1"),
        ("1 1 3 -2", r"pair 1 \('3 -2'\) has length -2 < 1"),
        ("4 1 1 1", r"pair 1 \('1 1'\) starts at or before pair 0"),
        ("2 1 2 1", "starts at or before"),
        ("1 3 2 1", r"pair 1 \('2 1'\) overlaps pair 0"),
        ("5 3", r"pair 0 \('5 3'\) ends at pixel 7, past the end of a 2x3 image"),
        ("1 1 6 2", "pair 1.*past the end"),
        ("7 1", "past the end"),
        ("1 123456789012345678", "past the end"),
    ],
)
def test_decode_rejects_malformed(rle: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        rle_decode(rle, (2, 3))


def test_decode_last_pixel_is_inside() -> None:
    np.testing.assert_array_equal(rle_decode("6 1", (2, 3)), [[0, 0, 0], [0, 0, 1]])
    np.testing.assert_array_equal(rle_decode("1 6", (2, 3)), np.ones((2, 3)))


def test_decode_rejects_nan_from_pandas() -> None:
    with pytest.raises(ValueError, match=r"NaN.*'-1'"):
        rle_decode(float("nan"), (2, 3))  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [5, None, b"1 1"])
def test_decode_rejects_non_strings(value: object) -> None:
    with pytest.raises(TypeError, match="must be a string"):
        rle_decode(value, (2, 3))  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", [(2,), (2, 3, 1), (-1, 3), (2.5, 3), "ab"])
def test_decode_rejects_bad_shape(shape: object) -> None:
    with pytest.raises(ValueError, match="shape must be a pair"):
        rle_decode("1 1", shape)  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", [(6,), (1, 2, 3)])
def test_encode_rejects_non_2d(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="2-D"):
        rle_encode(np.ones(shape))


def test_encode_rejects_nan() -> None:
    with pytest.raises(ValueError, match="NaN"):
        rle_encode(np.array([[0.0, np.nan]]))

import itertools
from math import comb

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bldseg.ensemble.combinatorics import check_k, chunk_ranges, rank, unrank


@pytest.mark.parametrize(("n", "k"), [(1, 1), (5, 1), (5, 5), (7, 3), (9, 4)])
def test_rank_unrank_enumerate_lexicographic_order(n, k):
    for r, combo in enumerate(itertools.combinations(range(n), k)):
        assert unrank(r, n, k) == combo
        assert rank(combo, n) == r


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 40).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n))), st.data())
def test_unrank_round_trip_large(nk, data):
    n, k = nk
    r = data.draw(st.integers(0, comb(n, k) - 1))
    combo = unrank(r, n, k)
    assert list(combo) == sorted(set(combo)) and len(combo) == k
    assert rank(combo, n) == r


def test_c27_6_boundaries():
    assert unrank(0, 27, 6) == (0, 1, 2, 3, 4, 5)
    assert unrank(comb(27, 6) - 1, 27, 6) == (21, 22, 23, 24, 25, 26)
    with pytest.raises(ValueError, match="outside"):
        unrank(comb(27, 6), 27, 6)


@pytest.mark.parametrize(("total", "n"), [(0, 3), (1, 4), (10, 3), (296010, 64), (7, 7), (7, 100)])
def test_chunk_ranges_cover_every_rank_once(total, n):
    ranges = chunk_ranges(total, n)
    assert len(ranges) == min(total, n)
    covered = [r for a, b in ranges for r in range(a, b)] if total < 1000 else None
    if covered is not None:
        assert covered == list(range(total))
    assert all(b > a for a, b in ranges)
    assert all(a2 == b1 for (_, b1), (a2, _) in itertools.pairwise(ranges))
    if ranges:
        assert ranges[0][0] == 0 and ranges[-1][1] == total
        sizes = [b - a for a, b in ranges]
        assert max(sizes) - min(sizes) <= 1


def test_bad_k_messages():
    with pytest.raises(ValueError, match="larger than the library, which holds 5"):
        check_k(6, 5)
    with pytest.raises(ValueError, match="at least 1"):
        check_k(0, 5)
    with pytest.raises(ValueError, match="integer"):
        check_k(2.5, 5)
    with pytest.raises(ValueError, match="strictly increasing"):
        rank((2, 1), 5)

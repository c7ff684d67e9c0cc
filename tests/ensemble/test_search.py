"""Exact agreement of the fast search with brute force built on bldseg.metrics."""

import itertools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from bldseg.ensemble import kernels
from bldseg.ensemble.combinatorics import n_combinations, unrank
from bldseg.ensemble.library import ModelLibrary
from bldseg.ensemble.prune import level_window, prune
from bldseg.ensemble.search import brute_force, exhaustive_search, greedy_search, score_members
from bldseg.ensemble.synthetic import fake_library

METHODS = ["native", "numpy"]


@pytest.fixture(scope="module", autouse=True)
def _native():
    if not kernels.native_available():
        pytest.skip("the native ensemble kernel cannot be built here")


def _pruned(lib, k, lo=0.3, hi=0.7):
    first, last = level_window(k, lo, hi)
    return prune(lib.probs, lib.truth, k, first, last)


def _all(lib, k, lo, hi, method, block=kernels.DEFAULT_BLOCK):
    """Every combination's (level, score) by the fast path, in rank order."""
    pl = _pruned(lib, k, lo, hi)
    total = n_combinations(lib.n_models, k)
    off, lev, sc = kernels.search_chunk(
        pl, unrank(0, lib.n_models, k), total, total, method, block=block
    )
    out = [None] * total
    for o, lv, s in zip(off, lev, sc, strict=True):
        out[o] = (int(lv), float(s))
    return out


def _brute(lib, k, lo, hi):
    return [
        score_members(lib.probs, lib.truth, c, lo, hi)[1:]
        for c in itertools.combinations(range(lib.n_models), k)
    ]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    ("n", "tiles", "size", "k", "lo", "hi", "seed"),
    [
        (5, 12, 16, 1, 0.3, 0.7, 0),
        (6, 20, 24, 3, 0.3, 0.7, 1),
        (7, 9, 20, 4, 0.42, 0.70, 2),
        (6, 130, 8, 2, 0.0, 1.0, 3),  # > 128 tiles: numpy's pairwise summation splits
        (5, 16, 16, 5, 0.4, 0.4, 4),  # one level (510 / 1275)
    ],
)
def test_every_combination_equals_brute_force(method, n, tiles, size, k, lo, hi, seed):
    lib = fake_library(n, tiles, size, seed=seed)
    assert _all(lib, k, lo, hi, method) == _brute(lib, k, lo, hi)  # bit-identical floats


def _ranked(brute, floor=-np.inf, start=0):
    """(offset, level, score) of brute-force results scoring >= floor, best first."""
    rows = [(r - start, lv, s) for r, (lv, s) in enumerate(brute) if r >= start and s >= floor]
    return sorted(rows, key=lambda t: (-t[2], t[0]))


def _rows(result):
    off, lev, sc = result
    return [(int(o), int(lv), float(s)) for o, lv, s in zip(off, lev, sc, strict=True)]


@pytest.mark.parametrize("block", [1, 2, 3, 7, 1000])
@pytest.mark.parametrize("k", [2, 4])
def test_block_size_never_changes_the_result(block, k):
    # Small blocks make the kept bins of one combination miss the blocks the next one wants
    # (the kernel passes over the pixels again); one block covering the window never does.
    lib = fake_library(7, 24, 24, seed=11)
    brute = _brute(lib, k, 0.3, 0.7)
    assert _all(lib, k, 0.3, 0.7, "native", block) == brute
    pl = _pruned(lib, k)
    total = n_combinations(lib.n_models, k)
    top = kernels.search_chunk(pl, unrank(0, lib.n_models, k), total, 5, block=block)
    assert _rows(top) == _ranked(brute)[:5]  # a full heap lets the kernel skip combinations


@pytest.mark.parametrize("method", METHODS)
def test_floor_keeps_exactly_the_combinations_scoring_at_least_it(method):
    lib = fake_library(7, 16, 24, seed=12)
    k, n = 3, lib.n_models
    brute = _brute(lib, k, 0.3, 0.7)
    pl = _pruned(lib, k)
    scores = sorted(s for _, s in brute)
    total = len(brute)
    # a score that occurs (ties with the floor are kept), the best, above the best, nothing
    for floor in (scores[total // 2], scores[-1], np.nextafter(scores[-1], 2.0), -np.inf):
        got = kernels.search_chunk(pl, unrank(0, n, k), total, total, method, floor)
        assert _rows(got) == _ranked(brute, floor)
    # a chunk from the middle of the rank space, a small top-m and a floor together
    start, count, floor = 11, 17, scores[total // 3]
    got = kernels.search_chunk(pl, unrank(start, n, k), count, 4, method, floor)
    want = [t for t in _ranked(brute, floor, start) if t[0] < count][:4]
    assert _rows(got) == want


def test_scalar_paths_without_avx2():
    # The kernel picks its AVX2 paths at run time; force the scalar ones in a fresh process
    # (the switch is read once) and check them against brute force, with and without a heap.
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
        import itertools
        from bldseg.ensemble import kernels
        from bldseg.ensemble.combinatorics import n_combinations, unrank
        from bldseg.ensemble.prune import level_window, prune
        from bldseg.ensemble.search import score_members
        from bldseg.ensemble.synthetic import fake_library
        for n, tiles, size, k, block in ((6, 20, 24, 3, 2), (7, 24, 24, 4, 16)):
            lib = fake_library(n, tiles, size, seed=n)
            first, last = level_window(k, 0.3, 0.7)
            pl = prune(lib.probs, lib.truth, k, first, last)
            brute = [score_members(lib.probs, lib.truth, c, 0.3, 0.7)[1:]
                     for c in itertools.combinations(range(n), k)]
            total = n_combinations(n, k)
            for top in (total, 5):
                off, lev, sc = kernels.search_chunk(pl, unrank(0, n, k), total, top, block=block)
                want = sorted(((r, lv, s) for r, (lv, s) in enumerate(brute)),
                              key=lambda t: (-t[2], t[0]))[:top]
                got = [(int(o), int(lv), float(s)) for o, lv, s in zip(off, lev, sc)]
                assert got == want, (n, k, block, top)
        print("ok")
        """
    )
    env = dict(os.environ, BLDSEG_CPU_NO_AVX2="1")
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_kernel_rejects_bad_block_and_floor():
    pl = _pruned(fake_library(4, 4, 8), 2)
    with pytest.raises(ValueError, match="block must be at least 1"):
        kernels.search_chunk(pl, (0, 1), 2, 2, block=0)
    with pytest.raises(ValueError, match="floor must be a number"):
        kernels.search_chunk(pl, (0, 1), 2, 2, floor=float("nan"))


def _handmade(n=4, tiles=6, size=6, seed=0):
    rng = np.random.default_rng(seed)
    probs = rng.choice(
        np.array([0, 1, 60, 127, 128, 200, 254, 255], np.uint8), (n, tiles, size, size)
    )
    truth = rng.random((tiles, size, size)) < 0.4
    truth[0] = False  # empty tile that some models predict on
    truth[1] = False
    probs[:, 1] = 0  # empty tile predicted empty by every model: left out of the mean
    probs[:, 2] = 0  # a building nobody finds
    ids = np.array([f"t{i}" for i in range(tiles)])
    return ModelLibrary(
        [f"m{i}" for i in range(n)], [], [], probs, truth, ids, np.array(["a", "b"] * (tiles // 2))
    )


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_empty_tiles_and_exact_level_boundaries(method, k):
    lib = _handmade()
    assert _all(lib, k, 0.3, 0.7, method) == _brute(lib, k, 0.3, 0.7)


@pytest.mark.parametrize("method", METHODS)
def test_all_empty_predictions_and_truth_score_one(method):
    lib = _handmade()
    lib.probs[:] = 0
    lib.truth[:] = False
    assert _all(lib, 2, 0.3, 0.7, method) == _brute(lib, 2, 0.3, 0.7)
    assert _all(lib, 2, 0.3, 0.7, method)[0][1] == 1.0


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_chunks_and_top_m_merge_like_brute_force(chunk):
    lib = fake_library(7, 10, 16, seed=5)
    got, per_k = exhaustive_search(lib, [2, 3], top=9, chunk_size=chunk, progress=False)
    want = brute_force(lib, [2, 3])
    assert got == want[:9]
    assert per_k[2] == next(e for e in want if e.k == 2)
    assert per_k[3] == next(e for e in want if e.k == 3)


def test_ties_keep_lexicographic_order():
    lib = fake_library(5, 6, 8, seed=0)
    lib.probs[:] = lib.probs[0]  # every model identical: every combination ties
    got, _ = exhaustive_search(lib, 2, top=10, progress=False)
    assert [e.rank for e in got] == list(range(10))
    assert got == brute_force(lib, 2)


def test_pruning_keeps_few_pixels_on_confident_maps():
    lib = fake_library(8, 16, 64, seed=0)
    first, last = level_window(4, 0.3, 0.7)
    pl = prune(lib.probs, lib.truth, 4, first, last)
    assert 0 < pl.kept_fraction < 0.3
    assert pl.img_start[-1] == pl.vals.shape[1]
    assert (pl.gt == lib.truth.reshape(16, -1).sum(1)).all()


def test_bad_k_and_window():
    lib = fake_library(4, 4, 8)
    with pytest.raises(ValueError, match="larger than the library"):
        exhaustive_search(lib, 5, progress=False)
    with pytest.raises(ValueError, match="no threshold level"):
        exhaustive_search(lib, 1, lo=0.5, hi=0.501, progress=False)


def test_greedy_with_replacement_matches_manual_steps():
    lib = fake_library(5, 12, 16, seed=2)
    best, hist = greedy_search(lib, 4, progress=False)
    assert [e.k for e in hist] == [1, 2, 3, 4]
    # step 1 is the best single model; each step adds the best model, repeats allowed
    singles = [score_members(lib.probs, lib.truth, [m], 0.3, 0.7)[2] for m in range(5)]
    assert hist[0].members == (int(np.argmax(singles)),)
    for prev, nxt in itertools.pairwise(hist):
        cands = [
            score_members(lib.probs, lib.truth, sorted([*prev.members, m]), 0.3, 0.7)[2]
            for m in range(5)
        ]
        assert nxt.score == max(cands)
    assert best.score == max(e.score for e in hist)
    _best2, hist2 = greedy_search(lib, 4, init=2, progress=False)
    assert hist2[0].k == 2 and len(hist2) == 3


def test_ray_tasks_equal_in_process(ray_session):
    lib = fake_library(7, 10, 16, seed=9)
    local, _ = exhaustive_search(lib, 3, top=5, progress=False)
    remote, _ = exhaustive_search(lib, 3, top=5, workers=2, chunk_size=4, progress=False)
    assert remote == local == brute_force(lib, 3)[:5]


@pytest.mark.parametrize("method", METHODS)
def test_one_model_library_with_k1(method):
    # A one-model library once reached the native kernel with a negative row stride (the
    # suffix min/max of a single row), which torch.from_numpy refuses.
    lib = fake_library(1, 8, 16, seed=0)
    pl = _pruned(lib, 1)
    for a in (pl.suf_min, pl.suf_max):
        assert all(s >= 0 for s in a.strides) and a.flags.c_contiguous
    np.testing.assert_array_equal(pl.suf_min, pl.vals)
    got, per_k = exhaustive_search(lib, 1, method=method, progress=False)
    assert got == brute_force(lib, 1) and per_k[1] == got[0]


def test_suffix_min_max_over_models():
    lib = fake_library(4, 6, 8, seed=1)
    pl = _pruned(lib, 2)
    for m in range(4):
        np.testing.assert_array_equal(pl.suf_min[m], pl.vals[m:].min(axis=0))
        np.testing.assert_array_equal(pl.suf_max[m], pl.vals[m:].max(axis=0))

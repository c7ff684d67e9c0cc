"""The vote, weighted and empty-tile rules against plain loops over bldseg.metrics."""

import itertools
import math

import numpy as np
import pytest

from bldseg import metrics
from bldseg.ensemble import kernels
from bldseg.ensemble import rules as R
from bldseg.ensemble.search import brute_force, exhaustive_search
from bldseg.ensemble.synthetic import fake_library
from bldseg.predict import EnsembleSpec, combine_members

METHODS = ["native", "numpy"]


@pytest.fixture(scope="module", autouse=True)
def _native():
    if not kernels.native_available():
        pytest.skip("the native ensemble kernel cannot be built here")


def _lib(seed=2, n=6, tiles=24, size=16):
    # Many empty tiles and loosely correlated errors: every rule has something to gain.
    return fake_library(n, tiles, size, seed=seed, empty_fraction=0.5, noise=3.5, rho=0.2)


def _masks(lib, levels, members):
    """(k, T, S, S) bool: each member's own mask."""
    return np.stack([lib.probs[m] >= levels[m] for m in members])


def test_member_levels_are_each_models_best_level():
    lib = _lib()
    levels = R.member_levels(lib)
    for m in range(lib.n_models):
        first, last = metrics.level_range(255, 0.3, 0.7)
        plain = [metrics.competition_score(lib.probs[m] >= v, lib.truth) for v in range(256)]
        best = first + int(np.argmax(plain[first : last + 1]))
        if metrics.on_range_edge(best, 255, 0.3, 0.7):  # widened as in training
            w_first, w_last = metrics.level_range(255, *metrics.WIDE_RANGE)
            wide = w_first + int(np.argmax(plain[w_first : w_last + 1]))
            best = wide if plain[wide] > plain[best] else best
        assert levels[m] == best


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("seed", "ks"), [(0, [2, 3]), (1, [1, 4]), (3, [3, 5])])
def test_vote_search_equals_a_plain_loop_over_every_combination_and_count(method, seed, ks):
    lib = _lib(seed)
    levels = R.member_levels(lib)
    want = []
    for k in ks:
        for rank, combo in enumerate(itertools.combinations(range(lib.n_models), k)):
            votes = _masks(lib, levels, combo).sum(axis=0)  # (T, S, S)
            scores = [metrics.competition_score(votes >= v, lib.truth) for v in range(1, k + 1)]
            v = int(np.argmax(scores))  # first maximum: the fewest votes win ties
            want.append(R.RuleEnsemble("vote", combo, (1,) * k, v + 1, scores[v], rank))
    want = sorted(want, key=lambda e: (-e.score, e.k, e.rank))
    got, per_k = R.vote_search(lib, levels, ks, top=len(want), method=method, progress=False)
    assert got == want  # members, votes, rank and bit-identical scores
    for k in ks:
        assert per_k[k] == next(e for e in want if e.k == k)
    assert len({e.cut for e in got}) > 1  # more than one vote count wins somewhere


def test_vote_scores_reference_agrees_with_thresholded_votes():
    lib = _lib(4)
    levels = R.member_levels(lib)
    combo = (0, 2, 5)
    votes = _masks(lib, levels, combo).sum(axis=0)
    want = [metrics.competition_score(votes >= v, lib.truth) for v in range(4)]
    assert R.vote_scores(lib, levels, combo).tolist() == want


def test_weighted_search_is_exact_and_a_local_optimum():
    lib = _lib(2)
    top, _ = exhaustive_search(lib, [2, 3], top=3, progress=False)
    got = R.weighted_search(lib, top, max_weight=3)
    assert [e.members for e in got] == sorted(
        [e.members for e in top], key=lambda m: -next(g.score for g in got if g.members == m)
    )
    assert any(set(e.weights) != {1} for e in got)  # weights help on this library
    for e in got:
        start = next(t for t in top if t.members == e.members)
        assert e.score >= start.score and e.rule == "weighted"
        # the level and score of the float weighted mean, computed the plain way
        assert R.brute_force_weighted(lib, e.members, e.weights, 0.3, 0.7) == (e.cut, e.score)
        # no single weight change (without a common factor) scores strictly higher
        for i, v in itertools.product(range(e.k), range(1, 4)):
            trial = [*e.weights[:i], v, *e.weights[i + 1 :]]
            if math.gcd(*trial) == 1:
                assert R.brute_force_weighted(lib, e.members, trial, 0.3, 0.7)[1] <= e.score


@pytest.mark.parametrize("rule", R.RULES)
def test_empty_search_equals_a_plain_loop(rule):
    lib = _lib(3)
    levels = R.member_levels(lib)
    top, _ = exhaustive_search(lib, 3, top=2, progress=False)
    if rule == "mean":
        cands = [R.from_mean(e) for e in top]
    elif rule == "vote":
        cands = R.vote_search(lib, levels, 3, top=2, progress=False)[0]
    else:
        cands = R.weighted_search(lib, top)
    areas = (1, 8, 16, 32, 64)
    for e in cands:
        got = R.empty_search(lib, e, levels, areas)
        ref = R.brute_force_empty(lib, e, levels, areas)
        assert (got.cut, got.score, got.empty_votes, got.empty_area) == (
            ref.cut,
            ref.score,
            ref.empty_votes,
            ref.empty_area,
        )
        assert got.score >= e.score
    assert R.empty_search(lib, cands[0], levels, areas).empty_votes > 0  # the rule helps here


def test_predict_library_reproduces_every_rules_score_bit_for_bit():
    lib = _lib(2)
    levels = R.member_levels(lib)
    top, _ = exhaustive_search(lib, [2, 3], top=3, progress=False)
    cands = [
        R.from_mean(top[0]),
        R.vote_search(lib, levels, [2, 3], top=1, progress=False)[0][0],
        R.weighted_search(lib, top)[0],
    ]
    cands += [R.empty_search(lib, e, levels) for e in cands]
    assert sum(e.empty_votes > 0 for e in cands) == 3
    for e in cands:
        pred = R.predict_library(lib, e, levels)
        assert metrics.competition_score(pred, lib.truth) == e.score, e


def test_one_model_library_with_every_rule():
    lib = _lib(1, n=1)
    levels = R.member_levels(lib)
    top, _ = exhaustive_search(lib, 1, progress=False)
    assert top == brute_force(lib, 1)
    vote = R.vote_search(lib, levels, 1, progress=False)[0][0]
    # one member voting: its own mask at its own level, which is the best single level
    assert vote.cut == 1 and vote.score == top[0].score
    (weighted,) = R.weighted_search(lib, top)
    assert weighted.weights == (1,) and weighted.score == top[0].score
    for e in (R.from_mean(top[0]), vote, weighted):
        f = R.empty_search(lib, e, levels)
        assert metrics.competition_score(R.predict_library(lib, f, levels), lib.truth) == f.score


def test_combine_members_vote_and_empty_tile_rule_by_hand():
    # 2 images of 2x2; member 0 at level 100, member 1 at level 200
    a = np.array([[[255, 150], [0, 0]], [[0, 0], [0, 120]]], np.uint8)
    b = np.array([[[255, 100], [250, 0]], [[0, 0], [0, 0]]], np.uint8)
    spec = EnsembleSpec(["a", "b"], rule="vote", member_thresholds=[100 / 255, 200 / 255])
    spec.votes = 1
    union = [[[1, 1], [1, 0]], [[0, 0], [0, 1]]]
    assert combine_members([a, b], spec).astype(int).tolist() == union
    spec.votes = 2
    both = [[[1, 0], [0, 0]], [[0, 0], [0, 0]]]
    assert combine_members([a, b], spec).astype(int).tolist() == both
    # image 1: member 0 has 1 px, member 1 none; "2 members below 2 px" empties it
    spec.votes, spec.empty_votes, spec.empty_area = 1, 2, 2
    emptied = [[[1, 1], [1, 0]], [[0, 0], [0, 0]]]
    assert combine_members([a, b], spec).astype(int).tolist() == emptied
    spec.empty_area = 1  # only member 1 predicts nothing: 1 of 2, the image stays
    assert combine_members([a, b], spec).astype(int).tolist() == union
    with pytest.raises(ValueError, match=r"votes must lie in 1\.\.2"):
        combine_members([a, b], EnsembleSpec(["a", "b"], rule="vote", member_thresholds=[0, 0]))
    with pytest.raises(ValueError, match="needs one member threshold per member"):
        combine_members([a, b], EnsembleSpec(["a", "b"], empty_votes=1, empty_area=4))


@pytest.mark.parametrize("weights", [[1.0, 2.0, 3.0], [300.0, 57.0, 1.0], [0.5, 1.5, 2.25]])
def test_combine_members_sums_in_place_as_a_float64_reference(weights):
    # The running sum is kept in uint16 while 255 * sum(w) fits (here 1,530), in uint32 above
    # (91,290: uint16 would wrap), in float64 for fractional weights: each decides as the
    # exact float64 weighted mean does, and the maps are not changed.
    rng = np.random.default_rng(0)
    maps = [rng.integers(0, 256, (3, 8, 8), dtype=np.uint8) for _ in weights]
    kept = [m.copy() for m in maps]
    spec = EnsembleSpec(["a", "b", "c"], weights, threshold=0.55, rule="weighted")
    mean = sum(w * m.astype(np.float64) for w, m in zip(weights, maps, strict=True))
    mean /= 255 * sum(weights)
    pred = combine_members(iter(maps), spec)
    tie = np.isclose(mean, 0.55, atol=1e-9)  # the integer level decides exact ties
    np.testing.assert_array_equal(pred[~tie], (mean >= 0.55)[~tie])
    assert 0.2 < pred.mean() < 0.8
    assert all(np.array_equal(m, k) for m, k in zip(maps, kept, strict=True))
    with pytest.raises(ValueError, match=r"member 1's map is \(3, 8, 4\), the first"):
        combine_members([maps[0], maps[1][..., :4], maps[2]], spec)


def test_combine_members_whole_weights_use_the_integer_level():
    # q = 100 and 101 with weights 1 and 2: weighted sum 302 of 765; t = 302/765 exactly
    a = np.full((1, 1, 1), 100, np.uint8)
    b = np.full((1, 1, 1), 101, np.uint8)
    at = EnsembleSpec(["a", "b"], [1.0, 2.0], threshold=302 / 765, rule="weighted")
    assert combine_members([a, b], at).all()
    above = EnsembleSpec(["a", "b"], [1.0, 2.0], threshold=303 / 765, rule="weighted")
    assert not combine_members([a, b], above).any()

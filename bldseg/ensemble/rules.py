"""Exact ensemble rules beyond the mean: vote of masks, weighted mean, empty-tile rule.

Every rule is scored with the competition metric (``bldseg.metrics``) on integer counts, and
:func:`predict_library` applies a chosen rule through ``bldseg.predict.combine_members``, the
function ``bldseg predict --ensemble`` uses, so a spec reproduces its searched score bit for
bit.

Member levels
    The vote and empty-tile rules look at each member's own binary mask ``q_i >= L_i``. ``L_i``
    is the member's best level in ``[lo, hi]`` on the tiles the ensemble is chosen on (the
    selection half), widened like a training run's threshold (``metrics.choose_level``).
    Training also picks a threshold per run, but on the whole validation set, check half
    included; choosing it again here keeps the check half unseen (:func:`member_levels`).

Vote (``"vote"``)
    A pixel is positive where at least ``v`` of the ``k`` members' masks are. With ``b_i =
    255 [q_i >= L_i]`` the sum ``sum(b_i) >= L`` holds iff the vote count is at least
    ``ceil(L / 255)``, so the exhaustive k-of-N kernel run on the masks (as 0/255 maps) over
    every level ``1..255k`` scores every combination at every ``v`` in ``1..k`` exactly; its
    lowest best level ``255 (v - 1) + 1`` names the lowest best ``v`` (:func:`vote_search`).

Weighted mean (``"weighted"``)
    Whole weights ``w_i`` in ``1..max_weight``: ``sum(w_i q_i)`` is the sum of a multiset of
    maps (member ``i`` taken ``w_i`` times), thresholded at every level of ``[lo, hi]`` on the
    ``0..255 W`` scale, like a greedy ensemble with repetition. A coordinate pass, from each of
    the best exhaustive ensembles, tries every weight of one member at a time and keeps a
    change only when it scores strictly higher, until a pass changes nothing
    (:func:`weighted_search`).

Empty-tile rule (with any rule)
    A tile is predicted empty when at least ``m`` of the ``k`` members' own masks hold fewer
    than ``a`` pixels. ``m`` in ``1..k`` and ``a`` from a small grid are searched jointly with
    the rule's cut (level or votes) on per-tile counts: an emptied tile has no predicted pixel
    at any cut (:func:`empty_search`). It replaces the rule without it only when it scores
    strictly higher.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from bldseg import metrics
from bldseg.ensemble.library import ModelLibrary
from bldseg.ensemble.search import Ensemble, exhaustive_search, score_members
from bldseg.predict import EnsembleSpec, combine_members

__all__ = [
    "DEFAULT_EMPTY_AREAS",
    "RULES",
    "RuleEnsemble",
    "brute_force_empty",
    "brute_force_weighted",
    "empty_search",
    "from_mean",
    "member_levels",
    "own_masks",
    "predict_library",
    "rule_counts",
    "vote_scores",
    "vote_search",
    "weighted_search",
]

RULES = ("mean", "vote", "weighted")
"""The rules the search knows, simplest first (ties between rules go to the earlier one)."""

DEFAULT_EMPTY_AREAS = (1, 8, 16, 32, 64)
"""Grid of ``a`` (pixels) for the empty-tile rule; ``a = 1``: the member predicts nothing."""

# Lowest threshold of the vote search: level 1 on the 0..255k scale of every k, so the window
# 1..255k holds every vote count 1..k (level 0 would make every pixel positive).
_VOTE_LO = 1e-9


@dataclass(frozen=True)
class RuleEnsemble:
    """One scored ensemble under one rule (see the module docstring)."""

    rule: str  # "mean" | "vote" | "weighted"
    members: tuple[int, ...]  # model indices, sorted, distinct
    weights: tuple[int, ...]  # (k,) whole weights; all 1 except under the weighted rule
    cut: int  # mean/weighted: level on the 0..255 W scale; vote: votes in 1..k
    score: float  # official mean Dice on the tiles it was chosen on
    rank: int = -1  # lexicographic rank among C(N, k); -1 when not from the exhaustive list
    empty_votes: int = 0  # empty-tile rule: at least this many nearly empty masks; 0: off
    empty_area: int = 0  # empty-tile rule: a mask with fewer pixels is nearly empty

    @property
    def k(self) -> int:
        return len(self.members)

    @property
    def max_value(self) -> int:
        """The largest value the cut is compared with: ``255 W``, or ``k`` for votes."""
        return self.k if self.rule == "vote" else metrics.QUANT_MAX * sum(self.weights)

    @property
    def threshold(self) -> float:
        """The float threshold of the cut (``level / 255W``; ``votes / k`` for votes)."""
        return self.cut / self.max_value

    def spec(
        self, checkpoints: Sequence[str | os.PathLike], levels: np.ndarray | None
    ) -> EnsembleSpec:
        """The ensemble spec applying this rule (what ``bldseg predict --ensemble`` reads).

        Args:
            checkpoints: (N,) every library model's checkpoint; the members' are taken.
            levels: (N,) every model's own mask level (:func:`member_levels`); needed by the
                vote and empty-tile rules.
        """
        own = self.rule == "vote" or self.empty_votes > 0
        if own and levels is None:
            raise ValueError(f"the {self.rule!r} rule needs the members' own levels")
        return EnsembleSpec(
            checkpoints=[str(checkpoints[m]) for m in self.members],
            weights=[float(w) for w in self.weights],
            threshold=self.threshold if self.rule != "vote" else 0.5,
            rule=self.rule,
            member_thresholds=(
                [int(levels[m]) / metrics.QUANT_MAX for m in self.members] if own else []
            ),
            votes=self.cut if self.rule == "vote" else 0,
            empty_votes=self.empty_votes,
            empty_area=self.empty_area,
        )


def from_mean(e: Ensemble) -> RuleEnsemble:
    """An exhaustive mean-rule ensemble (distinct members) as a :class:`RuleEnsemble`."""
    if len(set(e.members)) != e.k:
        raise ValueError(f"members {e.members} repeat: give them as weights")
    return RuleEnsemble("mean", e.members, (1,) * e.k, e.level, e.score, e.rank)


def _order(found: Iterable[RuleEnsemble]) -> list[RuleEnsemble]:
    return sorted(found, key=lambda e: (-e.score, e.k, e.rank))


def member_levels(lib: ModelLibrary, lo: float = 0.30, hi: float = 0.70) -> np.ndarray:
    """Each model's own best level on the library's tiles (see the module docstring).

    Returns:
        (N,) int64 levels on the 0..255 scale; member ``m``'s mask is ``probs[m] >= level``.
    """
    out = np.empty(lib.n_models, dtype=np.int64)
    for m in range(lib.n_models):
        scores = score_members(lib.probs, lib.truth, [m], lo, hi)[0]  # (256,)
        out[m] = metrics.choose_level(scores, metrics.QUANT_MAX, lo, hi).level
    return out


def own_masks(lib: ModelLibrary, levels: np.ndarray) -> ModelLibrary:
    """The library with each model's map replaced by its own mask as a 0/255 uint8 map."""
    lv = np.asarray(levels, dtype=np.int64).reshape(-1, 1, 1, 1)  # (N, 1, 1, 1)
    masks = (lib.probs >= lv).astype(np.uint8) * np.uint8(metrics.QUANT_MAX)  # (N, T, S, S)
    return replace(lib, probs=masks)


def vote_scores(lib: ModelLibrary, levels: np.ndarray, members: Sequence[int]) -> np.ndarray:
    """The official score of ``members``' vote at every count ``0..k`` (reference).

    Returns:
        (k+1,) float64; entry ``v``: positive where at least ``v`` own masks are.
    """
    votes = np.zeros(lib.probs.shape[1:], dtype=np.uint8)  # (T, S, S)
    for m in members:
        votes += lib.probs[m] >= levels[m]
    return metrics.dice_at_levels(votes, lib.truth, max_value=len(members))


def vote_search(
    lib: ModelLibrary,
    levels: np.ndarray,
    k: int | Iterable[int] = 6,
    *,
    top: int = 20,
    workers: int = 0,
    method: str = "native",
    progress: bool = True,
) -> tuple[list[RuleEnsemble], dict[int, RuleEnsemble]]:
    """Every k-combination's vote at every count ``1..k`` (exhaustive, see the module docstring).

    Args:
        lib: the library (the selection half).
        levels: (N,) the models' own mask levels (:func:`member_levels`).
        k: ensemble size, or several sizes.
        top: how many ensembles to return.
        workers: concurrent Ray tasks (0: in this process), as in ``exhaustive_search``.
        method: ``"native"`` or ``"numpy"`` kernel.
        progress: show a tqdm bar.

    Returns:
        ``(best, best_per_k)`` as ``exhaustive_search`` orders them; ``cut`` is the vote count.
    """
    found, per_k = exhaustive_search(
        own_masks(lib, levels),
        k,
        _VOTE_LO,
        1.0,
        top=top,
        workers=workers,
        method=method,
        progress=progress,
    )

    def as_vote(e: Ensemble) -> RuleEnsemble:
        # Levels 255 (v - 1) + 1 .. 255 v all select "at least v votes"; the kernel reports the
        # lowest best level, whose v is the lowest best count.
        v = -(-e.level // metrics.QUANT_MAX)
        return RuleEnsemble("vote", e.members, (1,) * e.k, v, e.score, e.rank)

    return [as_vote(e) for e in found], {kk: as_vote(e) for kk, e in per_k.items()}


def _weighted_best(
    lib: ModelLibrary, members: Sequence[int], weights: Sequence[int], lo: float, hi: float
) -> tuple[int, float]:
    """Best level in ``[lo, hi]`` and its score of a weighted sum (members repeated w times)."""
    repeated = [m for m, w in zip(members, weights, strict=True) for _ in range(w)]
    _, level, score = score_members(lib.probs, lib.truth, repeated, lo, hi)
    return level, score


def weighted_search(
    lib: ModelLibrary,
    starts: Sequence[RuleEnsemble | Ensemble],
    lo: float = 0.30,
    hi: float = 0.70,
    *,
    max_weight: int = 3,
    max_passes: int = 10,
) -> list[RuleEnsemble]:
    """Whole member weights by coordinate passes from each start (see the module docstring).

    Args:
        lib: the library (the selection half).
        starts: ensembles to start from, equal weights (the best exhaustive ones).
        lo: lowest threshold considered.
        hi: highest threshold considered.
        max_weight: weights lie in ``1..max_weight``.
        max_passes: passes over the members at most per start.

    Returns:
        One weighted ensemble per start, best first (ties: the earlier start).
    """
    if max_weight < 1:
        raise ValueError(f"max_weight must be at least 1, got {max_weight}")
    out = []
    for start in starts:
        members = tuple(start.members)
        if len(set(members)) != len(members):
            raise ValueError(f"start {members} repeats a member")
        if metrics.QUANT_MAX * max_weight * len(members) > np.iinfo(np.uint16).max:
            raise ValueError(
                f"max_weight={max_weight} with {len(members)} members: weighted sums must fit "
                "in uint16; lower --max-weight"
            )
        w = [1] * len(members)
        level, score = _weighted_best(lib, members, w, lo, hi)
        for _ in range(max_passes):
            changed = False
            for i in range(len(w)):
                for value in range(1, max_weight + 1):
                    trial = [*w[:i], value, *w[i + 1 :]]
                    # A common factor gives the decisions of trial / gcd, tried already.
                    if value == w[i] or math.gcd(*trial) > 1:
                        continue
                    lv, sc = _weighted_best(lib, members, trial, lo, hi)
                    if sc > score:  # ties keep the simpler weights
                        w, level, score, changed = trial, lv, sc, True
            if not changed:
                break
        out.append(RuleEnsemble("weighted", members, tuple(w), level, score, start.rank))
    return sorted(out, key=lambda e: -e.score)  # stable: ties keep the order of the starts


def rule_counts(
    lib: ModelLibrary, ens: RuleEnsemble, levels: np.ndarray | None
) -> metrics.LevelCounts:
    """Per-tile counts of an ensemble's rule at every cut ``0..max_value`` (no empty rule)."""
    if ens.rule == "vote":
        votes = np.zeros(lib.probs.shape[1:], dtype=np.uint8)  # (T, S, S)
        for m in ens.members:
            votes += lib.probs[m] >= levels[m]
        return metrics.level_counts(votes, lib.truth, max_value=ens.k)
    total = np.zeros(lib.probs.shape[1:], dtype=np.uint16)  # (T, S, S) sum of w_i q_i
    for m, w in zip(ens.members, ens.weights, strict=True):
        total += lib.probs[m].astype(np.uint16) * w
    return metrics.level_counts(total, lib.truth, max_value=ens.max_value)


def empty_search(
    lib: ModelLibrary,
    ens: RuleEnsemble,
    levels: np.ndarray,
    areas: Sequence[int] = DEFAULT_EMPTY_AREAS,
    lo: float = 0.30,
    hi: float = 0.70,
) -> RuleEnsemble:
    """The best empty-tile rule for one ensemble, searched jointly with its cut.

    Every ``(a, m)`` of ``areas x 1..k`` and every cut (levels in ``[lo, hi]``; votes
    ``1..k``) is scored exactly; a rule replaces "no empty-tile rule" only when it scores
    strictly higher, and among equal scores the first in the order ``a`` ascending, ``m``
    descending (the fewest emptied tiles) wins.

    Args:
        lib: the library (the selection half).
        ens: the ensemble, without an empty-tile rule.
        levels: (N,) the models' own mask levels.
        areas: the grid of ``a`` in pixels (each at least 1).
        lo: lowest threshold considered (mean and weighted rules).
        hi: highest threshold considered.

    Returns:
        The ensemble with its best cut and empty-tile rule (``empty_votes`` 0 when none helps).
    """
    if any(a < 1 for a in areas):
        raise ValueError(f"empty-tile areas must be at least 1 pixel, got {list(areas)}")
    c = rule_counts(lib, ens, levels)
    if ens.rule == "vote":
        first, last = 1, ens.k
    else:
        first, last = metrics.level_range(ens.max_value, lo, hi)
    tp = c.tp[:, first : last + 1]  # (T, cuts)
    pp = c.pp[:, first : last + 1]
    t = lib.n_tiles
    # (k, T) pixels of each member's own mask per tile.
    own = np.stack([(lib.probs[m] >= levels[m]).reshape(t, -1).sum(axis=1) for m in ens.members])

    def best(tp_: np.ndarray, pp_: np.ndarray) -> tuple[int, float]:
        sc = metrics.scores_from_counts(tp_, pp_, c.gt)  # (cuts,)
        i = int(np.argmax(sc))  # first maximum: the lowest cut wins ties
        return first + i, float(sc[i])

    cut, score = best(tp, pp)
    choice = (0, 0)
    for a in areas:
        small = (own < a).sum(axis=0)  # (T,) members whose mask is nearly empty
        for m in range(ens.k, 0, -1):
            emptied = (small >= m)[:, None]  # (T, 1)
            if not emptied.any():
                continue
            cut_m, score_m = best(np.where(emptied, 0, tp), np.where(emptied, 0, pp))
            if score_m > score:
                cut, score, choice = cut_m, score_m, (m, int(a))
    return replace(ens, cut=cut, score=score, empty_votes=choice[0], empty_area=choice[1])


def predict_library(lib: ModelLibrary, ens: RuleEnsemble, levels: np.ndarray | None) -> np.ndarray:
    """The ensemble's prediction of a library's tiles, by ``bldseg.predict.combine_members``.

    Returns:
        (T, S, S) bool, exactly what ``bldseg predict --ensemble`` with :meth:`RuleEnsemble.spec`
        predicts from the same maps.
    """
    spec = ens.spec(lib.checkpoints, levels)
    return combine_members((lib.probs[m] for m in ens.members), spec)


def brute_force_weighted(
    lib: ModelLibrary, members: Sequence[int], weights: Sequence[int], lo: float, hi: float
) -> tuple[int, float]:
    """Readable reference of the weighted rule: best (level, score) of the float weighted
    mean, every level of [lo, hi], scored one by one (tests and benchmarks check the fast
    search against it)."""
    mv = metrics.QUANT_MAX * sum(weights)
    mean = sum(w * lib.probs[m].astype(np.float64) for m, w in zip(members, weights, strict=True))
    mean /= mv  # (T, S, S)
    first, last = metrics.level_range(mv, lo, hi)
    scores = [
        metrics.competition_score(mean >= lv / mv, lib.truth) for lv in range(first, last + 1)
    ]
    i = int(np.argmax(scores))
    return first + i, scores[i]


def brute_force_empty(
    lib: ModelLibrary,
    e: RuleEnsemble,
    levels: np.ndarray,
    areas: Sequence[int],
    lo: float = 0.30,
    hi: float = 0.70,
) -> RuleEnsemble:
    """Readable reference of :func:`empty_search`: a plain loop over (area, members, cut) on
    binary predictions (tests and benchmarks check the fast search against it)."""
    masks = np.stack([lib.probs[m] >= levels[m] for m in e.members])  # (k, T, S, S)
    pixels = masks.reshape(e.k, lib.n_tiles, -1).sum(axis=2)  # (k, T)
    if e.rule == "vote":
        values, cuts = masks.sum(axis=0), range(1, e.k + 1)
    else:
        values = sum(
            w * lib.probs[m].astype(np.int64) for m, w in zip(e.members, e.weights, strict=True)
        )
        first, last = metrics.level_range(e.max_value, lo, hi)
        cuts = range(first, last + 1)

    def best(emptied):
        scores = []
        for c in cuts:
            pred = values >= c
            pred[emptied] = False
            scores.append(metrics.competition_score(pred, lib.truth))
        i = int(np.argmax(scores))
        return cuts[i], scores[i]

    cut, score = best(np.zeros(lib.n_tiles, bool))
    choice = (0, 0)
    for a in areas:
        for m in range(e.k, 0, -1):
            emptied = (pixels < a).sum(axis=0) >= m
            if emptied.any():
                c, s = best(emptied)
                if s > score:
                    cut, score, choice = c, s, (m, int(a))
    return RuleEnsemble(e.rule, e.members, e.weights, cut, score, e.rank, *choice)

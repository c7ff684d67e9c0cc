"""Exact k-of-N ensemble and threshold search over a library of trained models.

- :func:`load_library`, :func:`find_runs`, :func:`split_by_image`: the model library.
- :func:`exhaustive_search`: every k-combination at every threshold level (compiled, on Ray).
- :func:`greedy_search`: Caruana-style forward selection with replacement.
- :mod:`bldseg.ensemble.rules`: the vote, weighted-mean and empty-tile rules, searched exactly.
- :func:`run_search`: the whole job (honest split, report, plots, MLflow, ensemble spec).
- :func:`fake_library`: realistic synthetic libraries for tests and benchmarks.
"""

from bldseg.ensemble.combinatorics import chunk_ranges, n_combinations, rank, unrank
from bldseg.ensemble.library import ModelLibrary, find_runs, load_library, split_by_image
from bldseg.ensemble.prune import PrunedLibrary, level_window, prune
from bldseg.ensemble.rules import (
    RuleEnsemble,
    empty_search,
    member_levels,
    vote_search,
    weighted_search,
)
from bldseg.ensemble.run import SearchConfig, SearchSummary, evaluate, run_search
from bldseg.ensemble.search import (
    Ensemble,
    brute_force,
    exhaustive_search,
    greedy_search,
    score_members,
)
from bldseg.ensemble.synthetic import fake_library, write_runs

__all__ = [
    "Ensemble",
    "ModelLibrary",
    "PrunedLibrary",
    "RuleEnsemble",
    "SearchConfig",
    "SearchSummary",
    "brute_force",
    "chunk_ranges",
    "empty_search",
    "evaluate",
    "exhaustive_search",
    "fake_library",
    "find_runs",
    "greedy_search",
    "level_window",
    "load_library",
    "member_levels",
    "n_combinations",
    "prune",
    "rank",
    "run_search",
    "score_members",
    "split_by_image",
    "unrank",
    "vote_search",
    "weighted_search",
    "write_runs",
]

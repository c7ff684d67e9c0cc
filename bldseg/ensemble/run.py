"""The ensemble search job: library -> honest split -> search -> report, CSV, plots, MLflow, spec.

Honest evaluation: the validation tiles are split by source image into a *selection* half and
a *check* half. Ensembles and thresholds are chosen on the selection half only and reported on
both, next to the best single model (chosen the same way). A held-out test library of the same
models (``test_probs.npz`` next to each ``val_probs.npz``, e.g. on the synthetic world) is
scored too when present. It is information only, never used for any choice: test files that do
not fit (missing beside some models, unreadable, of other tiles, images or truth than the
others', or older than the model's weights) leave the test column out with one warning, and
the summary says why (``test_library_left_out``). The gap between the selection and the check
Dice is the optimism of the choice; the reference workflow reported only the former.

Every score carries a 95% cluster-bootstrap interval over source images
(:mod:`bldseg.stats`), and the ensemble's gain over the best single model a paired one on the
same tiles. What to submit (``submit.json``): the ensemble only when its gain on the check half
is beyond that interval (its low end above 0), else the best single model as a one-member
ensemble. The threshold sweep covers ``[lo, hi]`` and widens to
:data:`bldseg.metrics.WIDE_RANGE` when a chosen threshold lies on its edge
(``docs/thresholds.md``). Every choice then (the single model, each size's best, each row of
``top_ensembles.csv``, which merges both sweeps' ensembles) is the wider sweep's only where
that scores strictly higher; among equal scores the table lists thresholds inside ``[lo, hi]``
first. The best single model, the baseline of every run, is searched in ``[lo, hi]`` or, where
that holds no level of one map (``--lo 0.5 --hi 0.5``), up to the first level at or above ``lo``
(``single_range`` in the summary).

Rules (``SearchConfig.rules``, ``empty_tile``; :mod:`bldseg.ensemble.rules`): besides the mean
of probabilities, the vote of the members' own masks and a weighted mean, each optionally with
the empty-tile rule, are searched on the selection half and reported per rule (as ``rules`` in
the summary, ``best_ensemble_<rule>.json`` specs). ``best_ensemble.json`` holds the best of
them on the selection half (ties: the simplest, in the order mean, vote, weighted, then the
same with the empty-tile rule); each rule's selection score is recomputed through
``bldseg.predict.combine_members`` and must equal the searched one.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from bldseg import metrics, stats
from bldseg.ensemble import rules as rules_mod
from bldseg.ensemble.library import (
    FOLDS_FILE,
    VAL_FILE,
    ModelLibrary,
    find_runs,
    load_library,
    split_by_image,
)
from bldseg.ensemble.rules import DEFAULT_EMPTY_AREAS, RULES, RuleEnsemble
from bldseg.ensemble.search import (
    Ensemble,
    exhaustive_search,
    greedy_search,
    score_members,
)
from bldseg.io import file_lock, finite_json
from bldseg.predict import EnsembleSpec, fold_checkpoints, member_config

__all__ = [
    "InterruptedAfterPublishing",
    "SearchConfig",
    "SearchSummary",
    "check_threshold_range",
    "evaluate",
    "make_out_dir",
    "run_search",
    "submission_decision",
    "summary_lines",
    "tile_scores",
]

SPLITS = ("selection", "check", "test")

#: A run's staging folder in ``--out``: its outputs are written there, then moved into ``--out``.
STAGING_PREFIX = ".ensemble-staging-"
#: In a staging folder: the process that made it, ``{"pid": ..., "host": ...}``.
STAGING_OWNER = ".owner.json"
#: In a staging folder: the file its run holds locked (:func:`bldseg.io.file_lock`) for as long
#: as the folder exists; a folder whose lock can be taken is a gone run's.
STAGING_LOCK = ".owner.lock"
#: Seconds after which a staging folder without an owner file counts as stale (one made by a
#: bldseg before the owner file, or by a run killed between creating it and writing the file).
STAGING_UNOWNED_STALE_S = 3600.0


class InterruptedAfterPublishing(KeyboardInterrupt):
    """Ctrl-C after the outputs were moved into ``--out``, while the MLflow run was logged.

    A ``KeyboardInterrupt``: code that does not know it still stops, as on any Ctrl-C.
    """


@dataclass
class SearchConfig:
    """Everything the ensemble search job needs; the CLI fills it from its arguments."""

    runs: str | None = None  # search results folder; run folders are found recursively
    models: list[str] = field(default_factory=list)  # or explicit run folders / npz files
    # runs: also the run folders whose status.json says the trial failed (find_runs)
    include_failed: bool = False
    k: list[int] = field(default_factory=lambda: [6])  # ensemble sizes (exhaustive)
    lo: float = 0.30  # lowest threshold considered (widened when a choice lies on the edge)
    hi: float = 0.70  # highest threshold considered (widened likewise)
    method: Literal["exhaustive", "greedy"] = "exhaustive"
    greedy_size: int = 10  # greedy: stop at this many members (with repetition)
    greedy_init: int = 0  # greedy: start from this many best single models
    kernel: Literal["native", "numpy"] = "native"  # exhaustive: compiled or reference kernel
    workers: int = 0  # concurrent Ray tasks; 0: in this process
    top: int = 20  # rows of the result table
    out: str = "ensemble_out"  # output folder
    selection_fraction: float = 0.5  # share of source images in the selection half
    seed: int = 0  # seed of the split by source image
    test_file: str = "test_probs.npz"  # held-out test library file next to val_probs.npz
    tracking_uri: str | None = None  # MLflow tracking URI; None: no MLflow run
    experiment: str = "ensemble_search"  # MLflow experiment name
    parent_run_id: str | None = None  # MLflow parent run (tag mlflow.parentRunId)
    progress: bool = True  # tqdm bars
    rules: list[str] = field(default_factory=lambda: ["mean"])  # "mean", "vote", "weighted"
    empty_tile: bool = False  # also search the empty-tile rule with every rule
    empty_areas: list[int] = field(default_factory=lambda: list(DEFAULT_EMPTY_AREAS))  # px grid
    empty_candidates: int = 5  # empty-tile rule: searched on this many best ensembles per rule
    weighted_starts: int = 3  # weighted rule: coordinate passes from this many best ensembles
    max_weight: int = 3  # weighted rule: whole weights in 1..max_weight


@dataclass
class SearchSummary:
    """What the job found and where it wrote it."""

    best: dict  # the chosen ensemble: members, threshold, Dice on selection/check/test
    best_single: dict  # the best single model, reported the same way
    table: pd.DataFrame  # top rows
    files: dict[str, str]  # name -> path of every output file
    mlflow_run_id: str | None
    seconds: float
    gain: dict = field(default_factory=dict)  # split -> paired interval: ensemble - single
    decision: dict = field(default_factory=dict)  # what to submit, the rule and its numbers
    threshold_range: tuple[float, float] = (0.30, 0.70)  # the sweep the choices were made in
    widened: bool = False  # a choice lay on the edge of [lo, hi], so the sweep was widened
    # [lo, L/255] the single model was searched in, where [lo, hi] holds no level of one map
    single_range: tuple[float, float] | None = None
    rules: dict = field(default_factory=dict)  # rule variant -> its best ensemble's row
    test_left_out: str | None = None  # why the test files next to the models were not scored


def evaluate(lib: ModelLibrary, members: tuple[int, ...], level: int) -> float:
    """The official score of an ensemble at a fixed level on a library's tiles."""
    total = np.zeros(lib.probs.shape[1:], dtype=np.uint16)
    for m in members:
        total += lib.probs[m]
    return metrics.competition_score(total >= level, lib.truth)


def tile_scores(lib: ModelLibrary, members: tuple[int, ...], level: int) -> np.ndarray:
    """Per-tile Dice (T,) of an ensemble at a fixed level; NaN where the tile is empty/empty."""
    total = np.zeros(lib.probs.shape[1:], dtype=np.uint16)
    for m in members:
        total += lib.probs[m]
    return metrics.dice_per_image(total >= level, lib.truth)


def _interval(scores: np.ndarray, groups: np.ndarray) -> dict | None:
    """Bootstrap interval over source images as a dict; None when no tile has a score."""
    if not np.isfinite(scores).any():
        return None
    return stats.bootstrap_mean(scores, groups).to_dict()


def _paired(a: np.ndarray, b: np.ndarray, groups: np.ndarray) -> dict | None:
    """Paired interval of mean(a) - mean(b) over source images; None when an arm has no score."""
    if not (np.isfinite(a).any() and np.isfinite(b).any()):
        return None
    return stats.paired_difference(a, b, groups).to_dict()


def submission_decision(best: dict, single: dict, gain_check: dict | None) -> dict:
    """What to submit: the ensemble only when its gain on the check half is beyond noise.

    Rule: the 95% paired bootstrap interval (over source images) of the ensemble's Dice minus
    the best single model's, on the check half, must lie above 0. The selection half cannot
    decide: both were chosen there, and the ensemble had far more candidates to be lucky with.

    Args:
        best: The best ensemble's row (members, threshold, Dice per split).
        single: The best single model's row.
        gain_check: The paired interval on the check half (``Interval.to_dict``), or None when
            no check tile has a defined score.

    Returns:
        ``{"submit": "ensemble" | "single", "members", "threshold", "rule", "reason",
        "gain_check"}``.
    """
    rule = (
        "submit the ensemble only if its gain over the best single model on the check half "
        "(95% paired bootstrap interval over source images) lies above 0"
    )
    if gain_check is None:
        chosen, reason = "single", "no check tile has a defined Dice, so no gain can be shown"
    elif gain_check["low"] > 0:
        chosen = "ensemble"
        reason = (
            f"gain on the check half {stats.format_interval(gain_check, signed=True)} lies above 0"
        )
    else:
        chosen = "single"
        reason = (
            f"gain on the check half {stats.format_interval(gain_check, signed=True)} "
            "does not lie above 0"
        )
    row = best if chosen == "ensemble" else single
    return {
        "submit": chosen,
        "members": row["members"],
        "threshold": row["threshold"],  # None under the vote rule, which decides by votes
        **({"votes": row["votes"]} if "votes" in row else {}),
        "rule": rule,
        "reason": reason,
        "gain_check": gain_check,
    }


def _load(cfg: SearchConfig, file_name: str | None = None) -> ModelLibrary:
    kw = {"file_name": file_name} if file_name else {}
    if cfg.runs and cfg.models:
        raise ValueError("give either --runs or --models, not both")
    if cfg.runs:
        runs = find_runs(cfg.runs, include_failed=cfg.include_failed, **kw)
        return load_library(runs, root=cfg.runs, **kw)
    if cfg.models:
        return load_library(cfg.models, **kw)
    raise ValueError("no models: pass --runs <search results folder> or --models <paths>")


def _test_library(cfg: SearchConfig, lib: ModelLibrary) -> tuple[ModelLibrary | None, str | None]:
    """The held-out test library of the same models, or why the test files were left out.

    The test column is information only (no choice reads it), so test files that cannot make
    one library of these models do not stop the search, unlike a bad ``val_probs.npz``: the
    column is left out with one warning naming the file and what is wrong with it.

    Returns:
        ``(library, None)``; ``(None, None)`` when no model has a test file; ``(None, why)``
        when some do but they do not fit: missing beside other models, older than the model's
        weights (made by an earlier state of the model, e.g. before a resumed run saved a
        better epoch), unreadable, or of other tiles, source images or ground truth than the
        others'.
    """
    if not cfg.test_file:
        return None, None
    files = [Path(s).parent / cfg.test_file for s in lib.sources]
    missing = [f for f in files if not f.is_file()]
    if len(missing) == len(files):
        return None, None
    why = None
    if missing:
        why = f"{len(missing)} of {len(files)} models have none (e.g. {missing[0]} is missing)"
    else:
        # the rule bldseg.pipeline remakes test maps by: older than the weights behind them,
        # they were made by an earlier state of the model
        stale = [(f, w) for f, c in zip(files, lib.checkpoints, strict=True) if (w := _newer(c, f))]
        if stale:
            (f, w), more = stale[0], len(stale) - 1
            why = (
                f"{f} is older than {w}, so it was made by an earlier state of that model (an "
                "older run, or before a resumed run saved a better epoch)"
                + (f"; {more} more model(s) likewise" if more else "")
            )
    if why is None:
        try:
            test = load_library(files, file_name=cfg.test_file)
        except (ValueError, FileNotFoundError) as err:  # unreadable, other tiles, ...
            why = f"they do not form one test library of these models: {err}"
        else:
            test.names = list(lib.names)
            return test, None
    why = f"{cfg.test_file} files next to the models' {VAL_FILE}: {why}"
    warnings.warn(
        f"held-out test column left out: {why}. The search goes on without it (no choice reads "
        f"it); to score it, remake or delete those {cfg.test_file} files (bldseg pipeline "
        "remakes stale ones), or pass --test-file '' to not read them",
        stacklevel=3,
    )
    return None, why


def _newer(checkpoint: Path, maps: Path) -> Path | None:
    """The newest weights file behind a member's ``checkpoint`` when it is newer than its
    ``maps``, else None.

    A K-fold run's weights are its folds' ``best.pt`` (its ``folds.json`` and out-of-fold
    ``val_probs.npz`` are rewritten without new weights); a member without readable weights
    files (e.g. given as a bare npz) is not judged.
    """
    try:
        weights = fold_checkpoints(checkpoint)[0] if checkpoint.name == FOLDS_FILE else [checkpoint]
        newest = max(weights, key=lambda w: w.stat().st_mtime_ns)
        return newest if newest.stat().st_mtime_ns > maps.stat().st_mtime_ns else None
    except (OSError, ValueError):  # no best.pt, or a broken manifest: nothing to judge by
        return None


def _write_atomic(path: Path, write) -> Path:
    tmp = path.with_name(path.name + ".tmp" + path.suffix)
    write(tmp)
    os.replace(tmp, path)
    return path


def _row(e: Ensemble, lib, sel, chk, test) -> dict:
    row = {
        "k": e.k,
        "rank": e.rank,
        "members": "+".join(lib.names[m] for m in e.members),
        "member_ids": " ".join(str(m) for m in e.members),
        "level": e.level,
        "threshold": e.threshold,
        "selection_dice": e.score,
        "check_dice": evaluate(chk, e.members, e.level),
    }
    if test is not None:
        row["test_dice"] = evaluate(test, e.members, e.level)
    return row


def _split_libs(sel, chk, test) -> dict[str, ModelLibrary]:
    libs = {"selection": sel, "check": chk}
    if test is not None:
        libs["test"] = test
    return libs


def _with_intervals(row: dict, e: Ensemble, libs: dict) -> tuple[dict, dict[str, np.ndarray]]:
    """The row with ``intervals`` (split -> bootstrap interval), and its per-tile scores."""
    tiles = {split: tile_scores(lib, e.members, e.level) for split, lib in libs.items()}
    intervals = {split: _interval(tiles[split], libs[split].image_ids) for split in libs}
    return {**row, "intervals": intervals}, tiles


def _on_edge(e: Ensemble, lo: float, hi: float) -> bool:
    return metrics.on_range_edge(e.level, e.max_value, lo, hi)


def _search(
    cfg: SearchConfig, sel: ModelLibrary, lo: float, hi: float
) -> tuple[Ensemble, list[Ensemble], dict[int, Ensemble]]:
    """Best single model, top ensembles and the best of each k, all chosen in ``[lo, hi]``
    (the single model in :func:`_single_range`)."""
    # Best single model, chosen on the selection half like the ensembles.
    singles, _ = exhaustive_search(
        sel, 1, *_single_range(lo, hi), top=1, method=cfg.kernel, progress=False
    )
    single = singles[0]
    if cfg.method == "exhaustive":
        top, per_k = exhaustive_search(
            sel,
            cfg.k,
            lo,
            hi,
            top=cfg.top,
            workers=cfg.workers,
            method=cfg.kernel,
            progress=cfg.progress,
        )
    elif cfg.method == "greedy":
        best_g, history = greedy_search(
            sel, cfg.greedy_size, lo, hi, init=cfg.greedy_init, progress=cfg.progress
        )
        top = sorted(history, key=lambda e: (-e.score, e.k))[: cfg.top]
        assert top[0] is best_g
        per_k = {e.k: e for e in history}
    else:
        raise ValueError(f"method must be 'exhaustive' or 'greedy', got {cfg.method!r}")
    return single, top, per_k


def _single_range(lo: float, hi: float) -> tuple[float, float]:
    """The range one model's map is searched in: ``[lo, hi]``, or ``[lo, L / 255]`` where that
    holds no level ``L / 255`` of one map, ``L`` the first level at or above ``lo``.

    A range may hold a level of the asked ensembles' sum and none of one map (0.5 is 255/510,
    between 127/255 and 128/255), yet the best single model is searched in every run: it is
    the baseline the ensembles are compared against. One map thresholded anywhere in such a
    range gives level ``L``'s mask (positive where ``p >= t``), so ``L`` is its answer to it.
    """
    m = metrics.QUANT_MAX
    first = metrics.level_from_threshold(lo, m)  # <= 255, since lo <= 1
    return (lo, hi) if first / m <= hi else (lo, first / m)


def check_threshold_range(lo: float, hi: float) -> None:
    """Refuses a threshold sweep ``[lo, hi]`` that is not ``0 <= lo <= hi <= 1``.

    A threshold outside [0, 1] (or NaN) is no probability: the sweep was clipped without a
    word, and the summary recorded the range as given.

    Raises:
        ValueError: naming ``--lo`` / ``--hi`` and what to do.
    """
    for flag, value in (("--lo", lo), ("--hi", hi)):
        if not 0.0 <= value <= 1.0:  # also refuses NaN
            raise ValueError(
                f"{flag} {value}: the threshold sweep's ends are probabilities, in [0, 1]"
            )
    if lo > hi:
        raise ValueError(f"--lo {lo} > --hi {hi}: lo > hi: swap them")


def _check_rules(cfg: SearchConfig) -> None:
    check_threshold_range(cfg.lo, cfg.hi)
    bad = [r for r in cfg.rules if r not in RULES]
    if bad or not cfg.rules:
        raise ValueError(f"rules must be some of {RULES}, got {cfg.rules}")
    if "mean" not in cfg.rules:
        # the mean search chooses the threshold range and seeds the weighted rule
        raise ValueError("rules must include 'mean' (the other rules build on its search)")
    if cfg.method != "exhaustive" and (cfg.rules != ["mean"] or cfg.empty_tile):
        raise ValueError(
            "the vote and weighted rules and the empty-tile rule need --method exhaustive"
        )
    for name in ("top", "weighted_starts", "empty_candidates"):
        if getattr(cfg, name) < 1:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} must be at least 1, got {getattr(cfg, name)}")
    if cfg.empty_tile and (not cfg.empty_areas or min(cfg.empty_areas) < 1):
        raise ValueError(f"empty-tile areas must be at least 1 pixel, got {cfg.empty_areas}")


def _search_rules(
    cfg: SearchConfig,
    sel: ModelLibrary,
    top: list[Ensemble],
    levels: np.ndarray,
    lo: float,
    hi: float,
) -> dict[str, RuleEnsemble]:
    """The best ensemble of every rule variant asked for, chosen on the selection half.

    Returns:
        Variant name (``mean``, ``vote``, ``weighted``, then ``<rule>_empty``) -> ensemble, in
        the order of preference among equal scores.
    """
    tops: dict[str, list[RuleEnsemble]] = {"mean": [rules_mod.from_mean(e) for e in top]}
    if "vote" in cfg.rules:
        tops["vote"], _ = rules_mod.vote_search(
            sel,
            levels,
            cfg.k,
            top=cfg.top,
            workers=cfg.workers,
            method=cfg.kernel,
            progress=cfg.progress,
        )
    if "weighted" in cfg.rules:
        tops["weighted"] = rules_mod.weighted_search(
            sel, top[: cfg.weighted_starts], lo, hi, max_weight=cfg.max_weight
        )
    found = {name: t[0] for name, t in tops.items()}
    if cfg.empty_tile:
        for name, t in tops.items():
            cands = [
                rules_mod.empty_search(sel, e, levels, cfg.empty_areas, lo, hi)
                for e in t[: cfg.empty_candidates]
            ]
            found[f"{name}_empty"] = max(cands, key=lambda e: e.score)  # ties: the first
    return found


def _rule_row(
    name: str, e: RuleEnsemble, lib: ModelLibrary, libs: dict, levels: np.ndarray
) -> tuple[dict, dict[str, np.ndarray]]:
    """A rule variant's row (scores and intervals per split) and its per-tile Dice.

    Every split is predicted through ``bldseg.predict.combine_members``, as ``bldseg predict
    --ensemble`` predicts with the variant's spec.

    Raises:
        RuntimeError: the selection score of that prediction differs from the searched one.
    """
    row: dict = {
        "rule": e.rule,
        "k": e.k,
        "rank": e.rank,
        "members": "+".join(lib.names[m] for m in e.members),
        "member_ids": " ".join(str(m) for m in e.members),
        "weights": list(e.weights),
        "cut": e.cut,
        # as the variant's spec says: the vote rule decides by its members' own thresholds
        # and a vote count, no ensemble threshold (votes / k, the cut as a fraction, is
        # applied nowhere; the spec's required threshold field is 0.5, unread)
        "threshold": None if e.rule == "vote" else e.threshold,
        **({"votes": e.cut} if e.rule == "vote" else {}),
        "empty_votes": e.empty_votes,
        "empty_area": e.empty_area,
    }
    if e.rule == "vote" or e.empty_votes:
        row["member_thresholds"] = [int(levels[m]) / metrics.QUANT_MAX for m in e.members]
    tiles, intervals = {}, {}
    for split, split_lib in libs.items():
        pred = rules_mod.predict_library(split_lib, e, levels)  # (T, S, S) bool
        row[f"{split}_dice"] = metrics.competition_score(pred, split_lib.truth)
        tiles[split] = metrics.dice_per_image(pred, split_lib.truth)
        intervals[split] = _interval(tiles[split], split_lib.image_ids)
    if row["selection_dice"] != e.score:
        raise RuntimeError(
            f"rule {name}: the prediction scores {row['selection_dice']!r} on the selection "
            f"half, the search {e.score!r}; the search and bldseg.predict disagree (a bug)"
        )
    row["intervals"] = intervals
    return row, tiles


def _plots(
    out: Path, per_k: dict, sel, chk, best: Ensemble, lo: float, hi: float, rules: bool = False
) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}
    ks = sorted(per_k)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ks, [per_k[k]["selection_dice"] for k in ks], "o-", label="selection (chosen on)")
    ax.plot(ks, [per_k[k]["check_dice"] for k in ks], "s--", label="check (held out)")
    ax.set_xlabel("ensemble size k")
    ax.set_ylabel("mean Dice (best ensemble of size k)")
    ax.set_xticks(ks)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    files["score_vs_k"] = str(
        _write_atomic(out / "score_vs_k.png", lambda p: fig.savefig(p, format="png", dpi=100))
    )
    plt.close(fig)

    mv = metrics.QUANT_MAX * best.k
    t = np.arange(mv + 1) / mv
    s_sel = score_members(sel.probs, sel.truth, best.members, lo, hi)[0]
    s_chk = score_members(chk.probs, chk.truth, best.members, lo, hi)[0]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(t, s_sel, label="selection")
    ax.plot(t, s_chk, label="check")
    ax.axvspan(lo, hi, color="grey", alpha=0.1, label="searched range")
    ax.axvline(
        best.threshold,
        color="k",
        ls=":",
        label=f"its threshold {metrics.threshold_text(best.threshold)}",
    )
    ax.set_xlabel("threshold on the mean probability")
    ax.set_ylabel("mean Dice")
    # with other rules searched, the chosen one may not be this mean-rule ensemble; and the
    # check half may submit the best single model instead (submit.json), so not "chosen"
    ax.set_title(f"{'best mean-rule' if rules else 'best'} ensemble (k={best.k})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    files["threshold_curve"] = str(
        _write_atomic(out / "threshold_curve.png", lambda p: fig.savefig(p, format="png", dpi=100))
    )
    plt.close(fig)
    return files


def _log_mlflow(cfg: SearchConfig, params: dict, scalars: dict, files: dict) -> str:
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    from bldseg.tune import tracking

    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    # as the searches do: under the store's lock, artifacts of a new sqlite experiment beside
    # the database (not in --out: another job's, or a folder deleted after the search)
    exp_id = tracking.ensure_experiment(client, cfg.experiment, cfg.tracking_uri, cfg.out)
    tags = {"bldseg.job": "ensemble_search"}
    if cfg.parent_run_id:
        tags["mlflow.parentRunId"] = cfg.parent_run_id
    run = client.create_run(exp_id, run_name=f"ensemble_{cfg.method}", tags=tags)
    rid = run.info.run_id
    try:
        ts = int(time.time() * 1000)
        client.log_batch(
            rid,
            params=[Param(k, str(v)[:6000]) for k, v in sorted(params.items())],
            metrics=[Metric(k, float(v), ts, 0) for k, v in sorted(scalars.items())],
            tags=[RunTag("bldseg.best_members", str(params.get("best_members", "")))],
        )
        for path in files.values():
            client.log_artifact(rid, path)
    except BaseException as e:  # Ctrl-C included: the run must not stay RUNNING
        client.set_terminated(
            rid, status="KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        )
        raise
    client.set_terminated(rid)
    return rid


def make_out_dir(out: str | os.PathLike) -> Path:
    """Creates the output folder ``--out`` (with its parents) and checks it can be written.

    The command calls it before it starts Ray, so that an unusable ``--out`` is one line, not a
    traceback after the search.

    Raises:
        ValueError: naming ``--out`` and why it cannot be used.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: a file, not a folder; pass a folder for the outputs")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file among its parents, no permission, a read-only disk, ...
        why = f"{e.strerror}: {e.filename}" if e.strerror and e.filename else str(e)
        raise ValueError(f"--out {out}: cannot create it ({why}); pass another folder") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: not writable; pass a folder you can write to")
    return out


def run_search(cfg: SearchConfig) -> SearchSummary:
    """Runs the whole job (see the module docstring) and writes its outputs to ``cfg.out``.

    Returns:
        The summary; ``files`` lists the CSV, plots, summary JSON and the specs:
        ``best_ensemble.json``, ``best_single.json`` and ``submit.json`` (the decided one).
    """
    t0 = time.perf_counter()
    _check_rules(cfg)
    out = make_out_dir(cfg.out)
    # Every output is written into a staging folder and moved into --out once all are: a run
    # that fails half-way leaves the previous run's files as they were, not some of each. A run
    # removes its own, Ctrl-C included; those of killed runs go here.
    remove_stale_stages(out)
    stage = _make_stage(out)
    try:
        # Held while the folder exists, so that no other run takes it for a killed one's; the
        # owner file, written once it is held, tells another run that a free lock means gone.
        with file_lock(stage / STAGING_LOCK):
            owner = {"pid": os.getpid(), "host": socket.gethostname()}
            (stage / STAGING_OWNER).write_text(json.dumps(owner))
            try:
                return _run_search(cfg, out, stage, t0)
            finally:
                shutil.rmtree(stage, ignore_errors=True)
    finally:
        # again once the lock is released: an open lock file keeps an NFS folder (.nfs* file)
        shutil.rmtree(stage, ignore_errors=True)


def _make_stage(out: Path) -> Path:
    """A new staging folder in ``out``, with the permissions the umask gives.

    Not ``tempfile.mkdtemp``'s ``drwx------``: in an ``--out`` shared by a group (umask 002),
    another user's run must look into it to tell whether its run is gone, and remove it then.
    """
    while True:
        stage = out / f"{STAGING_PREFIX}{secrets.token_hex(4)}"
        try:
            stage.mkdir()
        except FileExistsError:  # another run's name: draw again
            continue
        return stage


def remove_stale_stages(out: Path) -> list[Path]:
    """Removes the staging folders that killed runs left in ``out``; returns them.

    ``--out`` has no lock (two searches may write into it at once), but each run holds a lock
    on its staging folder's :data:`STAGING_LOCK` for as long as the folder exists. A folder is
    stale when that lock can be taken at once (its run is gone, whichever host, container or
    PID namespace it ran in: process ids cannot tell, as another namespace's live run has a pid
    that does not run here) and its owner file, written once the lock was held, is there. A
    folder without a lock file (made by a bldseg before it) is stale when its owner file names
    a pid of this host that no longer runs; another host's are kept, as is one whose pid runs
    again for another process. A folder without an owner file (being made, or its run killed
    at once) is stale once older than :data:`STAGING_UNOWNED_STALE_S`. A folder this user
    cannot look into (another user's, made by a bldseg that kept it to its owner) or whose
    lock file it cannot open (another user's, made under umask 022) is kept, with a warning
    naming it: whether its run is gone cannot be told.
    """
    removed = []
    host = socket.gethostname()
    for stage in out.glob(f"{STAGING_PREFIX}*"):
        try:
            locked = (stage / STAGING_LOCK).is_file()
        except OSError as e:
            _warn_kept(stage, "which this user cannot look into", e, stacklevel=3)
            continue
        if locked:
            stale = _remove_if_unlocked(stage)
        else:
            stale = _stale_by_owner(stage, host)
            if stale and stage.is_dir():
                shutil.rmtree(stage, ignore_errors=True)
        if stale:
            removed.append(stage)
    return removed


def _remove_if_unlocked(stage: Path) -> bool:
    """Removes a staging folder whose run holds its lock no longer; whether it did."""
    from filelock import Timeout

    try:
        with file_lock(stage / STAGING_LOCK, timeout=0):
            # no owner file: its run may have created the lock file and not locked it yet
            stale = (stage / STAGING_OWNER).is_file() or _older_than_unowned(stage)
            if stale:
                shutil.rmtree(stage, ignore_errors=True)
    except Timeout:  # its run holds it: in use
        return False
    except FileNotFoundError:  # removed meanwhile
        return False
    except OSError as e:
        # Not ours to lock: a run under umask 022 made it drwxr-sr-x with a -rw-r--r-- lock
        # file, which other users can look into but not open for writing (nor remove).
        _warn_kept(stage, "whose lock file this user cannot open", e, stacklevel=4)
        return False
    if stale:
        shutil.rmtree(stage, ignore_errors=True)  # what the open lock file kept (NFS)
    return stale


def _warn_kept(stage: Path, why: str, err: OSError, stacklevel: int) -> None:
    """Warns that another user's staging folder is kept: whether its run is gone cannot be
    told. ``stacklevel``: that of the caller of :func:`remove_stale_stages`."""
    warnings.warn(
        f"--out {stage.parent}: the staging folder {stage.name} is another user's search's, "
        f"{why} ({err.strerror or err}): it is kept, as that search may still run; once it "
        f"has ended, its owner can remove it (`rm -r {stage}`)",
        stacklevel=stacklevel,
    )


def _stale_by_owner(stage: Path, host: str) -> bool:
    """Whether a staging folder without a lock file is a gone run's, by its owner file."""
    try:
        owner = json.loads((stage / STAGING_OWNER).read_text())
        return owner["host"] == host and not _pid_runs(int(owner["pid"]))
    except FileNotFoundError:
        return _older_than_unowned(stage)
    except (OSError, ValueError, KeyError, TypeError):  # unreadable: not known to be stale
        return False


def _older_than_unowned(stage: Path) -> bool:
    """Whether a staging folder is older than :data:`STAGING_UNOWNED_STALE_S`."""
    try:
        return time.time() - stage.stat().st_mtime > STAGING_UNOWNED_STALE_S
    except OSError:  # removed meanwhile, or not ours to look into
        return False


def _pid_runs(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host (another user's included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True


class _MembersTTA:
    """Whether each model validated with flip TTA (its maps are then flip-averaged, so predict
    must average flips too), read from its own checkpoint, once.

    A spec records the flag per member (:attr:`EnsembleSpec.member_tta`): an ensemble mixing
    runs validated with and without TTA predicts each member as its maps were made, which is
    what the search scored. Models the search did not choose are never read, so a missing or
    foreign checkpoint among them changes nothing. A chosen member whose run config cannot be
    read (a missing, empty or foreign ``best.pt``) is warned about, once: its member entries
    say ``"tta": false``.
    """

    def __init__(self, lib: ModelLibrary):
        self._lib = lib
        self._flags: dict[int, bool] = {}  # model -> its run config's tta (False: unread)

    def _flag(self, m: int) -> bool:
        if m not in self._flags:
            path = self._lib.checkpoints[m]
            try:
                self._flags[m] = member_config(path)[0].tta
            except (OSError, ValueError) as err:
                self._flags[m] = False
                where = "" if str(path) in str(err) else f"{path}: "  # most errors name it
                warnings.warn(
                    f"model {self._lib.names[m]!r}: cannot read its run config ({where}{err}), "
                    'so the specs holding it predict it without flip TTA ("tta": false on its '
                    'member entry); if that run validated with TTA, set "tta": true there',
                    stacklevel=3,
                )
        return self._flags[m]

    def __call__(self, spec: EnsembleSpec, members: Sequence[int]) -> EnsembleSpec:
        """``spec`` (whose members are these model indices) with each member's TTA recorded;
        the spec-wide ``tta`` (read by older bldseg versions, which know no member flags) is
        on when every member's is."""
        flags = [self._flag(m) for m in members]
        return replace(spec, tta=all(flags), member_tta=flags)


#: Moved into ``--out`` after the other outputs, in this order: ``submit.json`` (what predict
#: reads) and ``summary.json`` (which names it) replace the earlier run's last.
_PUBLISHED_LAST = ("submit.json", "summary.json")


def _publish(stage: Path, out: Path, moved: list[bool]) -> None:
    """Moves the staged outputs into ``out``; rule specs an earlier run left are removed.

    A Ctrl-C waits for the moves (a few renames) to end, ``moved`` then holding ``True``:
    ``out`` holds one run's outputs, not some of each. A kill between two renames (SIGKILL, a
    power cut) leaves the earlier ``submit.json`` and ``summary.json``: the new ones move last.
    """
    with _ctrl_c_deferred():
        # not the hidden owner and lock files (nor a filesystem's own lock files beside them)
        staged = {p.name for p in stage.iterdir() if not p.name.startswith(".")}
        for name in sorted(staged - set(_PUBLISHED_LAST)):
            os.replace(stage / name, out / name)
        for old in out.glob("best_ensemble_*.json"):
            if old.name not in staged:
                old.unlink()
        for name in _PUBLISHED_LAST:
            if name in staged:
                os.replace(stage / name, out / name)
        moved.append(True)


@contextmanager
def _ctrl_c_deferred() -> Iterator[None]:
    """Holds a Ctrl-C (SIGINT) back until the block ends, then delivers it."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is None  # a handler set outside Python: left alone
    ):
        yield  # only the main thread receives signals (and may set their handlers)
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:  # to the handler it was meant for: KeyboardInterrupt, under Python's own
        signal.raise_signal(signal.SIGINT)


def _keep_widened_where_better(
    default: tuple, widened: tuple, lo: float, hi: float, top: int
) -> tuple:
    """``(single, top, per_k)`` of the default range ``[lo, hi]``, each choice replaced by the
    widened search's only where that scores strictly higher.

    The single model and each ensemble size's best are replaced on their own (a size whose
    widened best only ties keeps its threshold inside the default range). The top table is
    both searches' entries merged (:func:`_merge_top`), so that it holds every ensemble the
    summary reports and agrees with it row by row.
    """
    (single, d_top, per_k), (w_single, w_top, w_per_k) = default, widened
    return (
        w_single if w_single.score > single.score else single,
        _merge_top(d_top, w_top, lo, hi, top),
        {
            k: w if k not in per_k or w.score > per_k[k].score else per_k[k]
            for k, w in w_per_k.items()
        },
    )


def _merge_top(default: list, widened: list, lo: float, hi: float, top: int) -> list:
    """The ``top`` best of both searches' tables, an ensemble once.

    An ensemble in both keeps the default range's entry unless the widened one scores strictly
    higher (as :func:`bldseg.metrics.choose_level`). Order: score, then a threshold inside the
    default range ``[lo, hi]`` before one outside it (so the first row is the default range's
    best unless the widened best beats it), then k, then rank. Keeping either table whole
    left out ensembles that scored higher than most of its rows, while the summary's best of
    each size came from the other range.
    """
    chosen = {e.members: e for e in default}
    for e in widened:
        if e.members not in chosen or e.score > chosen[e.members].score:
            chosen[e.members] = e
    # (level / 255k is the float the level window of [lo, hi] is cut by.) sorted is stable:
    # among entries equal on every key (greedy ensembles, rank -1 all), the default range's
    # first
    return sorted(
        chosen.values(), key=lambda e: (-e.score, not lo <= e.threshold <= hi, e.k, e.rank)
    )[:top]


def _run_search(cfg: SearchConfig, out: Path, stage: Path, t0: float) -> SearchSummary:
    lib = _load(cfg)
    sel_idx, chk_idx = split_by_image(lib.image_ids, cfg.selection_fraction, cfg.seed)
    sel, chk = lib.subset(sel_idx), lib.subset(chk_idx)
    test, test_left_out = _test_library(cfg, lib)

    rules_searched = cfg.rules != ["mean"] or cfg.empty_tile
    lo, hi = cfg.lo, cfg.hi
    single_range = _single_range(lo, hi)
    if single_range != (lo, hi) and (cfg.method == "greedy" or 1 in cfg.k):
        # those threshold one map themselves: no level of it lies in the range asked for
        who = "a greedy search's first step (one model)" if cfg.method == "greedy" else "-k 1"
        raise ValueError(
            f"--lo {lo} --hi {hi} holds no threshold L/255 of one model's map, which {who} "
            f"is thresholded at; widen the range to hold one (e.g. --hi {single_range[1]:.6f})"
        )
    if single_range != (lo, hi):
        warnings.warn(
            f"--lo {lo} --hi {hi} holds no threshold L/255 of one model's map, so the best "
            "single model (the baseline the ensembles are compared against) is searched in "
            f"[{lo}, {single_range[1]:.6f}]: {single_range[1]:.6f} = "
            f"{round(single_range[1] * metrics.QUANT_MAX)}/255 is the mask a map thresholded "
            "anywhere in [lo, hi] gives (summary.json: single_range, unless a widened sweep's "
            "single model replaces it)",
            stacklevel=3,
        )
    single, top, per_k = _search(cfg, sel, lo, hi)
    # A choice on the edge of the range was clipped by it: search the wider range again (the
    # whole search, since another combination may win there). Its choices replace the default
    # range's only where they score strictly higher, as in bldseg.metrics.choose_level; the top
    # table merges both searches' (_merge_top).
    widened = _on_edge(top[0], lo, hi) or _on_edge(single, *single_range)
    # the range the single model reported was searched in, where it is not [lo, hi]: None once
    # the widened search's single model is kept (the widened range says where it came from)
    single_searched = None if single_range == (cfg.lo, cfg.hi) else single_range
    if widened:
        lo, hi = metrics.widened_range(lo, hi)
        w_single, w_top, w_per_k = _search(cfg, sel, lo, hi)
        single, top, per_k = _keep_widened_where_better(
            (single, top, per_k), (w_single, w_top, w_per_k), cfg.lo, cfg.hi, cfg.top
        )
        if single is w_single:
            single_searched = None
    # the single model chosen over the same range as everything reported (after a widening,
    # the default range's k=1 entry would disagree with best_single)
    per_k[1] = single
    best = top[0]

    rows = [_row(e, lib, sel, chk, test) for e in top]
    table = pd.DataFrame(rows)
    table.insert(0, "position", np.arange(1, len(table) + 1))
    files = {
        "table": str(
            _write_atomic(stage / "top_ensembles.csv", lambda p: table.to_csv(p, index=False))
        )
    }
    libs = _split_libs(sel, chk, test)
    per_k_rows = {
        k: _with_intervals(_row(e, lib, sel, chk, test), e, libs)[0] for k, e in per_k.items()
    }
    files.update(_plots(stage, per_k_rows, sel, chk, best, lo, hi, rules_searched))

    # a member's maps were flip-averaged when its run validated with TTA: predict must too
    with_tta = _MembersTTA(lib)
    spec = EnsembleSpec(
        checkpoints=[str(lib.checkpoints[m].resolve()) for m in best.members],
        weights=[],
        threshold=best.threshold,
    )
    spec = with_tta(spec, best.members)
    spec_path = stage / "best_ensemble.json"
    spec.save(spec_path, home=out)
    files["spec"] = str(spec_path)
    # The best single model as a one-member ensemble: k = 1, so predict applies its level on
    # the 0..255 scale, exactly the rule its scores here were computed with.
    single_spec = EnsembleSpec(
        checkpoints=[str(lib.checkpoints[m].resolve()) for m in single.members],
        weights=[],
        threshold=single.threshold,
    )
    single_spec = with_tta(single_spec, single.members)
    single_spec.save(stage / "best_single.json", home=out)
    files["single_spec"] = str(stage / "best_single.json")

    best_d, best_tiles = _with_intervals(rows[0], best, libs)
    best_d["rule"] = "mean"
    rule_rows: dict[str, dict] = {}
    if rules_searched:
        # Own mask levels chosen on the selection half only (bldseg.ensemble.rules).
        # (one map's levels, as the single model's: _single_range)
        levels = rules_mod.member_levels(sel, *single_range)
        found = _search_rules(cfg, sel, top, levels, lo, hi)
        rule_tiles = {}
        for name, e in found.items():
            rule_rows[name], rule_tiles[name] = _rule_row(name, e, lib, libs, levels)
            rule_spec = e.spec([c.resolve() for c in lib.checkpoints], levels)
            rule_spec = with_tta(rule_spec, e.members)
            path = stage / f"best_ensemble_{name}.json"
            rule_spec.save(path, home=out)
            files[f"spec_{name}"] = str(path)
        # max keeps the first of equal scores: the simplest rule (the order of found)
        name = max(found, key=lambda n: found[n].score)
        if name != "mean":
            spec = found[name].spec([c.resolve() for c in lib.checkpoints], levels)
            spec = with_tta(spec, found[name].members)
            spec.save(spec_path, home=out)
            best_d, best_tiles = rule_rows[name], rule_tiles[name]
    single_d, single_tiles = _with_intervals(_row(single, lib, sel, chk, test), single, libs)
    gain = {
        split: _paired(best_tiles[split], single_tiles[split], libs[split].image_ids)
        for split in libs
    }
    decision = submission_decision(best_d, single_d, gain["check"])
    chosen_spec = spec if decision["submit"] == "ensemble" else single_spec
    chosen_spec.save(stage / "submit.json", home=out)
    files["submit"] = str(stage / "submit.json")
    decision["spec"] = str(out / "submit.json")  # where it lies once published
    summary = {
        "config": _config_record(cfg),
        "n_models": lib.n_models,
        "n_tiles": {"selection": sel.n_tiles, "check": chk.n_tiles},
        "n_images": {
            "selection": int(np.unique(sel.image_ids).size),
            "check": int(np.unique(chk.image_ids).size),
        },
        "test_library": test is not None,
        "test_library_left_out": test_left_out,  # null: scored, or no model has test maps
        "threshold_range": [lo, hi],
        "widened": widened,
        # [lo, L/255]: --lo/--hi held no level of one map, so the best single model's search
        # of the default range ran there (_single_range); null: it ran in [lo, hi], or the
        # widened search's single model was kept
        "single_range": None if single_searched is None else list(single_searched),
        "best": best_d,
        "best_single": single_d,
        "gain": gain,
        "decision": decision,
        "best_per_k": {str(k): v for k, v in sorted(per_k_rows.items())},
        "rules": rule_rows,
    }
    files["summary"] = str(
        _write_atomic(
            stage / "summary.json",
            # strict JSON (null for an unbounded interval): read by people's tools, not ours
            lambda p: p.write_text(json.dumps(finite_json(summary), indent=2, default=str)),
        )
    )
    files = {k: str(out / Path(v).name) for k, v in files.items()}  # where they lie once moved
    params: dict = {}
    scalars: dict = {}
    if cfg.tracking_uri:
        params = {
            "method": cfg.method,
            # the settings of the method that ran: the other's are defaults it never read
            **(
                {"k": ",".join(map(str, cfg.k))}
                if cfg.method == "exhaustive"
                else {"greedy_size": cfg.greedy_size, "greedy_init": cfg.greedy_init}
            ),
            "lo": cfg.lo,
            "hi": cfg.hi,
            "threshold_range": f"{lo},{hi}",
            "widened": widened,
            "n_models": lib.n_models,
            "n_tiles_selection": sel.n_tiles,
            "n_tiles_check": chk.n_tiles,
            "seed": cfg.seed,
            "best_members": best_d["members"],
            "best_single": single_d["members"],
            "submit": decision["submit"],
            "rules": ",".join(cfg.rules),
            "empty_tile": cfg.empty_tile,
            "best_rule": best_d["rule"],
            # what best_ensemble.json applies: a threshold, or (vote rule) a vote count
            **_decision_params(best_d),
        }
        scalars = {
            f"{who}_{split}_dice": d[f"{split}_dice"]
            for who, d in (("ensemble", best_d), ("single", single_d))
            for split in SPLITS
            if f"{split}_dice" in d
        }
        scalars.update(
            {
                f"rule_{name}_{split}_dice": row[f"{split}_dice"]
                for name, row in rule_rows.items()
                for split in SPLITS
                if f"{split}_dice" in row
            }
        )
        for split, g in gain.items():
            if g is not None:
                scalars.update({f"gain_{split}_{k}": g[k] for k in ("estimate", "low", "high")})
    moved: list[bool] = []  # [True] once every output is in --out
    run_id = None
    try:
        _publish(stage, out, moved)
        if cfg.tracking_uri:
            run_id = _log_mlflow(cfg, params, scalars, files)
    except KeyboardInterrupt as err:
        if moved:
            raise InterruptedAfterPublishing(f"the outputs are in {out}") from err
        raise
    return SearchSummary(
        best=best_d,
        best_single=single_d,
        table=table,
        files=files,
        mlflow_run_id=run_id,
        seconds=time.perf_counter() - t0,
        gain=gain,
        decision=decision,
        threshold_range=(lo, hi),
        widened=widened,
        single_range=single_searched,
        rules=rule_rows,
        test_left_out=test_left_out,
    )


def _config_record(cfg: SearchConfig) -> dict:
    """The config as ``summary.json`` records it: ``k`` null for a greedy run.

    A greedy run never reads ``k`` (the CLI refuses -k with --method greedy; its sizes are
    its steps, up to ``greedy_size``), so its default read as the size the run searched. The
    greedy settings, named as such, keep their values in an exhaustive run's record.
    """
    return {**asdict(cfg), **({"k": None} if cfg.method == "greedy" else {})}


def _decision_params(row: dict) -> dict:
    """The MLflow params that say how the best ensemble decides, as its spec does: under the
    vote rule ``best_votes`` and ``best_member_thresholds`` (no ensemble threshold), else
    ``best_threshold`` (and the members' own thresholds of the empty-tile rule)."""
    out = {}
    if row["rule"] == "vote":
        out["best_votes"] = row["votes"]
    else:
        out["best_threshold"] = row["threshold"]
    if "member_thresholds" in row:
        out["best_member_thresholds"] = ",".join(map(str, row["member_thresholds"]))
    return out


def _fmt(value: float, iv: dict | None, signed: bool = False) -> str:
    if iv is None:
        return f"{value:{'+.4f' if signed else '.4f'}}"
    return stats.format_interval(iv, value, signed=signed)


def _rule_cut(d: dict) -> str:
    """How a rule row decides, in a few characters: ``@ t=0.4510 w=1,2`` or ``>= 2 votes``."""
    if d["rule"] == "vote":
        cut = f">= {d['cut']} of {d['k']} votes"
    else:
        cut = f"@ t={metrics.threshold_text(d['threshold'])}"
        if d["rule"] == "weighted":
            cut += " w=" + ",".join(map(str, d["weights"]))
    if d["empty_votes"]:
        cut += f", empty if >= {d['empty_votes']} masks < {d['empty_area']} px"
    return cut


def summary_lines(s: SearchSummary) -> list[str]:
    """The job's result for a terminal: both choices with intervals, the gain, the decision."""
    lines = []
    for who, d in (("ensemble", s.best), ("best single", s.best_single)):
        ivs = d.get("intervals", {})
        scores = ", ".join(
            f"{split} {_fmt(d[f'{split}_dice'], ivs.get(split))}"
            for split in SPLITS
            if f"{split}_dice" in d
        )
        cut = _rule_cut(d) if "cut" in d else f"@ t={metrics.threshold_text(d['threshold'])}"
        lines.append(f"{who:12s} {d['members']} {cut}: {scores}")
    for name, d in s.rules.items():
        ivs = d.get("intervals", {})
        scores = ", ".join(
            f"{split} {_fmt(d[f'{split}_dice'], ivs.get(split))}"
            for split in SPLITS
            if f"{split}_dice" in d
        )
        lines.append(f"{'rule ' + name:12s} {d['members']} {_rule_cut(d)}: {scores}")
    gains = ", ".join(
        f"{split} {_fmt(g['estimate'], g, signed=True)}" for split, g in s.gain.items() if g
    )
    if gains:
        lines.append(f"{'gain':12s} ensemble - best single (paired, 95%): {gains}")
    if s.test_left_out:
        lines.append(f"{'test':12s} column left out: {s.test_left_out}")
    lo, hi = s.threshold_range
    if s.widened:
        lines.append(
            f"{'thresholds':12s} a choice lay on the edge of the default sweep, widened to "
            f"[{lo:.2f}, {hi:.2f}]"
        )
    if s.single_range:
        lo, hi = s.single_range
        lines.append(
            f"{'single':12s} no threshold L/255 of one map lay in the range asked for, so the "
            f"best single model was searched in [{lo}, {hi:.6f}]"
        )
    if s.decision:
        what = "the ensemble" if s.decision["submit"] == "ensemble" else "the best single model"
        lines.append(f"{'submit':12s} {what} ({s.decision['reason']}): {s.decision['spec']}")
    return lines

"""REPORT.md of a pipeline run: what each stage found, on the data it was chosen on and on
held-out data, so the optimism of every selection is visible.

Every score carries a 95% cluster-bootstrap interval over source images, and every comparison
of two models (or two thresholds) on the same tiles a paired one (:mod:`bldseg.stats`): an
interval that contains 0 is no evidence of a difference. :func:`compare_arms` does the same
for experiments repeated over seeds (``experiments/compare_noisy.py``).
"""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from bldseg import metrics, stats
from bldseg.train.config import RunConfig
from bldseg.train.coteaching import first_dropping_epoch
from bldseg.train.plots import save_figure

__all__ = ["TileScores", "compare_arms", "tile_scores", "write_report"]

INTERVAL_NOTE = (
    "Intervals: `estimate [low, high]` is a 95% bootstrap interval that resamples source "
    "images (tiles of one image move together; `bldseg.stats`); a Δ is a *paired* difference "
    "on the same tiles, and an interval that contains 0 is no evidence of a difference. A best "
    "trial's validation Dice is also the maximum over many trials and epochs: its optimism is "
    "not in the interval, the held-out columns show it."
)


@dataclass
class TileScores:
    """Per-tile official Dice of one model at one threshold on one split."""

    dice: np.ndarray  # (T,) float64, NaN where prediction and truth are both empty
    tile_ids: np.ndarray  # (T,) str
    image_ids: np.ndarray  # (T,) str: the source image of each tile (the resampled unit)

    def interval(self) -> stats.Interval | None:
        """Mean Dice with its bootstrap interval; None when no tile has a defined score."""
        if not np.isfinite(self.dice).any():
            return None
        return stats.bootstrap_mean(self.dice, self.image_ids)

    def minus(self, other: TileScores) -> stats.Interval | None:
        """Paired difference ``self - other``; None unless both hold the same tiles."""
        if self.tile_ids.shape != other.tile_ids.shape or not np.array_equal(
            self.tile_ids, other.tile_ids
        ):
            return None
        if not (np.isfinite(self.dice).any() and np.isfinite(other.dice).any()):
            return None
        return stats.paired_difference(self.dice, other.dice, self.image_ids)


def tile_scores(npz: str | os.PathLike, threshold: float) -> TileScores | None:
    """Per-tile Dice of a model's library (``val_probs.npz``, ``test_probs.npz``) at a threshold.

    Returns:
        The scores, or None when the file does not exist.
    """
    npz = Path(npz)
    if not npz.is_file():
        return None
    with np.load(npz) as z:
        level = metrics.level_from_threshold(float(threshold))
        dice = metrics.dice_per_image(z["probs"] >= level, z["truth"].astype(bool))
        # Resample by source scene when the library records it (tiles of one scene are not
        # independent), else by sample.
        groups = z["group_ids"] if "group_ids" in z else z["image_ids"]
        return TileScores(dice, z["tile_ids"].astype(str), groups.astype(str))


def compare_arms(
    arms: dict[str, Sequence[TileScores]], baseline: str, *, seeds: Sequence[int] | None = None
) -> dict:
    """Arms of an experiment (e.g. plain BCE vs co-teaching), each trained with several seeds
    and scored on the same tiles: per arm a mean with its interval, per other arm the paired
    difference from ``baseline``.

    Two kinds of luck, two intervals. ``interval``: the seeds of an arm are pooled and the
    bootstrap resamples source images, each drawn image bringing its tiles' scores under every
    seed; it covers which test images were drawn, and the estimate is the mean over seeds and
    tiles. Seed ``i`` of an arm is paired with seed ``i`` of the baseline (same split, crops
    and initialisation), tile by tile. ``seed_interval``: Student's t interval over the
    per-seed scores (or differences); it covers training randomness. A
    difference is ``beyond_noise`` only when both of its intervals exclude 0 on the same side.

    Args:
        arms: Arm name -> one :class:`TileScores` per seed, all on the same tiles.
        baseline: The arm the others are compared with.
        seeds: The seeds, in the order of each arm's list (for the record only).

    Returns:
        ``{"arms": {name: {"per_seed", "mean_of_seeds", "interval", "seed_interval"}},
        "differences": {name: {"interval", "seed_interval", "per_seed", "beyond_noise"}},
        "baseline", "seeds"}``; intervals as :meth:`bldseg.stats.Interval.to_dict`.

    Raises:
        ValueError: Arms with different numbers of seeds or different tiles.
    """
    if baseline not in arms:
        raise ValueError(f"baseline {baseline!r} is not one of the arms {sorted(arms)}")
    n = {len(v) for v in arms.values()}
    if len(n) != 1 or 0 in n:
        raise ValueError(f"every arm needs the same (non-zero) number of seeds, got {n}")
    ref = arms[baseline][0]
    for name, runs in arms.items():
        for r in runs:
            if not np.array_equal(r.tile_ids, ref.tile_ids):
                raise ValueError(f"arm {name!r} was scored on other tiles than {baseline!r}")

    def pooled(runs: Sequence[TileScores]) -> tuple[np.ndarray, np.ndarray]:
        return (
            np.concatenate([r.dice for r in runs]),
            np.concatenate([r.image_ids for r in runs]),
        )

    def official(r: TileScores) -> float:
        valid = np.isfinite(r.dice)
        return float(r.dice[valid].mean()) if valid.any() else 1.0

    out: dict = {"baseline": baseline, "seeds": list(seeds or []), "arms": {}, "differences": {}}
    base_dice, groups = pooled(arms[baseline])
    for name, runs in arms.items():
        dice, g = pooled(runs)
        per_seed = [official(r) for r in runs]
        out["arms"][name] = {
            "per_seed": per_seed,
            "mean_of_seeds": float(np.mean(per_seed)),
            "interval": stats.bootstrap_mean(dice, g).to_dict()
            if np.isfinite(dice).any()
            else None,
            "seed_interval": stats.mean_interval(per_seed).to_dict(),
        }
        if name != baseline:
            diffs = [
                a - b for a, b in zip(per_seed, out["arms"][baseline]["per_seed"], strict=True)
            ]
            tiles_iv = stats.paired_difference(dice, base_dice, groups)
            seeds_iv = stats.mean_interval(diffs)
            out["differences"][name] = {
                "interval": tiles_iv.to_dict(),
                "seed_interval": seeds_iv.to_dict(),
                "per_seed": diffs,
                "beyond_noise": bool(
                    (tiles_iv.low > 0 and seeds_iv.low > 0)
                    or (tiles_iv.high < 0 and seeds_iv.high < 0)
                ),
            }
    return out


# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------


def _f(v) -> str:
    return "–" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.4f}"


def _iv(iv: stats.Interval | dict | None, value: float | None = None, signed: bool = False) -> str:
    """``estimate [low, high]``; ``value`` replaces the estimate (the exact official score).

    A ``value`` outside ``[low, high]`` cannot be the score the interval was computed for (a
    different threshold or library): it is printed with a warning sign and the interval's own
    estimate, never silently beside an interval that does not hold it. An interval without
    ends (one source image or seed) says so (:func:`bldseg.stats.format_interval`).
    """
    if iv is None:
        return _f(value) if value is not None else "–"
    d = iv.to_dict() if isinstance(iv, stats.Interval) else iv
    f = "+.4f" if signed else ".4f"
    cell = stats.format_interval(d, value, signed=signed)
    if d["low"] is None or d["high"] is None or not np.isfinite([d["low"], d["high"]]).all():
        return cell  # no ends (inf, NaN, or null read back from JSON) to hold the value
    if value is not None and not d["low"] - 1e-9 <= value <= d["high"] + 1e-9:
        cell += f" ⚠ outside its interval (estimate {d['estimate']:{f}})"
    return cell


def _err(iv: stats.Interval | dict | None, value: float) -> tuple[float, float]:
    """Error-bar lengths below and above ``value`` (0 without an interval)."""
    if iv is None or np.isnan(value):
        return 0.0, 0.0
    d = iv.to_dict() if isinstance(iv, stats.Interval) else iv
    if d["low"] is None or d["high"] is None or not np.isfinite([d["low"], d["high"]]).all():
        return 0.0, 0.0  # unbounded (one source image: inf, or null as strict JSON writes it)
    return max(0.0, value - d["low"]), max(0.0, d["high"] - value)


def _bars(
    ax,
    groups: list[str],
    series: dict[str, list[float]],
    title: str,
    errors: dict[str, list] | None = None,
) -> None:
    """Grouped bars, with 95% interval error bars where ``errors`` has intervals."""
    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    for i, (label, values) in enumerate(series.items()):
        yerr = None
        if errors and label in errors:
            lo_hi = [_err(iv, v) for iv, v in zip(errors[label], values, strict=True)]
            yerr = np.array(lo_hi, dtype=float).T  # (2, groups)
        bars = ax.bar(
            x + i * width - 0.4 + width / 2, values, width, label=label, yerr=yerr, capsize=3
        )
        ax.bar_label(bars, fmt="%.3f", fontsize=7, label_type="center")
    ax.set_xticks(x, groups)
    ax.set(title=title, ylabel="official Dice")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)


#: Marker of a tune_tau trial by its co-teaching granularity (tau drops tiles or pixels).
_GRANULARITY_MARKERS = {"tile": "s", "pixel": "o"}


def _tau_scatter(ax, trials: pd.DataFrame, granularity: str | None) -> None:
    """Dice of every tune_tau trial against its tau, validation and test in two colours.

    A tile tau and a pixel tau drop different things (whole tiles or the hardest pixels):
    where the search chose the granularity per trial, each has its own marker and legend
    entry; else the granularity the trials shared (``granularity``) is in the axis label.
    """
    col = "config/coteach.granularity"
    if col in trials:
        groups = [(str(g), trials[trials[col] == g]) for g in sorted(trials[col].dropna().unique())]
        xlabel = "tau (forget rate)"
    else:
        groups = [(None, trials)]
        xlabel = (
            f"tau (forget rate, {granularity} granularity)" if granularity else "tau (forget rate)"
        )
    for g, rows in groups:
        marker = _GRANULARITY_MARKERS.get(g, "o")
        for key, split, colour in (
            ("val_dice_best", "validation", "tab:blue"),
            ("test_dice", "held-out test", "tab:orange"),
        ):
            label = f"{split}, {g} tau" if g else split
            ax.scatter(rows["config/coteach.tau"], rows[key], marker=marker, c=colour, label=label)
    ax.set(xlabel=xlabel, ylabel="official Dice", title="tune_tau trials")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def _trial_test_dice(trials_csv: Path, truth_ok: bool) -> pd.DataFrame:
    """Per trial of a stage: val Dice and held-out test Dice at the trial's own threshold."""
    from bldseg.tune.runner import read_trial_table

    t = read_trial_table(trials_csv)
    rows = []
    for _, r in t.iterrows():
        run = Path(r["run_dir"])
        test = np.nan
        if truth_ok and (run / "test_probs.npz").exists() and not np.isnan(r["val_thr_best"]):
            z = np.load(run / "test_probs.npz")
            level = metrics.level_from_threshold(float(r["val_thr_best"]))
            test = metrics.competition_score(z["probs"] >= level, z["truth"].astype(bool))
        rows.append({**r.to_dict(), "test_dice": test})
    return pd.DataFrame(rows)


def _widened_trials(stages: dict) -> tuple[int, int]:
    """Trials (of every stage) whose best epoch's sweep was widened, and trials counted.

    A K-fold trial counts as its out-of-fold library's sweep, the threshold it predicts at
    (:func:`bldseg.pipeline.best_epoch_row`), not the mean over its folds that
    ``history.json`` holds.
    """
    from bldseg.pipeline import best_epoch_row

    widened = counted = 0
    for st in stages.values():
        csv = Path(st["path"]) / "trials.csv"
        if not csv.is_file():
            continue
        for run_dir in pd.read_csv(csv)["run_dir"]:
            run = Path(str(run_dir))
            if not (run / "history.json").is_file():  # a failed trial: no epoch to count
                continue
            counted += 1
            widened += bool(best_epoch_row(run).get("val_thr_widened", 0))
    return widened, counted


#: How the report names a run's loss ("plain BCE" was written whatever the loss).
_LOSS_NAMES = {"bce": "BCE", "dice": "Dice", "bce_dice": "BCE + Dice", "lovasz": "Lovász"}


def _run_config(st: dict) -> RunConfig | None:
    """The run config of a stage's best trial (its ``best.pt``, or a K-fold run's
    ``folds.json``); None where it is unreadable."""
    from bldseg.predict import member_config
    from bldseg.train.engine import load_state

    try:
        run = Path(st["best"]["run_dir"])
    except KeyError:
        return None
    try:
        return RunConfig.from_flat(load_state(run / "best.pt", mmap=True)["config"])
    except (KeyError, OSError, ValueError):
        pass
    try:  # a K-fold run has no best.pt of its own: its folds.json records its folds' config
        return member_config(run)[0]
    except (KeyError, OSError, ValueError):
        return None


def _run_history(st: dict) -> list[dict] | None:
    """The epoch rows of a stage's best trial (its ``history.json``); None where unreadable."""
    try:
        return json.loads((Path(st["best"]["run_dir"]) / "history.json").read_text())
    except (KeyError, OSError, ValueError):
        return None


def _run_best_epoch(st: dict) -> int | None:
    """The epoch a stage's best trial's saved model is from, as the pipeline reads the trial
    (:func:`bldseg.pipeline.best_epoch_row`: for a K-fold run, the best epoch of the means over
    its folds); None where its history is unreadable or holds no validation Dice."""
    from bldseg.pipeline import best_epoch_row

    try:
        return int(best_epoch_row(Path(st["best"]["run_dir"]))["epoch"])
    except (KeyError, OSError, RuntimeError, ValueError):
        return None


class _Idle(NamedTuple):
    """Why a co-teaching run's saved model trained (partly) as plain training."""

    why: str
    throughout: bool  # nothing dropped in any epoch up to the one its saved model is from
    best_epoch: int | None = None  # set where it dropped only after that epoch


def _coteaching_idle(
    cfg: RunConfig | None, history: list[dict] | None, best_epoch: int | None = None
) -> _Idle | None:
    """Where co-teaching dropped nothing in epochs past the first, or nothing by ``best_epoch``
    (the epoch the saved model is from: later epochs that dropped did not make it).

    The first epoch (R(0) = 1) keeps everything by design and is not counted against a run;
    a saved model from it trained two plain networks all the same.
    """
    if cfg is None or not cfg.coteach.enabled:
        return None
    ct, b = cfg.coteach, cfg.batch_size
    if ct.tau <= 0:
        return _Idle(f"tau {ct.tau:g}: no tile or pixel is dropped", True)
    # samples ranked per batch: tiles, or every pixel of the batch's crops
    n = b if ct.granularity == "tile" else b * cfg.aug.crop_size**2
    # the 0-based epoch from which floor(n * tau * min(T / t_k, 1)) >= 1; the ramp ends at t_k
    formula = first_dropping_epoch(ct, n, ct.t_k + 1)
    if formula is None:  # not even at the ramp's end
        return _Idle(
            f"{ct.granularity} co-teaching with tau {ct.tau:.2f} and batch_size {b} drops "
            f"floor({ct.tau * n:.2f}) = 0 {ct.granularity}s per batch: it dropped nothing",
            True,
        )
    # Per epoch what the run recorded (dropped_share); for rows of older runs, which have
    # none, the formula stands in.
    rows = history if history is not None else [{"epoch": e + 1} for e in range(cfg.epochs)]
    if not rows:
        return None
    dropped = [
        r["dropped_share"] > 0 if "dropped_share" in r else r["epoch"] - 1 >= formula for r in rows
    ]
    source = (
        "the dropped_share its history records"
        if all("dropped_share" in r for r in rows)
        else f"floor({n} * {ct.tau:g} * min(T / {ct.t_k}, 1)) = 0 in 0-based epoch T < {formula}"
    )
    what = f"{ct.granularity} co-teaching with tau {ct.tau:.2f}, t_k {ct.t_k} and batch_size {b}"
    if not any(dropped):
        return _Idle(f"{what} dropped nothing in its {len(rows)} epochs ({source})", True)
    first = rows[dropped.index(True)]["epoch"]
    if best_epoch is not None and first > best_epoch:
        # best.pt was saved before the first epoch that dropped: whatever the later epochs
        # did, the model compared is two networks trained on every tile
        return _Idle(
            f"{what} dropped nothing by its best epoch {best_epoch}, the epoch its saved model "
            f"is from ({source}); it dropped from epoch {first} of {len(rows)} on, and those "
            "epochs scored no higher on validation Dice",
            True,
            best_epoch,
        )
    if first <= 2:
        return None
    return _Idle(f"{what} dropped nothing until epoch {first} of {len(rows)} ({source})", False)


def coteaching_dropped_nothing(
    cfg: RunConfig | None, history: list[dict] | None = None, best_epoch: int | None = None
) -> str | None:
    """Why a run configured for co-teaching trained as plain training (in all its epochs, up
    to its best epoch, or until one past the first), or None.

    Tile co-teaching keeps ceil(R(T) * batch_size) tiles per batch, i.e. drops
    floor(batch_size * tau * min(T / t_k, 1)): with the CPU demo's small batches a tau below
    1 / batch_size drops none at all, and a long ramp none for its first epochs, while the two
    networks train on every tile (``fit`` warns, but inside a search the warning stays in Ray's
    worker log). Presented as co-teaching, such a row would credit co-teaching with what two
    plain networks did.

    Args:
        cfg: The run's config (None: unknown).
        history: The run's epoch rows: what each epoch recorded as ``dropped_share`` decides;
            rows without it (older runs), or no history (``cfg.epochs`` epochs), are judged
            by the formula above.
        best_epoch: The epoch the run's saved model (``best.pt``) is from: where nothing was
            dropped by then, the model is two plain networks even if later epochs dropped.
            None: every epoch of ``history`` counts.

    Returns:
        ``"... dropped nothing ..."``, ``"... dropped nothing by its best epoch N ..."`` or
        ``"... dropped nothing until epoch N of E ..."`` (epochs counted from 1, as the
        history counts them), or None.
    """
    idle = _coteaching_idle(cfg, history, best_epoch)
    return idle.why if idle else None


def coteaching_model_note(history: list[dict] | None, folds: bool = False) -> str:
    """Which network a co-teaching trial's model is, with its peer g's best validation Dice
    (the highest ``val_dice_best_peer`` of ``history``), for the line under the report's
    co-teaching table.

    Args:
        history: The trial's epoch rows (None: unreadable).
        folds: A K-fold trial, whose rows are means over its folds.
    """
    if history and any("val_net" in r for r in history):
        # an older bldseg kept the better network each epoch (bldseg.train.engine warns too)
        nets = sorted({str(r["val_net"]) for r in history if "val_net" in r})
        return (
            "This trial was trained by an older bldseg, which kept the better of its networks f "
            f"and g each epoch (its epochs' models: {', '.join(nets)}): its model is not network "
            "f throughout, and the validation Dice above is a best of two."
        )
    peer = [r for r in history or () if isinstance(r.get("val_dice_best_peer"), int | float)]
    if peer:
        best = max(peer, key=lambda r: r["val_dice_best_peer"])  # the first of equals
        mean = ", mean over its folds" if folds else ""
        g = f"{_f(best['val_dice_best_peer'])} (epoch {best['epoch']}{mean})"
    else:
        g = "not recorded (no val_dice_best_peer in the trial's history.json)"
    return (
        "co-teaching's model is its network f (never the better of f and g); g's best "
        f"validation Dice: {g}"
    )


def _stage_scores(st: dict, has_truth: bool) -> dict[str, dict[str, TileScores | None]]:
    """Per-tile scores of a stage's best model: split -> threshold rule -> scores."""
    run = Path(st["best"]["run_dir"])
    v = st.get("val_thresholds", {})
    thresholds = {"sweep": st["best"]["val_thr_best"], "05": 0.5}
    if "val_thr_youden" in v:
        thresholds["youden"] = v["val_thr_youden"]
    out = {"val": {k: tile_scores(run / "val_probs.npz", t) for k, t in thresholds.items()}}
    if has_truth:
        out["test"] = {k: tile_scores(run / "test_probs.npz", t) for k, t in thresholds.items()}
    return out


def _interval(s: TileScores | None) -> stats.Interval | None:
    return s.interval() if s is not None else None


def _minus(a: TileScores | None, b: TileScores | None) -> stats.Interval | None:
    return a.minus(b) if a is not None and b is not None else None


def _cut(row: dict, prefix: str = "") -> str:
    """How an ensemble decides, for a cell: its threshold (floored to 4 decimals, so that it
    types back to its level, :func:`metrics.threshold_text`), or for the vote rule (which has
    none: each member's mask at its own threshold) the votes a pixel needs."""
    if row.get("rule") == "vote" or row.get("votes"):
        votes = row.get("votes", row.get("cut"))
        of = f" of {row['k']}" if "k" in row else ""
        return f">= {votes}{of} votes"
    return f"{prefix}{metrics.threshold_text(row['threshold'])}"


def _sweep_range(cfg: dict) -> tuple[float, float]:
    base = cfg.get("base", {})
    return (
        float(base.get("threshold_lo", RunConfig.threshold_lo)),
        float(base.get("threshold_hi", RunConfig.threshold_hi)),
    )


def write_report(state: dict, out: str | os.PathLike, has_truth: bool) -> Path:
    """Writes ``<out>/REPORT.md`` and its plots under ``<out>/report/``."""
    out = Path(out)
    assets = out / "report"
    stages = state["stages"]
    names = list(stages)
    cfg = state["config"]
    lo, hi = _sweep_range(cfg)
    wide_lo, wide_hi = metrics.widened_range(lo, hi)
    scores = {s: _stage_scores(stages[s], has_truth) for s in names}
    lines = [
        f"# bldseg pipeline report: {cfg['name']}",
        "",
        "Generated by `experiments/pipeline.py` from a real run; the numbers are whatever that",
        "run produced. *Validation* Dice is measured on the validation tiles (drawn from the",
        "training images, so their masks carry the same label noise); *test* Dice on the",
        "held-out test split with clean masks, never used for any choice.",
        "",
        INTERVAL_NOTE,
        "",
        "## Configuration",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    for k in ("data", "trials", "epochs", "cpus_per_trial", "k_min", "k_max", "seed"):
        lines.append(f"| {k} | {cfg[k] if cfg[k] is not None else 'built-in synthetic world'} |")
    lines.append(f"| fixed run config | `{cfg['base']}` |")
    lines.append(
        f"| threshold sweep | [{lo:.2f}, {hi:.2f}], widened to [{wide_lo:.2f}, {wide_hi:.2f}] "
        "when the best threshold lies on an edge |"
    )
    walls = [float(stages[s]["wall_s"]) for s in names if "wall_s" in stages[s]]
    if walls:
        ens = state.get("ensemble", {}).get("seconds")
        total = sum(walls) + (float(ens) if ens else 0.0)
        lines.append(
            f"| wall time of the searches{' and the ensemble search' if ens else ''} "
            f"| {total:.0f} s ({total / 60:.0f} min) |"
        )
    if "wall_s_last_call" in state:
        # a rerun that only rewrote the report takes seconds: not the pipeline's time
        lines.append(f"| wall time of the last pipeline call | {state['wall_s_last_call']:.0f} s |")

    # 1. best single model per stage
    val = [stages[s]["best"]["val_dice_best"] for s in names]
    test = [stages[s].get("test", {}).get("test_dice_sweep", np.nan) for s in names]
    val_iv = [_interval(scores[s]["val"]["sweep"]) for s in names]
    test_iv = [_interval(scores[s].get("test", {}).get("sweep")) for s in names]
    fig, ax = plt.subplots(figsize=(7, 4))
    _bars(
        ax,
        names,
        {"validation (chosen on)": val, "held-out test": test},
        "Best single model per search stage (95% intervals)",
        {"validation (chosen on)": val_iv, "held-out test": test_iv},
    )
    save_figure(fig, assets / "stages.png")
    lines += [
        "",
        "## Best single model per search stage",
        "",
        "| stage | trials | wall (s) | overhead | best val Dice | threshold | "
        "val Δ vs the stage it started from | test Dice | test Δ vs the stage it started from "
        "| carried forward |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, s in enumerate(names):
        st = stages[s]
        thr = metrics.threshold_text(st["best"]["val_thr_best"])
        if st.get("val_thresholds", {}).get("val_thr_widened"):
            thr += " (widened)"
        delta = val_delta = "–"
        # the stage whose configuration this search started from (bldseg.pipeline records
        # it; states without the record carried every stage, so it was the one before)
        start = st.get("started_from", names[i - 1] if i else None)
        carried = "yes" if st.get("carried_forward", True) else "no: not above the best so far"
        if start in scores:
            # The carry decision compares the two best trials' validation Dice as numbers
            # (bldseg.pipeline.carries_forward); the paired interval says whether that gap is
            # more than the validation tiles' noise, which a bare "yes" hid.
            dv = _minus(scores[s]["val"]["sweep"], scores[start]["val"]["sweep"])
            if dv is not None:
                val_delta = f"{_iv(dv, signed=True)} (vs {start})"
                if carried == "yes" and not dv.low > 0:
                    carried = "yes (the val Δ is within noise)"
            if has_truth:
                d = _minus(scores[s]["test"]["sweep"], scores[start]["test"]["sweep"])
                delta = f"{_iv(d, signed=True)} (vs {start})"
        lines.append(
            f"| {s} | {cfg['trials']} | {st['wall_s']:.0f} | {100 * st['overhead']:.0f}% | "
            f"{_iv(val_iv[i], st['best']['val_dice_best'])} | {thr} | {val_delta} | "
            f"{_iv(test_iv[i], st.get('test', {}).get('test_dice_sweep'))} | {delta} | "
            f"{carried} |"
        )
    lines += ["", "![stages](report/stages.png)", ""]
    # a stage's best configuration is carried forward only when it beats the best so far on
    # validation Dice (bldseg.pipeline.carries_forward; states without the record: all were)
    carried = [s for s in names if stages[s].get("carried_forward", True)]
    lines.append(
        "Best configuration carried forward"
        + (f" (from {', '.join(carried)})" if carried != names else "")
        + ": `"
        + str(
            {
                k: round(v, 4) if isinstance(v, float) else v
                for s in carried
                for k, v in stages[s]["best_config"].items()
            }
        )
        + "`"
    )

    # 2. plain BCE vs co-teaching: the tau search against the configuration it started from
    start = stages.get("tune_tau", {}).get("started_from") or "tune_sched"
    if start in stages and "tune_tau" in stages:
        plain, cot = stages[start], stages["tune_tau"]
        sp, sc = scores[start], scores["tune_tau"]
        plain_cfg, cot_cfg = _run_config(plain), _run_config(cot)
        loss = _LOSS_NAMES.get(plain_cfg.loss, plain_cfg.loss) if plain_cfg else "loss"
        # the tau trial's model is its best.pt: epochs after the best one do not count
        cot_hist = _run_history(cot)
        idle = _coteaching_idle(cot_cfg, cot_hist, _run_best_epoch(cot))
        if idle is None or not idle.throughout:
            cot_name = "co-teaching"
        elif idle.best_epoch is not None:
            cot_name = f"two networks, nothing dropped by its best epoch {idle.best_epoch}"
        else:
            cot_name = "two networks, nothing dropped"
        # wrapped: the longer names ran into each other and into the next plot
        labels = [
            textwrap.fill(label, 24)
            for label in (f"plain {loss} (best of {start})", f"{cot_name} (best of tune_tau)")
        ]
        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        _bars(
            axes[0],
            labels,
            {
                "validation": [plain["best"]["val_dice_best"], cot["best"]["val_dice_best"]],
                "held-out test": [
                    plain.get("test", {}).get("test_dice_sweep", np.nan),
                    cot.get("test", {}).get("test_dice_sweep", np.nan),
                ],
            },
            "Plain BCE vs co-teaching (95% intervals)",
            {
                "validation": [_interval(sp["val"]["sweep"]), _interval(sc["val"]["sweep"])],
                "held-out test": [
                    _interval(sp.get("test", {}).get("sweep")),
                    _interval(sc.get("test", {}).get("sweep")),
                ],
            },
        )
        tau = _trial_test_dice(Path(cot["path"]) / "trials.csv", has_truth)
        if "config/coteach.tau" in tau:
            fixed = cot_cfg.coteach.granularity if cot_cfg else None
            _tau_scatter(axes[1], tau, fixed)
        save_figure(fig, assets / "coteaching.png")
        d_val = _minus(sc["val"]["sweep"], sp["val"]["sweep"])
        d_test = _minus(sc.get("test", {}).get("sweep"), sp.get("test", {}).get("sweep"))
        rows = []
        for label, st, sco in (
            (f"plain {loss} (best {start} trial)", plain, sp),
            (f"{cot_name} (best tune_tau trial)", cot, sc),
        ):
            val_cell = _iv(_interval(sco["val"]["sweep"]), st["best"]["val_dice_best"])
            test_cell = _iv(
                _interval(sco.get("test", {}).get("sweep")),
                st.get("test", {}).get("test_dice_sweep"),
            )
            rows.append(f"| {label} | {val_cell} | {test_cell} |")
        val_delta = _iv(d_val, signed=True) if d_val else "– (different validation tiles)"
        lines += [
            "",
            "## Plain BCE vs co-teaching",
            "",
            "| model | val Dice | test Dice |",
            "|---|---|---|",
            *rows,
            f"| Δ {cot_name} − plain (paired) | {val_delta} | {_iv(d_test, signed=True)} |",
            "",
        ]
        if cot_cfg is None or cot_cfg.coteach.enabled:
            # The tau trial's Dice above is f's: g, validated beside it, is never chosen, which
            # a reader comparing to a best-of-two (older runs, papers) needs to be told.
            cot_dir = Path(cot["best"]["run_dir"])
            lines += [coteaching_model_note(cot_hist, (cot_dir / "folds.json").is_file()), ""]
        lines += [
            "![co-teaching](report/coteaching.png)",
            "",
        ]
        if idle is not None and idle.best_epoch is not None:
            lines += [
                "**The best tune_tau trial's saved model applied no co-teaching**: "
                f"{idle.why}. Its best.pt holds two networks trained on every tile, so this "
                "comparison measures no co-teaching.",
                "",
            ]
        elif idle is not None and idle.throughout:
            lines += [
                f"**The best tune_tau trial applied no co-teaching**: {idle.why}, so its two "
                "networks trained on every tile; this comparison measures no co-teaching. "
                "Pixel granularity, or batch_size >= 1 / tau and coteach.t_k <= tau * "
                "batch_size, drops what tau asks for.",
                "",
            ]
        elif idle is not None:
            lines += [
                f"**The best tune_tau trial applied co-teaching late**: {idle.why}; before then "
                "its two networks trained on every tile. coteach.t_k <= tau * batch_size drops "
                "from the second epoch on.",
                "",
            ]
        lines += [
            "The two are not the same budget-matched experiment (the tau search starts from "
            f"the best configuration so far, {start}'s, one seed each); "
            "`experiments/compare_noisy.py` runs the controlled one over several seeds.",
        ]

    # 3. thresholds of the best single model: the best trial of the last stage carried forward
    # (the incumbent), not of the last stage searched, which may have found nothing better
    final = carried[-1] if carried else names[-1]
    last = stages[final]
    if "val_thresholds" in last:
        v, t = last["val_thresholds"], last.get("test", {})
        sl = scores[final]
        rules = [("05", "fixed 0.5", 0.5), ("sweep", "best of sweep", v["val_thr_best"])]
        rules.append(("youden", "Youden's index", v["val_thr_youden"]))
        val_vals = [v["val_dice_05"], v["val_dice_best"], v["val_dice_youden"]]
        test_vals = [t.get(f"test_dice_{k}", np.nan) for k in ("05", "sweep", "youden")]
        widened = bool(v.get("val_thr_widened"))
        sweep_label = (
            f"sweep ({wide_lo:.2f}-{wide_hi:.2f}, widened)"
            if widened
            else f"sweep ({lo:.2f}-{hi:.2f})"
        )
        fig, ax = plt.subplots(figsize=(7, 4))
        _bars(
            ax,
            ["0.5", sweep_label, "Youden"],
            {"validation (chosen on)": val_vals, "held-out test": test_vals},
            f"Thresholds of the best {final} trial (95% intervals)",
            {
                "validation (chosen on)": [_interval(sl["val"].get(k)) for k, _, _ in rules],
                "held-out test": [_interval(sl.get("test", {}).get(k)) for k, _, _ in rules],
            },
        )
        save_figure(fig, assets / "thresholds.png")
        lines += [
            "",
            f"## Thresholds: 0.5 vs sweep vs Youden (best {final} trial)",
            "",
            f"The model is the best trial of {final}, the last stage whose configuration was "
            "carried forward: the best configuration the searches found on validation Dice.",
            "",
            "| rule | threshold | val Dice | test Dice | val Δ vs 0.5 | test Δ vs 0.5 |",
            "|---|---|---|---|---|---|",
        ]
        for (key, label, thr), vv, tv in zip(rules, val_vals, test_vals, strict=True):
            dv = dt = "–"
            if key != "05":
                dv = _iv(_minus(sl["val"].get(key), sl["val"]["05"]), signed=True)
                st_test = sl.get("test", {})
                dt = _iv(_minus(st_test.get(key), st_test.get("05")), signed=True)
            if key == "sweep" and widened:
                label += " (widened)"
            lines.append(
                f"| {label} | {metrics.threshold_text(thr)} | "
                f"{_iv(_interval(sl['val'].get(key)), vv)} | "
                f"{_iv(_interval(sl.get('test', {}).get(key)), tv)} | {dv} | {dt} |"
            )
        n_wide, n_trials = _widened_trials(stages)
        lines += [
            "",
            f"The sweep covers [{lo:.2f}, {hi:.2f}]: on a small validation set the argmax over "
            "many thresholds fits noise, and a range around 0.5 keeps it from wandering. When "
            "the best threshold sits on an edge, the range cut the curve while it was still "
            f"rising, so the sweep widens to [{wide_lo:.2f}, {wide_hi:.2f}] (see "
            "`docs/thresholds.md`). "
            + (
                "This model's sweep was widened. "
                if widened
                else "This model's best threshold lay inside the range. "
            )
            + f"Widened: {n_wide} of {n_trials} trials (best epoch of each).",
            "",
            "![thresholds](report/thresholds.png)",
        ]

    # 4. best single model vs best ensemble
    ens = state.get("ensemble")
    if ens:
        b, s1 = ens["best"], ens["best_single"]
        gain = ens.get("gain", {})
        b_iv, s_iv = b.get("intervals", {}), s1.get("intervals", {})
        splits = [k for k in ("selection", "check", "test") if f"{k}_dice" in b]
        fig, ax = plt.subplots(figsize=(7, 4))
        _bars(
            ax,
            splits,
            {
                "best single model": [s1[f"{k}_dice"] for k in splits],
                f"best ensemble (k={b['k']})": [b[f"{k}_dice"] for k in splits],
            },
            "Best single model vs best ensemble (95% intervals)",
            {
                "best single model": [s_iv.get(k) for k in splits],
                f"best ensemble (k={b['k']})": [b_iv.get(k) for k in splits],
            },
        )
        save_figure(fig, assets / "ensemble.png")
        t_lo, t_hi = ens.get("threshold_range", (lo, hi))
        lines += [
            "",
            "## Best single model vs best ensemble",
            "",
            "Both chosen on the *selection* half of the validation tiles (split by source "
            "image); the *check* half decides what is submitted (below), the test split was "
            "not used for any choice. Thresholds searched in "
            f"[{t_lo:.2f}, {t_hi:.2f}]"
            + (
                " (widened: a choice lay on the edge of the default range)."
                if ens.get("widened")
                else "."
            ),
            "",
            "| | members | threshold | selection | check | test |",
            "|---|---|---|---|---|---|",
            f"| best single | {s1['members']} | {metrics.threshold_text(s1['threshold'])} | "
            + " | ".join(
                _iv(s_iv.get(k), s1.get(f"{k}_dice")) for k in ("selection", "check", "test")
            )
            + " |",
            f"| best ensemble | {b['members']} | {_cut(b)} | "
            + " | ".join(
                _iv(b_iv.get(k), b.get(f"{k}_dice")) for k in ("selection", "check", "test")
            )
            + " |",
            "| Δ ensemble − single (paired) | | | "
            + " | ".join(_iv(gain.get(k), signed=True) for k in ("selection", "check", "test"))
            + " |",
            "",
            "![ensemble](report/ensemble.png)",
        ]
        if ens.get("test_left_out"):
            lines += [
                "",
                f"**No test column**: the models' test maps were left out: {ens['test_left_out']}.",
            ]
        dec = ens.get("decision")
        if dec:
            what = "the best ensemble" if dec["submit"] == "ensemble" else "the best single model"
            lines += [
                "",
                f"**Submitted: {what}** ({dec['members']}, {_cut(dec, 'threshold ')}). "
                f"Rule: {dec['rule']}. Here: {dec['reason']}.",
            ]
    pred = state.get("predict")
    if pred:
        score = (
            "official score against the held-out ground truth: "
            f"**{_iv(pred.get('test_interval') or None, pred['test_dice'])}** (95% bootstrap "
            "interval over the test images' source scenes)."
            if pred.get("test_dice") is not None
            else "not scored (the test split has no ground truth)."
        )
        lines += [
            "",
            "## Submission",
            "",
            f"`{pred['submission']}`: {pred['members']} model(s), "
            f"{_cut(pred, 'threshold ')}; {score}",
        ]
    path = out / "REPORT.md"
    tmp = path.with_name("REPORT.tmp.md")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path

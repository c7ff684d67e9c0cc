"""Plots people look at (matplotlib PNGs), written next to a run and logged to MLflow.

* ``threshold_curve.png``: official Dice vs threshold, the sweep range shaded, 0.5 / the
  threshold the run predicts at (its recorded choice) / Youden marked;
* ``roc.png``: pixel ROC with Youden's point;
* ``worst_tiles.png``: the validation tiles with the lowest Dice (image, ground truth,
  prediction overlay);
* ``curves.png``: train loss, LR and validation Dice per epoch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: trials and CI have no display
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from bldseg import metrics
from bldseg.io import atomic_path


def save_figure(fig, path: Path, dpi: int = 110) -> Path:
    """Saves and closes a figure, atomically (temporary name, then rename).

    The temporary name is unique to the call (two processes may draw one run folder's plots,
    e.g. K folds trained on several machines) and is removed when the write fails.
    """
    try:
        # the suffix stays: savefig picks the format from it
        with atomic_path(path, suffix=path.suffix) as tmp:
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def plot_threshold_curve(
    probs: np.ndarray,
    truth: np.ndarray,
    path: Path,
    lo: float = 0.3,
    hi: float = 0.7,
    *,
    max_value: int | None = None,
    title: str = "Validation Dice vs threshold",
    chosen: float | None = None,
) -> Path:
    """Dice at every threshold, with 0.5, the chosen threshold and Youden's marked.

    Args:
        probs: (N, S, S) quantised probabilities (or integer sums, with ``max_value``).
        truth: (N, S, S) binary ground truth.
        path: Output PNG.
        lo: Low end of the sweep the threshold was chosen in (shaded).
        hi: High end of the sweep.
        max_value: M of the maps (default: inferred, as :func:`bldseg.metrics.dice_at_levels`).
        title: The plot's title.
        chosen: The threshold the run predicts at (its recorded choice: ties and the widening
            rule decide it, which a plain best of ``[lo, hi]`` does not redo); None: the best
            level of ``[lo, hi]``.
    """
    scores = metrics.dice_at_levels(probs, truth, max_value)
    m = scores.size - 1
    thr = np.arange(m + 1) / m
    if chosen is None:
        level, best = metrics.best_level(scores, m, lo, hi)
    else:
        level = min(metrics.level_from_threshold(chosen, m), m)
        best = float(scores[level])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(thr, scores, color="tab:blue", lw=1.5, label="official Dice")
    ax.axvspan(lo, hi, color="tab:blue", alpha=0.08, label=f"sweep {lo:.2f}-{hi:.2f}")
    s05 = scores[metrics.level_from_threshold(0.5, m)]
    ax.plot([0.5], [s05], "o", color="gray", label=f"0.50: {s05:.4f}")
    # thresholds floored (metrics.threshold_text): the printed value typed back into predict
    # --threshold is the same level (0.412 for 105/255 read back as 106)
    best_label = f"best {metrics.threshold_text(level / m)}: {best:.4f}"
    ax.plot([level / m], [best], "*", ms=12, color="tab:red", label=best_label)
    try:
        ty, _ = metrics.youden_threshold(probs, truth, max_value=max_value)
        sy = scores[metrics.level_from_threshold(ty, m)]
        ax.plot(
            [ty],
            [sy],
            "s",
            color="tab:green",
            label=f"Youden {metrics.threshold_text(ty)}: {sy:.4f}",
        )
    except ValueError:
        pass  # no building or no background pixel: Youden's J is undefined
    ax.set(xlabel="threshold", ylabel="Dice (empty/empty excluded)", title=title, xlim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower center", fontsize=8)
    return save_figure(fig, path)


def plot_roc(probs: np.ndarray, truth: np.ndarray, path: Path) -> Path:
    """Pixel ROC curve with Youden's point."""
    fpr, tpr, thr = metrics.roc_curve(probs, truth)
    j = tpr - fpr
    i = int(np.argmax(j))
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(fpr, tpr, color="tab:blue")
    ax.plot([0, 1], [0, 1], ls="--", color="gray", lw=0.8)
    # floored (metrics.threshold_text): the printed t typed back is the same level
    label = f"Youden t={metrics.threshold_text(float(thr[i]))}, J={j[i]:.3f}"
    ax.plot([fpr[i]], [tpr[i]], "o", color="tab:red", label=label)
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title="Pixel ROC")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_worst_tiles(
    images: np.ndarray,
    truth: np.ndarray,
    pred: np.ndarray,
    path: Path,
    k: int = 8,
    labels: list[str] | None = None,
    ranking: tuple[str, np.ndarray] | None = None,
) -> Path:
    """Grid of the ``k`` tiles with the lowest Dice: image | ground truth | prediction overlay.

    Args:
        images: uint8 (N, S, S, 3).
        truth: (N, S, S) binary.
        pred: (N, S, S) binary prediction.
        path: Output PNG.
        k: Rows.
        labels: Tile ids for the row titles.
        ranking: ``(name, scores)``: the tiles are already ranked by the caller (e.g. the
            smoothed Dice of :mod:`bldseg.train.suspects`); drawn in their given order, each
            titled with its score, instead of re-sorted by plain Dice.
    """
    if ranking is None:
        name, score = "Dice", metrics.dice_per_image(pred.astype(bool), truth.astype(bool))
        order = np.argsort(np.nan_to_num(score, nan=2.0))[:k]
    else:
        name, score = ranking[0], np.asarray(ranking[1], dtype=np.float64)
        if score.shape != (len(images),):
            raise ValueError(f"ranking: expected {len(images)} scores, got shape {score.shape}")
        order = np.arange(min(k, len(images)))
    fig, axes = plt.subplots(len(order), 3, figsize=(7.5, 2.5 * len(order)), squeeze=False)
    for row, i in enumerate(order):
        overlay = images[i].astype(np.float32) / 255.0
        # red: false negative, blue: false positive, green: true positive
        colours = {(1, 0): (1, 0, 0), (0, 1): (0, 0.4, 1), (1, 1): (0, 1, 0)}
        for (g, p), c in colours.items():
            sel = (truth[i] == g) & (pred[i] == p)
            overlay[sel] = 0.45 * overlay[sel] + 0.55 * np.array(c)
        tile = labels[i] if labels is not None else str(i)
        axes[row, 0].imshow(images[i])
        axes[row, 0].set_title(f"{tile}  {name}={score[i]:.3f}", fontsize=8)
        axes[row, 1].imshow(truth[i], cmap="gray", vmin=0, vmax=1)
        axes[row, 1].set_title("ground truth", fontsize=8)
        axes[row, 2].imshow(overlay)
        axes[row, 2].set_title("TP green / FN red / FP blue", fontsize=8)
        for ax in axes[row]:
            ax.axis("off")
    return save_figure(fig, path)


def plot_history(history: list[dict], path: Path) -> Path:
    """Train loss, LR and validation Dice (0.5 / best / Youden) per epoch."""
    ep = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    axes[0].plot(ep, [h["train_loss"] for h in history], "o-")
    axes[0].set(title="train loss", xlabel="epoch")
    axes[1].plot(ep, [h["lr"] for h in history], "o-", color="tab:orange")
    axes[1].set(title="learning rate (end of epoch)", xlabel="epoch")
    for key, label in (
        ("val_dice_05", "t=0.5"),
        ("val_dice_best", "best t"),
        ("val_dice_youden", "Youden t"),
    ):
        axes[2].plot(ep, [h[key] for h in history], "o-", label=label)
    axes[2].set(title="validation Dice", xlabel="epoch")
    axes[2].legend(fontsize=8)
    for ax in axes:
        # epochs are whole: with a few of them the default locator ticks 1.25, 1.5, ...
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    return save_figure(fig, path)


def write_run_plots(
    run_dir: str | os.PathLike, images_for_tiles=None, k: int = 8, lo: float = 0.3, hi: float = 0.7
) -> list[Path]:
    """All plots of a finished run folder (``history.json`` + ``val_probs.npz``).

    Args:
        run_dir: The run folder written by :func:`bldseg.train.engine.fit`.
        images_for_tiles: Callable ``(image_ids, tile_yx, size) -> uint8 (N, S, S, 3)``
            returning the tiles' pixels, for the worst-tiles grid (skipped when None).
        k: Tiles in the worst-tiles grid.
        lo: Low end of the threshold sweep.
        hi: High end of the threshold sweep.

    Returns:
        The PNG paths written under ``run_dir/plots``.
    """
    run_dir = Path(run_dir)
    out = run_dir / "plots"
    written = []
    history_path = run_dir / "history.json"
    if history_path.exists():
        written.append(plot_history(json.loads(history_path.read_text()), out / "curves.png"))
    lib = run_dir / "val_probs.npz"
    if lib.exists():
        z = np.load(lib)
        probs, truth = z["probs"], z["truth"].astype(bool)
        chosen = _recorded_threshold(run_dir)
        written.append(
            plot_threshold_curve(probs, truth, out / "threshold_curve.png", lo, hi, chosen=chosen)
        )
        if truth.any() and not truth.all():
            written.append(plot_roc(probs, truth, out / "roc.png"))
        if images_for_tiles is not None:
            level = metrics.level_from_threshold(0.5 if chosen is None else chosen)
            imgs = images_for_tiles(z["image_ids"], z["tile_yx"], probs.shape[-1])
            written.append(
                plot_worst_tiles(
                    imgs, truth, probs >= level, out / "worst_tiles.png", k, list(z["tile_ids"])
                )
            )
    return written


def _recorded_threshold(run_dir: Path) -> float | None:
    """The threshold the run predicts ``val_probs.npz`` at: a K-fold run's out-of-fold one
    (``folds.json`` ``oof``; ``history.json`` holds means over folds, a mean threshold no
    fold's maps were chosen at), else the best epoch's chosen threshold (the first of equal
    epochs, as fit keeps best.pt); None where the folder records none."""
    folds_path = run_dir / "folds.json"  # bldseg.train.folds.FOLDS_FILE (it imports this module)
    if folds_path.exists():
        oof = json.loads(folds_path.read_text()).get("oof")
        if oof:
            return float(oof["val_thr_best"])
    history_path = run_dir / "history.json"
    history = json.loads(history_path.read_text()) if history_path.exists() else []
    best = max(history, key=lambda h: h["val_dice_best"], default={})
    return float(best["val_thr_best"]) if "val_thr_best" in best else None


def tiles_from_cache(cache):
    """A ``images_for_tiles`` reader for :func:`write_run_plots` over a dataset cache."""
    index = {img_id: i for i, img_id in enumerate(cache.ids)}

    def read(image_ids, tile_yx, size: int) -> np.ndarray:
        return np.stack(
            [
                np.asarray(cache.images[index[str(i)], y : y + size, x : x + size])
                for i, (y, x) in zip(image_ids, tile_yx, strict=True)
            ]
        )

    return read

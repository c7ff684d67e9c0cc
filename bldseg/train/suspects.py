"""Wrong-ground-truth finder: rank training images by how much a trained model disagrees.

The reference team found wrong masks by looking at predictions by hand. Here a trained model
predicts every training image, whole (any size: the models pad to their stride themselves);
images are ranked by a smoothed Dice between the model's binary prediction ``P`` and the mask
``G`` (lowest first; ties by higher BCE)::

    smoothed_dice = (2 |P & G| + smooth) / (|P| + |G| + smooth)

``smooth`` (:data:`DEFAULT_SMOOTH` pixels) is what keeps an image with an empty mask and a
few stray predicted pixels from ranking as the most suspect one: the plain Dice of any
disagreement on an empty mask is 0, as low as a building left out of the mask, while here a
disagreement much smaller than ``smooth`` pixels barely counts and one much larger counts
almost fully (the smoothing term of the soft-Dice loss). The plain Dice is kept beside it.
The ranking is written to a CSV with a contact sheet of the top suspects. On the synthetic
world with injected noise, :func:`precision_at_k` measures how many injected noisy images the
ranking finds.

A model predicting the images it trained on has partly learnt their wrong masks, which hides
them. A K-fold run (``--folds K``) avoids that: :func:`rank_suspects_oof` scores every image
with the fold model that held it out (as the run recorded it:
:func:`bldseg.train.folds.held_out_folds`), at that fold's own threshold (out-of-fold ranking,
as confident-learning tools do).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from bldseg import metrics
from bldseg.data.cache import DatasetCache
from bldseg.io import atomic_path
from bldseg.train.augment import build_eval_transform
from bldseg.train.config import RunConfig
from bldseg.train.engine import eval_autocast, view_logits
from bldseg.train.plots import plot_worst_tiles

#: Pixels added to both sides of the ranking's Dice (see the module docstring): a few stray
#: pixels on an empty mask rank as agreement, a missed 16 x 16 building (256 px) as 0.2.
DEFAULT_SMOOTH = 64.0


def _whole_images(
    cache: DatasetCache, indices: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cached images, whole and normalised as validation tiles are, and their masks.

    Returns:
        ``(images, masks)``: (B, 3, H, W) float and (B, 1, H, W) float 0/1 (None without
        masks).
    """
    normalise = build_eval_transform()
    # (H, W, 3) float per image, normalised like TileDataset's tiles; channel-first below
    images = [normalise(image=np.asarray(cache.images[i]))["image"] for i in indices]
    x = torch.from_numpy(np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2)))
    if cache.masks is None:
        return x, None
    y = torch.from_numpy(np.stack([np.asarray(cache.masks[i]) for i in indices]))
    return x, y[:, None].float()


def smoothed_dice(pred: np.ndarray, truth: np.ndarray, smooth: float) -> np.ndarray:
    """Per-image ``(2 |P & G| + smooth) / (|P| + |G| + smooth)`` of (N, H, W) bool masks.

    With ``smooth`` 0 it is the plain Dice, and 1.0 where both masks are empty.
    """
    n = len(pred)
    p, g = pred.reshape(n, -1), truth.reshape(n, -1)  # (N, H*W)
    inter = (p & g).sum(1).astype(np.float64)  # (N,)
    total = (p.sum(1) + g.sum(1)).astype(np.float64)
    out = np.ones(n)  # empty and empty agree perfectly
    some = total + smooth > 0
    out[some] = (2 * inter[some] + smooth) / (total[some] + smooth)
    return out


@torch.no_grad()
def _predict(
    model: torch.nn.Module,
    x: torch.Tensor,
    threshold: float,
    amp: torch.dtype | None,
    tta: bool,
    y: torch.Tensor | None = None,
) -> tuple[np.ndarray, torch.Tensor | None]:
    """The model's binary masks of ``x`` (B, 3, H, W) as its validation made them, and the
    per-image BCE against ``y`` (B, 1, H, W) when given (the mean over the views).

    A threshold is chosen on validation maps made under the run's autocast, with its flip
    TTA, quantised to uint8 levels and binarised ``>=`` at the level (``engine.predict_probs``,
    ``metrics.binarise``): the masks here are made the same way, so an image's prediction
    at that threshold is the one the threshold was chosen on.

    Returns:
        ``(masks, bce)``: (B, H, W) bool and (B,) float32 (None without ``y``).
    """
    model.eval()
    ctx = torch.autocast(x.device.type, dtype=amp) if amp is not None else nullcontext()
    p, bce, n = 0, 0, 0
    with ctx:
        for logits in view_logits(model, x, tta):  # (B, 1, H, W) float32
            p = p + torch.sigmoid(logits)
            if y is not None:
                bce = bce + F.binary_cross_entropy_with_logits(logits, y, reduction="none").flatten(
                    1
                ).mean(1)  # (B,)
            n += 1
    prob = (p / n)[:, 0].cpu().numpy()  # (B, H, W)
    if not np.isfinite(prob).all():
        raise ValueError(
            "the model's probabilities hold NaN or infinity: its weights are not finite "
            "(the training diverged); rank with another checkpoint"
        )
    masks = metrics.binarise(metrics.quantise(np.clip(prob, 0.0, 1.0)), threshold)
    return masks, (bce / n if y is not None else None)


@torch.no_grad()
def rank_suspects(
    model: torch.nn.Module,
    cache: DatasetCache,
    indices: Sequence[int],
    *,
    threshold: float = 0.5,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    smooth: float = DEFAULT_SMOOTH,
    amp: torch.dtype | None = None,
    tta: bool = False,
) -> pd.DataFrame:
    """Scores every image in ``indices`` by model/mask disagreement (whole images, any size).

    Args:
        model: Maps (B, 3, H, W) normalised images to (B, 1, H, W) logits.
        cache: A cache with masks.
        indices: Cache indices of the images to score.
        threshold: Binarisation threshold of the model's probabilities.
        batch_size: Images per forward pass.
        device: Where to run.
        smooth: Pixels added to both sides of the ranking's Dice (module docstring); 0 ranks
            by the plain Dice.
        amp: The autocast dtype the run validated with (``engine.eval_autocast``).
        tta: Whether the run validated with flip TTA (``cfg.tta``).

    Returns:
        DataFrame sorted most-suspect first: ``img_id, index, smoothed_dice, dice_vs_model,
        bce, mask_pixels, pred_pixels``; ``dice_vs_model`` is the plain Dice (1.0 where
        both are empty); ``bce`` is the mean over the TTA views.

    Raises:
        ValueError: ``smooth`` is negative.
    """
    if smooth < 0:
        raise ValueError(f"smooth={smooth}: the ranking's Dice smoothing is at least 0 pixels")
    indices = [int(i) for i in indices]
    rows = []
    for start in range(0, len(indices), batch_size):
        batch = indices[start : start + batch_size]
        x, y = _whole_images(cache, batch)  # (B, 3, H, W), (B, 1, H, W)
        x, y = x.to(device), y.to(device)
        pred, bce = _predict(model, x, threshold, amp, tta, y)  # (B, H, W), (B,)
        truth = y[:, 0].cpu().numpy().astype(bool)
        ranked = smoothed_dice(pred, truth, smooth)
        dice = smoothed_dice(pred, truth, 0.0)
        for j, i in enumerate(batch):
            rows.append(
                {
                    "img_id": cache.ids[i],
                    "index": i,
                    "smoothed_dice": float(ranked[j]),
                    "dice_vs_model": float(dice[j]),
                    "bce": float(bce[j]),
                    "mask_pixels": int(truth[j].sum()),
                    "pred_pixels": int(pred[j].sum()),
                }
            )
    return _most_suspect_first(pd.DataFrame(rows))


def _most_suspect_first(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(
        ["smoothed_dice", "bce"], ascending=[True, False], kind="stable"
    ).reset_index(drop=True)


def rank_suspects_oof(
    folds: Sequence[tuple[torch.nn.Module, RunConfig, float]],
    cache: DatasetCache,
    held_out: Sequence[int] | np.ndarray,
    *,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    smooth: float = DEFAULT_SMOOTH,
) -> pd.DataFrame:
    """Every image scored by the fold model that did not train on it (a K-fold run).

    Args:
        folds: Per fold, in fold order: its model, its run config and its threshold; each
            fold predicts as its run validated (autocast, TTA: ``cfg.precision``, ``cfg.tta``).
        cache: The training cache the folds were trained on.
        held_out: (N,) the fold that held out each cache image, as the run recorded it
            (:func:`bldseg.train.folds.held_out_folds`); not dealt again from the cache's
            groups, which need not be those the run was trained with (``--group-column``).
        smooth: As :func:`rank_suspects`.

    Returns:
        As :func:`rank_suspects`, plus ``fold`` and ``threshold`` columns; every image once.

    Raises:
        ValueError: The configs are not folds 0..K-1 of one K-fold run, or ``held_out`` does
            not give each cache image one of them.
    """
    k = len(folds)
    if [cfg.fold for _, cfg, _ in folds] != list(range(k)) or any(
        cfg.folds != k for _, cfg, _ in folds
    ):
        raise ValueError(
            f"expected folds 0..{k - 1} of one {k}-fold run, got folds "
            f"{[(cfg.fold, cfg.folds) for _, cfg, _ in folds]} (fold, of K)"
        )
    held_out = np.asarray(held_out)
    if held_out.shape != (len(cache),) or not np.isin(held_out, range(k)).all():
        raise ValueError(
            f"held_out: expected a fold in 0..{k - 1} for each of the {len(cache)} images, got "
            f"shape {held_out.shape} with folds {sorted(set(held_out.ravel().tolist()))}"
        )
    parts = []
    for model, cfg, threshold in folds:
        val_idx = np.flatnonzero(held_out == cfg.fold)
        df = rank_suspects(
            model,
            cache,
            val_idx,
            threshold=threshold,
            batch_size=batch_size,
            device=device,
            smooth=smooth,
            amp=eval_autocast(cfg.precision, torch.device(device)),
            tta=cfg.tta,
        )
        parts.append(df.assign(fold=cfg.fold, threshold=threshold))
    return _most_suspect_first(pd.concat(parts, ignore_index=True))


def write_suspects(
    df: pd.DataFrame,
    cache: DatasetCache,
    model: torch.nn.Module | Sequence[tuple[torch.nn.Module, RunConfig, float]],
    out_dir: str | os.PathLike,
    top: int = 12,
    threshold: float = 0.5,
    device: str | torch.device = "cpu",
    amp: torch.dtype | None = None,
    tta: bool = False,
) -> tuple[Path, Path]:
    """Writes ``suspects.png`` (top suspects: image, mask, model) and ``suspects.csv``.

    ``model`` is one model (predicting at ``threshold`` with ``amp`` and ``tta``, as
    :func:`rank_suspects` did), or the K folds of :func:`rank_suspects_oof`'s ranking: each
    image is then drawn with its own fold's model, settings and threshold (``fold``,
    ``threshold``). Both files are written under temporary names and renamed into place once
    both are whole, the CSV last: a failure leaves the earlier pair (or none) as it was.
    """
    out = Path(out_dir)
    head = df.head(top)
    index = [int(i) for i in head["index"]]
    images = np.stack([np.asarray(cache.images[i]) for i in index])  # (top, H, W, 3)
    masks = np.stack([np.asarray(cache.masks[i]) for i in index])  # (top, H, W)
    per_fold = not isinstance(model, torch.nn.Module)
    x, _ = _whole_images(cache, index)
    x = x.to(device)  # (top, 3, H, W)
    if per_fold:
        preds = []
        for j, row in enumerate(head.itertuples()):
            fold_model, cfg, _ = model[row.fold]
            amp_f = eval_autocast(cfg.precision, torch.device(device))
            preds.append(_predict(fold_model, x[j : j + 1], row.threshold, amp_f, cfg.tta)[0][0])
        pred = np.stack(preds)  # (top, H, W)
    else:
        pred = _predict(model, x, threshold, amp, tta)[0]  # (top, H, W)
    out.mkdir(parents=True, exist_ok=True)
    csv, png = out / "suspects.csv", out / "suspects.png"
    # Both written under temporary names, then renamed: the sheet first, the CSV (what people
    # act on) last, so a run that fails or is stopped while writing leaves the earlier pair.
    with atomic_path(csv, suffix=".csv") as csv_tmp, atomic_path(png, suffix=".png") as png_tmp:
        # "prediction" column = the model; "ground truth" column = the suspect mask
        # Rows in the CSV's order (smoothed Dice), not re-sorted by the plotter's plain Dice.
        plot_worst_tiles(
            images,
            masks,
            pred,
            png_tmp,
            k=top,
            labels=list(head["img_id"]),
            ranking=("smoothed Dice", head["smoothed_dice"].to_numpy()),
        )
        df.to_csv(csv_tmp, index=False)
    return csv, png


def precision_at_k(ranked_ids: Sequence[str], noisy_ids: set[str], k: int | None = None) -> float:
    """Share of the top ``k`` ranked ids that are truly noisy (k defaults to #noisy)."""
    k = k or len(noisy_ids)
    if k == 0:
        raise ValueError("no noisy images to find")
    return len(set(list(ranked_ids)[:k]) & noisy_ids) / k

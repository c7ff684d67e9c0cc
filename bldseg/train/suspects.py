"""Wrong-ground-truth finder: rank training images by how much a trained model disagrees.

The reference team found wrong masks by looking at predictions by hand. Here a trained model
predicts every training image; images are ranked by the Dice between the model's binary
prediction and the mask (lowest first; ties by higher BCE), written to a CSV with a contact
sheet of the top suspects. On the synthetic world with injected noise,
:func:`precision_at_k` measures how many injected noisy images the ranking finds.

A model predicting the images it trained on has partly learnt their wrong masks, which hides
them. A K-fold run (``--folds K``) avoids that: :func:`rank_suspects_oof` scores every image
with the fold model that held it out, at that fold's own threshold (out-of-fold ranking, as
confident-learning tools do).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from bldseg import metrics
from bldseg.data.cache import DatasetCache
from bldseg.data.dataset import TileDataset, fold_indices, split_groups, validation_tiles
from bldseg.train.augment import build_eval_transform
from bldseg.train.config import RunConfig
from bldseg.train.plots import plot_worst_tiles


@torch.no_grad()
def rank_suspects(
    model: torch.nn.Module,
    cache: DatasetCache,
    indices: Sequence[int],
    *,
    threshold: float = 0.5,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
) -> pd.DataFrame:
    """Scores every image in ``indices`` by model/mask disagreement (whole images at once).

    Returns:
        DataFrame sorted most-suspect first: ``img_id, index, dice_vs_model, bce,
        mask_pixels, pred_pixels``.
    """
    model.eval()
    h, w = cache.image_size
    tiles = validation_tiles(cache, indices, min(h, w))  # one tile per (square) image
    ds = TileDataset(cache, tiles, build_eval_transform())
    rows = []
    for start in range(0, len(ds), batch_size):
        items = [ds[i] for i in range(start, min(len(ds), start + batch_size))]
        x = torch.stack([it["image"] for it in items]).to(device)  # (B, 3, H, W)
        y = torch.stack([it["mask"] for it in items]).to(device)  # (B, 1, H, W)
        logits = model(x).float()
        bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none").flatten(1).mean(1)
        pred = (torch.sigmoid(logits) >= threshold)[:, 0].cpu().numpy()
        truth = y[:, 0].cpu().numpy().astype(bool)
        dice = metrics.dice_per_image(pred, truth)
        for j, it in enumerate(items):
            t = tiles[it["tile"]]
            rows.append(
                {
                    "img_id": cache.ids[t.index],
                    "index": t.index,
                    # empty/empty agreement is perfect agreement here
                    "dice_vs_model": 1.0 if np.isnan(dice[j]) else float(dice[j]),
                    "bce": float(bce[j]),
                    "mask_pixels": int(truth[j].sum()),
                    "pred_pixels": int(pred[j].sum()),
                }
            )
    return _most_suspect_first(pd.DataFrame(rows))


def _most_suspect_first(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(
        ["dice_vs_model", "bce"], ascending=[True, False], kind="stable"
    ).reset_index(drop=True)


def rank_suspects_oof(
    folds: Sequence[tuple[torch.nn.Module, RunConfig, float]],
    cache: DatasetCache,
    *,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
) -> pd.DataFrame:
    """Every image scored by the fold model that did not train on it (a K-fold run).

    Args:
        folds: Per fold, in fold order: its model, its run config (``folds``, ``fold``,
            ``split_seed``, ``split_group`` give its validation images) and its threshold.
        cache: The training cache the folds were trained on.

    Returns:
        As :func:`rank_suspects`, plus ``fold`` and ``threshold`` columns; every image once.

    Raises:
        ValueError: The configs are not folds 0..K-1 of one K-fold run.
    """
    k = len(folds)
    if [cfg.fold for _, cfg, _ in folds] != list(range(k)) or any(
        cfg.folds != k for _, cfg, _ in folds
    ):
        raise ValueError(
            f"expected folds 0..{k - 1} of one {k}-fold run, got folds "
            f"{[(cfg.fold, cfg.folds) for _, cfg, _ in folds]} (fold, of K)"
        )
    parts = []
    for model, cfg, threshold in folds:
        groups = split_groups(cache, cfg.split_group)
        _, val_idx = fold_indices(len(cache), cfg.folds, cfg.fold, cfg.split_seed, groups)
        df = rank_suspects(
            model, cache, val_idx, threshold=threshold, batch_size=batch_size, device=device
        )
        parts.append(df.assign(fold=cfg.fold, threshold=threshold))
    return _most_suspect_first(pd.concat(parts, ignore_index=True))


def write_suspects(
    df: pd.DataFrame,
    cache: DatasetCache,
    model: torch.nn.Module | Sequence[torch.nn.Module],
    out_dir: str | os.PathLike,
    top: int = 12,
    threshold: float = 0.5,
    device: str | torch.device = "cpu",
) -> tuple[Path, Path]:
    """Writes ``suspects.csv`` and ``suspects.png`` (top suspects: image, mask, model).

    ``model`` is one model, or the K fold models of :func:`rank_suspects_oof`'s ranking: each
    image is then drawn with its own fold's model and threshold (``fold``, ``threshold``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv = out / "suspects.csv"
    tmp = csv.with_name("suspects.tmp.csv")
    df.to_csv(tmp, index=False)
    os.replace(tmp, csv)
    head = df.head(top)
    images = np.stack([np.asarray(cache.images[i]) for i in head["index"]])
    masks = np.stack([np.asarray(cache.masks[i]) for i in head["index"]])
    ds = TileDataset(
        cache,
        validation_tiles(cache, list(head["index"]), cache.image_size[0]),
        build_eval_transform(),
    )
    per_fold = not isinstance(model, torch.nn.Module)
    with torch.no_grad():
        x = torch.stack([ds[i]["image"] for i in range(len(ds))]).to(device)  # (top, 3, H, W)
        if per_fold:
            preds = []
            for j, row in enumerate(head.itertuples()):
                prob = torch.sigmoid(model[row.fold].eval()(x[j : j + 1]).float())  # (1,1,H,W)
                preds.append((prob >= row.threshold)[0, 0].cpu().numpy())
            pred = np.stack(preds)
        else:
            pred = (torch.sigmoid(model.eval()(x).float()) >= threshold)[:, 0].cpu().numpy()
    # "prediction" column = the model; "ground truth" column = the suspect mask
    png = plot_worst_tiles(
        images, masks, pred, out / "suspects.png", k=top, labels=list(head["img_id"])
    )
    return csv, png


def precision_at_k(ranked_ids: Sequence[str], noisy_ids: set[str], k: int | None = None) -> float:
    """Share of the top ``k`` ranked ids that are truly noisy (k defaults to #noisy)."""
    k = k or len(noisy_ids)
    if k == 0:
        raise ValueError("no noisy images to find")
    return len(set(list(ranked_ids)[:k]) & noisy_ids) / k

"""Losses by name, returning one value per sample (co-teaching ranks samples by it).

Every loss maps logits (B, 1, H, W) and targets (B, 1, H, W) in {0, 1} to (B,). An optional
``weight`` (B, 1, H, W) in {0, 1} restricts a loss to the kept pixels (pixel-level
co-teaching); a sample with no kept pixel contributes 0.

* ``bce``: binary cross-entropy with logits (the reference workflow's loss);
* ``dice``: soft Dice loss, 1 - (2|P∩G| + 1) / (|P| + |G| + 1) on sigmoid probabilities;
* ``bce_dice``: their sum (3rd place's choice);
* ``lovasz``: Lovász hinge (Berman et al., 2018), a convex surrogate of the IoU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _weighted_mean(x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """(B, 1, H, W) -> (B,) mean over the pixels with weight 1."""
    if weight is None:
        return x.flatten(1).mean(1)
    return (x * weight).flatten(1).sum(1) / weight.flatten(1).sum(1).clamp_min(1.0)


def bce_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None):
    """Per-sample mean binary cross-entropy."""
    return _weighted_mean(
        F.binary_cross_entropy_with_logits(logits, target, reduction="none"), weight
    )


def dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    smooth: float = 1.0,
):
    """Per-sample soft Dice loss."""
    p = torch.sigmoid(logits)
    if weight is not None:
        p, target = p * weight, target * weight
    inter = (p * target).flatten(1).sum(1)
    denom = p.flatten(1).sum(1) + target.flatten(1).sum(1)
    return 1.0 - (2.0 * inter + smooth) / (denom + smooth)


def bce_dice_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None):
    """BCE + soft Dice, per sample."""
    return bce_loss(logits, target, weight) + dice_loss(logits, target, weight)


def _lovasz_grad(gt_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovász extension of the Jaccard loss w.r.t. sorted errors: (P,) -> (P,)."""
    gts = gt_sorted.sum()
    intersection = gts - gt_sorted.cumsum(0)
    union = gts + (1.0 - gt_sorted).cumsum(0)
    jaccard = 1.0 - intersection / union
    if gt_sorted.numel() > 1:
        jaccard[1:] = jaccard[1:] - jaccard[:-1]
    return jaccard


def lovasz_hinge_loss(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
):
    """Per-sample Lovász hinge on the pixels with weight 1."""
    losses = []
    for i in range(logits.shape[0]):
        lg, tg = logits[i].reshape(-1), target[i].reshape(-1)
        if weight is not None:
            keep = weight[i].reshape(-1) > 0
            lg, tg = lg[keep], tg[keep]
        if lg.numel() == 0:
            losses.append(logits.sum() * 0.0)
            continue
        signs = 2.0 * tg - 1.0
        errors = 1.0 - lg * signs  # hinge errors, (P,)
        errors_sorted, perm = torch.sort(errors, descending=True)
        losses.append(torch.dot(F.relu(errors_sorted), _lovasz_grad(tg[perm])))
    return torch.stack(losses)


LOSSES: dict[str, LossFn] = {
    "bce": bce_loss,
    "dice": dice_loss,
    "bce_dice": bce_dice_loss,
    "lovasz": lovasz_hinge_loss,
}


def build_loss(name: str) -> LossFn:
    """The per-sample loss called ``name``.

    Raises:
        ValueError: Unknown name (the message lists the known ones).
    """
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; known: {sorted(LOSSES)}") from None


def pixel_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-pixel BCE (B, 1, H, W): how co-teaching ranks pixels."""
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none")

"""Co-teaching (Han et al., NeurIPS 2018) for noisy building masks.

Two networks f and g see the same mini-batch. Each keeps the ``R(T)`` fraction of the batch on
which *its own* loss is smallest (likely clean labels), and the *other* network is updated on
that kept set, so the two filter different errors instead of confirming their own.
``R(T) = 1 - min(T / T_k * tau, tau)`` (:meth:`CoTeachConfig.keep_ratio`).

Granularity ``tile`` ranks whole crops by their mean loss; ``pixel`` ranks the pixels of the
batch by per-pixel BCE (a wrong building outline is a few wrong pixels, not a wrong tile), the
building-labelled and the background-labelled pixels each among themselves, keeping ``R(T)`` of
each (:func:`small_loss_mask_by_class`), and the update's loss is over the kept pixels: each
tile's loss on its kept pixels, weighted by their number (for BCE, exactly the mean over the
kept set). Ranked all together, the building pixels (15% of the built-in world's, and the
largest losses while a network learns) were 90% of those dropped: at tau 0.175 nearly every
building pixel, and the networks learnt to predict background (validation thresholds drifting
to 0.05).

Tile selection keeps ``ceil(R(T) * B)`` of a batch of ``B`` tiles, so it drops
``floor(B * tau * min(T / T_k, 1))``: while that is 0 (small batches, the early ramp) the two
networks train on every tile. :func:`first_dropping_epoch` says when it first drops one;
:class:`DropTally` counts what the selection actually dropped (``fit`` logs it per epoch as
``dropped_share``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from bldseg.train.losses import LossFn, pixel_bce

if TYPE_CHECKING:
    from bldseg.train.config import CoTeachConfig


def n_kept(keep_ratio: float, n: int) -> int:
    """How many of ``n`` samples :func:`small_loss_mask` keeps: ``ceil(keep_ratio * n)``, >= 1."""
    # the epsilon absorbs float error: 0.55 * 100 is 55.000000000000007, which must keep 55
    return max(1, math.ceil(keep_ratio * n - 1e-9))


def first_dropping_epoch(ct: CoTeachConfig, n: int, epochs: int) -> int | None:
    """The first 0-based epoch whose selection drops at least one of ``n`` samples per batch.

    Args:
        ct: The co-teaching settings (tau, t_k).
        n: Samples ranked per batch: the batch size at tile granularity.
        epochs: Epochs of the run.

    Returns:
        The epoch T (R(0) = 1, so never 0), or None when no epoch of the run drops one.
    """
    for epoch in range(epochs):
        if n - n_kept(ct.keep_ratio(epoch), n) >= 1:
            return epoch
    return None


def longest_dropping_ramp(ct: CoTeachConfig, n: int, limit: int) -> int:
    """The longest ramp (t_k <= ``limit``) with which ``ct.tau`` drops one of ``n`` samples per
    batch from the second epoch (T = 1) on: about floor(tau * n); 1 where none does."""
    ramps = [t for t in range(1, limit + 1) if first_dropping_epoch(replace(ct, t_k=t), n, 2) == 1]
    return max(ramps, default=1)


@dataclass
class DropTally:
    """Samples (tiles or pixels) the small-loss selections saw and dropped, both networks."""

    seen: int = 0
    dropped: int = 0

    def add(self, keeps: list[torch.Tensor]) -> None:
        """Counts the keep masks of one step."""
        for k in keeps:
            self.seen += k.numel()
            self.dropped += int(k.numel() - k.sum())

    @property
    def share(self) -> float:
        """Dropped / seen (0.0 before any step)."""
        return self.dropped / self.seen if self.seen else 0.0


def small_loss_mask(losses: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Boolean mask of the ``ceil(keep_ratio * n)`` smallest entries of ``losses``.

    Args:
        losses: Any shape; ranked over all its elements.
        keep_ratio: Share to keep, in (0, 1].

    Returns:
        bool tensor of the same shape; ties broken by position (a stable sort).
    """
    flat = losses.detach().reshape(-1)
    order = torch.sort(flat, stable=True).indices[: n_kept(keep_ratio, flat.numel())]
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[order] = True
    return mask.reshape(losses.shape)


def small_loss_mask_by_class(
    losses: torch.Tensor, target: torch.Tensor, keep_ratio: float
) -> torch.Tensor:
    """:func:`small_loss_mask` within each class of the (noisy) labels: ``ceil(keep_ratio * n)``
    of the ``n`` building-labelled entries and as many of the background ones, so the forget
    rate is the same for both classes whatever their shares.

    Args:
        losses: (B, 1, S, S) per-pixel losses.
        target: Labels of the same shape (> 0.5: building).
        keep_ratio: Share of each class to keep, in (0, 1].

    Returns:
        bool tensor of the shape of ``losses``.
    """
    flat = losses.detach().reshape(-1)
    building = target.reshape(-1) > 0.5
    mask = torch.zeros_like(flat, dtype=torch.bool)
    for members in (building, ~building):
        idx = members.nonzero().squeeze(1)
        if idx.numel():
            mask[idx[small_loss_mask(flat[idx], keep_ratio)]] = True
    return mask.reshape(losses.shape)


def coteaching_losses(
    outs: list[dict[str, torch.Tensor]],
    target: torch.Tensor,
    loss_fn: LossFn,
    keep_ratio: float,
    granularity: str,
    aux_weight: float,
    tally: DropTally | None = None,
) -> list[torch.Tensor]:
    """Training losses of f and g, each on the samples the other network kept.

    Args:
        outs: Outputs of f and g: dicts with ``logits`` (B, 1, S, S) and optionally
            ``aux_logits``.
        target: (B, 1, S, S) masks.
        loss_fn: Per-sample loss (see :mod:`bldseg.train.losses`).
        keep_ratio: R(T).
        granularity: "tile" or "pixel".
        aux_weight: Weight of the auxiliary-head loss.
        tally: Where to count what the two selections dropped (the measured forget rate).

    Returns:
        ``[loss_f, loss_g]``, scalars.
    """
    f, g = outs

    def total(o: dict[str, torch.Tensor], sel: torch.Tensor | None, weight=None) -> torch.Tensor:
        logits, aux = o["logits"], o.get("aux_logits")
        if sel is not None:  # tile granularity: keep whole samples
            logits, tgt = logits[sel], target[sel]
            aux = aux[sel] if aux is not None else None
        else:
            tgt = target
        loss = reduce(loss_fn(logits, tgt, weight), weight)
        if aux is not None and aux_weight > 0:
            loss = loss + aux_weight * reduce(loss_fn(aux, tgt, weight), weight)
        return loss

    def reduce(per_sample: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        """(B,) -> scalar. Pixel granularity: each tile's loss (over its kept pixels) weighs
        as many kept pixels as it has, so BCE is the mean over the kept set as Algorithm 1
        has it; a plain mean over tiles would give the few survivors of a noisy tile up to
        S*S times a clean tile's pixel."""
        if weight is None:
            return per_sample.mean()
        kept = weight.flatten(1).sum(1)  # (B,)
        return (per_sample * kept).sum() / kept.sum().clamp_min(1.0)

    # Selection on the main heads only; the aux loss is taken on the same kept set.
    if granularity == "tile":
        with torch.no_grad():
            keep_f = small_loss_mask(loss_fn(f["logits"], target, None), keep_ratio)  # (B,)
            keep_g = small_loss_mask(loss_fn(g["logits"], target, None), keep_ratio)
        if tally is not None:
            tally.add([keep_f, keep_g])
        return [total(f, keep_g), total(g, keep_f)]
    if granularity == "pixel":
        with torch.no_grad():
            # (B, 1, S, S), each class of the labels ranked among itself
            keep_f = small_loss_mask_by_class(pixel_bce(f["logits"], target), target, keep_ratio)
            keep_g = small_loss_mask_by_class(pixel_bce(g["logits"], target), target, keep_ratio)
        if tally is not None:
            tally.add([keep_f, keep_g])
        return [total(f, None, keep_g.float()), total(g, None, keep_f.float())]
    raise ValueError(f"coteach.granularity={granularity!r} must be 'tile' or 'pixel'")

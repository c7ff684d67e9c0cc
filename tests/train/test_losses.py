"""Per-sample losses against hand-computed values and naive references."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from bldseg.train.losses import (
    LOSSES,
    bce_dice_loss,
    bce_loss,
    build_loss,
    dice_loss,
    lovasz_hinge_loss,
    pixel_bce,
)


def _batch(seed: int = 0, b: int = 3, s: int = 5, dtype=torch.float64):
    """Random logits and {0, 1} targets, (B, 1, S, S)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, 1, s, s, generator=g, dtype=dtype) * 2
    target = (torch.rand(b, 1, s, s, generator=g) > 0.5).to(dtype)
    return logits, target


def _jaccard_loss(gt: list[int], mistakes: set[int]) -> float:
    """Delta_J(M) = 1 - |G minus M| / |G union M| for the set M of mispredicted pixels."""
    g = {i for i, v in enumerate(gt) if v}
    union = g | mistakes
    return 0.0 if not union else 1.0 - len(g - mistakes) / len(union)


def _lovasz_brute(logits: list[float], gt: list[int]) -> float:
    """Lovász extension of Delta_J at the hinge errors, as the level-set integral
    f(e) = integral over t > 0 of Delta_J({i : e_i >= t}) dt (Delta_J(empty set) = 0)."""
    e = [max(0.0, 1.0 - x * (2 * y - 1)) for x, y in zip(logits, gt, strict=True)]
    levels = [*sorted({v for v in e if v > 0}, reverse=True), 0.0]
    return sum(
        (hi - lo) * _jaccard_loss(gt, {i for i, v in enumerate(e) if v >= hi})
        for hi, lo in itertools.pairwise(levels)
    )


def _as_map(values) -> torch.Tensor:
    """A list of pixel values as a (1, 1, 1, P) float64 batch."""
    return torch.tensor(values, dtype=torch.float64).view(1, 1, 1, -1)


# --- bce, dice, bce_dice ----------------------------------------------------------------------


def test_bce_equals_torch_per_sample():
    logits, target = _batch()
    got = bce_loss(logits, target)
    assert got.shape == (3,)
    for i in range(3):
        assert got[i] == pytest.approx(
            F.binary_cross_entropy_with_logits(logits[i], target[i]).item()
        )


def test_pixel_bce_is_unreduced():
    logits, target = _batch()
    pb = pixel_bce(logits, target)
    assert pb.shape == logits.shape
    assert pb.flatten(1).mean(1) == pytest.approx(bce_loss(logits, target))


def test_dice_by_hand():
    # p = 0.5, 0.75, 0.25, 0.5 against 1, 1, 0, 0.
    logits = _as_map([0.0, math.log(3), -math.log(3), 0.0])
    target = _as_map([1, 1, 0, 0])
    inter, denom = 0.5 + 0.75, (0.5 + 0.75 + 0.25 + 0.5) + 2
    assert dice_loss(logits, target).item() == pytest.approx(1 - (2 * inter + 1) / (denom + 1))
    assert dice_loss(logits, target).item() == pytest.approx(0.3)


def test_dice_formula_per_sample():
    logits, target = _batch(seed=1)
    p = torch.sigmoid(logits)
    for smooth in (1.0, 0.0):
        got = dice_loss(logits, target, smooth=smooth)
        for i in range(3):
            want = 1 - (2 * (p[i] * target[i]).sum() + smooth) / (
                p[i].sum() + target[i].sum() + smooth
            )
            assert got[i].item() == pytest.approx(want.item())


def test_dice_perfect_is_small_and_wrong_is_large():
    target = _as_map([1, 1, 0, 0])
    assert dice_loss(20 * (2 * target - 1), target).item() < 1e-6
    assert dice_loss(-20 * (2 * target - 1), target).item() > 0.6


def test_bce_dice_is_the_sum():
    logits, target = _batch(seed=2)
    assert bce_dice_loss(logits, target) == pytest.approx(
        bce_loss(logits, target) + dice_loss(logits, target)
    )


# --- lovasz ------------------------------------------------------------------------------------


def test_lovasz_by_hand():
    # errors 1 - logit * sign = [-1, 2, 1.5]; sorted: pixel 1 (gt 1), pixel 2 (gt 0), pixel 0.
    # Delta_J of the growing mistake sets: {1}: 1 - 1/2; {1, 2}: 1 - 1/3; {1, 2, 0}: 1.
    # Loss = 2 * 0.5 + 1.5 * (2/3 - 1/2) + 0 * (1 - 2/3) = 1.25.
    logits, target = _as_map([2.0, -1.0, 0.5]), _as_map([1, 1, 0])
    assert lovasz_hinge_loss(logits, target).item() == pytest.approx(1.25)
    assert _lovasz_brute([2.0, -1.0, 0.5], [1, 1, 0]) == pytest.approx(1.25)


@pytest.mark.parametrize("seed", range(6))
def test_lovasz_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(4, generator=g, dtype=torch.float64) * 1.5).tolist()
    gt = (torch.rand(4, generator=g) > 0.5).long().tolist()
    got = lovasz_hinge_loss(_as_map(logits), _as_map(gt)).item()
    assert got == pytest.approx(_lovasz_brute(logits, gt))


@pytest.mark.parametrize("gt", [[0, 0, 0, 0], [1, 1, 1, 1]])
def test_lovasz_matches_brute_force_single_class(gt):
    logits = [0.3, -2.0, 1.2, 0.0]
    got = lovasz_hinge_loss(_as_map(logits), _as_map(gt)).item()
    assert got == pytest.approx(_lovasz_brute(logits, gt))
    assert got > 0


def test_lovasz_zero_for_confident_perfect_prediction():
    _, target = _batch(seed=3)
    logits = 3.0 * (2 * target - 1)  # margin > 1 everywhere
    assert torch.equal(lovasz_hinge_loss(logits, target), torch.zeros(3, dtype=torch.float64))


def test_lovasz_positive_otherwise():
    _, target = _batch(seed=3)
    logits = 3.0 * (2 * target - 1)
    logits[1, 0, 2, 2] *= -1  # one wrong pixel in sample 1
    logits[2] *= 0.2  # sample 2 right but inside the margin (|logit| = 0.6 < 1)
    loss = lovasz_hinge_loss(logits, target)
    assert loss[0] == 0
    assert loss[1] > 0 and loss[2] > 0


def test_lovasz_gradients_finite():
    logits, target = _batch(seed=4)
    target[0] = 0  # no positives
    target[1] = 1  # no negatives
    logits[2] = 0.0  # all errors tied
    logits.requires_grad_(True)
    lovasz_hinge_loss(logits, target).sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


# --- weight ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_weight_restricts_to_kept_pixels(name):
    loss_fn = build_loss(name)
    logits, target = _batch(seed=5)
    g = torch.Generator().manual_seed(6)
    weight = (torch.rand(logits.shape, generator=g) > 0.4).to(logits.dtype)
    got = loss_fn(logits, target, weight)
    for i in range(3):
        keep = weight[i].bool()
        want = loss_fn(_as_map(logits[i][keep].tolist()), _as_map(target[i][keep].tolist()))
        assert got[i].item() == pytest.approx(want.item())
    # Dropped pixels do not matter: changing them leaves the loss unchanged.
    flipped = torch.where(weight.bool(), logits, -10 * logits)
    assert loss_fn(flipped, target, weight) == pytest.approx(got)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_weight_all_ones_is_unweighted_and_all_zeros_is_zero(name):
    loss_fn = build_loss(name)
    logits, target = _batch(seed=7)
    assert loss_fn(logits, target, torch.ones_like(logits)) == pytest.approx(
        loss_fn(logits, target)
    )
    weight = torch.ones_like(logits)
    weight[1] = 0
    out = loss_fn(logits, target, weight)
    assert out[1].item() == 0.0
    assert out[0] > 0


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_weight_gradient_zero_on_dropped_pixels(name):
    logits, target = _batch(seed=8)
    logits.requires_grad_(True)
    weight = torch.ones_like(logits)
    weight[:, :, :2] = 0
    build_loss(name)(logits, target, weight).sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert torch.all(logits.grad[:, :, :2] == 0)
    assert logits.grad[:, :, 2:].abs().sum() > 0


# --- registry ----------------------------------------------------------------------------------


def test_build_loss_by_name():
    assert build_loss("bce") is bce_loss
    assert build_loss("lovasz") is lovasz_hinge_loss
    assert set(LOSSES) == {"bce", "dice", "bce_dice", "lovasz"}


def test_build_loss_unknown_name():
    with pytest.raises(ValueError, match=r"'focal'.*bce_dice"):
        build_loss("focal")

"""Co-teaching: small-loss selection and cross-update of the two networks."""

import math

import pytest
import torch

from bldseg.train.coteaching import coteaching_losses, small_loss_mask
from bldseg.train.losses import bce_loss, build_loss, dice_loss, pixel_bce

# --- small_loss_mask ---------------------------------------------------------------------------


def test_keeps_ceil_r_n_smallest():
    losses = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.7])
    mask = small_loss_mask(losses, 0.5)  # ceil(2.5) = 3
    assert mask.dtype == torch.bool
    assert mask.tolist() == [False, True, True, True, False]


@pytest.mark.parametrize("r", [0.1, 0.25, 0.5, 0.6, 0.75, 0.9, 1.0])
def test_count_is_ceil(r):
    losses = torch.randperm(8, generator=torch.Generator().manual_seed(0)).float()
    mask = small_loss_mask(losses, r)
    n = math.ceil(r * 8)
    assert int(mask.sum()) == n
    assert sorted(losses[mask].tolist()) == list(range(n))  # the n smallest


def test_ties_broken_by_position():
    losses = torch.tensor([1.0, 0.0, 0.0, 2.0, 0.0])
    assert small_loss_mask(losses, 0.4).tolist() == [False, True, True, False, False]
    assert small_loss_mask(losses, 0.8).tolist() == [True, True, True, False, True]


def test_keep_all_and_keep_one():
    losses = torch.tensor([3.0, 1.0, 2.0, 5.0])
    assert small_loss_mask(losses, 1.0).all()
    assert small_loss_mask(losses, 1e-6).tolist() == [False, True, False, False]


def test_any_shape_ranked_globally():
    losses = torch.tensor([[[4.0, 0.5], [3.0, 2.0]], [[0.25, 6.0], [5.0, 1.0]]])  # (2, 2, 2)
    mask = small_loss_mask(losses, 0.5)
    assert mask.shape == losses.shape
    assert sorted(losses[mask].tolist()) == [0.25, 0.5, 1.0, 2.0]


def test_no_gradient_through_mask():
    losses = torch.tensor([0.3, 0.1], requires_grad=True)
    mask = small_loss_mask(losses, 0.5)
    assert not mask.requires_grad
    assert mask.tolist() == [False, True]


def test_count_exact_for_decimal_ratio():
    # CoTeachConfig(tau=0.5, t_k=10).keep_ratio(9) == 0.55; 0.55 * 100 == 55.00000000000001.
    assert int(small_loss_mask(torch.arange(100.0), 0.55).sum()) == 55


# --- coteaching_losses -------------------------------------------------------------------------


def _target(b: int = 4, s: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.rand(b, 1, s, s, generator=g) > 0.5).float()


def _confident(target: torch.Tensor, wrong_tiles=(), wrong_pixels=()) -> torch.Tensor:
    """Logits +-4 agreeing with ``target`` except on the given tiles / (b, y, x) pixels."""
    sign = 2 * target - 1
    for i in wrong_tiles:
        sign[i] = -sign[i]
    for b, y, x in wrong_pixels:
        sign[b, 0, y, x] = -sign[b, 0, y, x]
    return (4.0 * sign).requires_grad_(True)


def test_tile_each_net_trained_on_what_the_other_kept():
    t = _target()
    f = _confident(t, wrong_tiles=[0])  # f thinks tile 0 is noisy
    g = _confident(t, wrong_tiles=[1])  # g thinks tile 1 is noisy
    outs = [{"logits": f}, {"logits": g}]
    loss_f, loss_g = coteaching_losses(outs, t, bce_loss, 0.75, "tile", aux_weight=0.4)
    # g keeps {0, 2, 3}: f is updated on them, including the tile f gets wrong.
    assert loss_f.item() == pytest.approx(bce_loss(f[[0, 2, 3]], t[[0, 2, 3]]).mean().item())
    assert loss_g.item() == pytest.approx(bce_loss(g[[1, 2, 3]], t[[1, 2, 3]]).mean().item())
    # ... and not on its own small-loss set (which would be nearly 0).
    own_f = bce_loss(f[[1, 2, 3]], t[[1, 2, 3]]).mean().item()
    assert loss_f.item() > 10 * own_f

    loss_f.backward()
    assert g.grad is None  # f's loss only reaches f
    assert f.grad[1].abs().sum() == 0  # tile 1, dropped by g, gives f no gradient
    assert f.grad[0].abs().sum() > 0


@pytest.mark.parametrize("name", ["dice", "lovasz", "bce_dice"])
def test_tile_selection_uses_loss_fn(name):
    loss_fn = build_loss(name)
    t = _target()
    f = _confident(t, wrong_tiles=[2])
    g = _confident(t, wrong_tiles=[3])
    outs = [{"logits": f}, {"logits": g}]
    loss_f, loss_g = coteaching_losses(outs, t, loss_fn, 0.75, "tile", aux_weight=0.0)
    assert loss_f.item() == pytest.approx(loss_fn(f[[0, 1, 2]], t[[0, 1, 2]]).mean().item())
    assert loss_g.item() == pytest.approx(loss_fn(g[[0, 1, 3]], t[[0, 1, 3]]).mean().item())


def test_tile_keep_all_is_plain_loss():
    t = _target()
    f, g = _confident(t, wrong_tiles=[0]), _confident(t, wrong_tiles=[1])
    loss_f, loss_g = coteaching_losses(
        [{"logits": f}, {"logits": g}], t, bce_loss, 1.0, "tile", aux_weight=0.0
    )
    assert loss_f.item() == pytest.approx(bce_loss(f, t).mean().item())
    assert loss_g.item() == pytest.approx(bce_loss(g, t).mean().item())


def test_pixel_weights_from_other_net_bce():
    t = _target(b=2, s=4)  # 32 pixels
    f_wrong = [(0, 0, 0), (1, 3, 2)]
    g_wrong = [(0, 1, 1), (1, 0, 3)]
    f = _confident(t, wrong_pixels=f_wrong)
    g = _confident(t, wrong_pixels=g_wrong)
    outs = [{"logits": f}, {"logits": g}]
    loss_f, loss_g = coteaching_losses(outs, t, bce_loss, 30 / 32, "pixel", aux_weight=0.0)

    def keep_all_but(pixels):
        w = torch.ones_like(t)
        for b, y, x in pixels:
            w[b, 0, y, x] = 0
        return w

    w_from_g = keep_all_but(g_wrong)  # g drops its own two large-loss pixels
    assert torch.equal(small_loss_mask(pixel_bce(g, t), 30 / 32).float(), w_from_g)
    assert loss_f.item() == pytest.approx(bce_loss(f, t, w_from_g).mean().item())
    assert loss_g.item() == pytest.approx(bce_loss(g, t, keep_all_but(f_wrong)).mean().item())
    assert loss_f.item() > 10 * bce_loss(f, t, keep_all_but(f_wrong)).mean().item()

    loss_f.backward()
    for b, y, x in g_wrong:
        assert f.grad[b, 0, y, x] == 0
    for b, y, x in f_wrong:
        assert f.grad[b, 0, y, x] != 0


def test_pixel_update_is_the_mean_over_the_kept_set():
    # Tile 1 is labelled building everywhere while both networks see background: a noisy tile
    # that keeps 1 of its 16 pixels. Each kept pixel weighs 1 / |kept| in the update (17 of
    # them), not 1/2 for the noisy tile's survivor and 1/32 for the others (a mean of per-tile
    # means).
    t = torch.zeros(2, 1, 4, 4)
    t[1] = 1.0
    logit = torch.full((2, 1, 4, 4), -3.0)
    logit[1, 0, 0, 0] = 3.0
    f = logit.clone().requires_grad_(True)
    loss_f, _ = coteaching_losses(
        [{"logits": f}, {"logits": logit.clone()}], t, bce_loss, 17 / 32, "pixel", 0.0
    )
    kept = small_loss_mask(pixel_bce(logit, t), 17 / 32).float()
    assert kept.flatten(1).sum(1).tolist() == [16.0, 1.0]
    exact = (pixel_bce(f, t) * kept).sum() / kept.sum()
    assert loss_f.item() == pytest.approx(exact.item())
    loss_f.backward()
    weight = f.grad / (torch.sigmoid(logit) - t)  # d BCE / d logit = w * (p - t)
    torch.testing.assert_close(weight, kept / 17)
    # Dice: each tile's loss on its kept pixels, weighted by their number
    loss_d, _ = coteaching_losses(
        [{"logits": logit}, {"logits": logit}], t, dice_loss, 17 / 32, "pixel", 0.0
    )
    per_tile = dice_loss(logit, t, kept)
    assert loss_d.item() == pytest.approx(
        ((per_tile * torch.tensor([16.0, 1.0])).sum() / 17).item()
    )


@pytest.mark.parametrize("granularity", ["tile", "pixel"])
def test_aux_logits_weighted(granularity):
    t = _target()
    f, g = _confident(t, wrong_tiles=[0]), _confident(t, wrong_tiles=[1])
    fa, ga = 0.5 * f.detach(), 0.25 * g.detach()  # aux heads: less confident
    plain = [{"logits": f}, {"logits": g}]
    with_aux = [{"logits": f, "aux_logits": fa}, {"logits": g, "aux_logits": ga}]
    base = coteaching_losses(plain, t, bce_loss, 0.75, granularity, aux_weight=0.4)
    got = coteaching_losses(with_aux, t, bce_loss, 0.75, granularity, aux_weight=0.4)
    # The aux loss uses the same selection, chosen on the main logits.
    aux_only = coteaching_losses(
        [{"logits": fa}, {"logits": ga}], t, bce_loss, 0.75, granularity, aux_weight=0.0
    )
    if granularity == "tile":  # selection from the main heads: f keeps 1,2,3; g keeps 0,2,3
        aux_f = bce_loss(fa[[0, 2, 3]], t[[0, 2, 3]]).mean()
        aux_g = bce_loss(ga[[1, 2, 3]], t[[1, 2, 3]]).mean()
        assert [a.item() for a in aux_only] == pytest.approx([aux_f.item(), aux_g.item()])
    for b, a, gt in zip(base, aux_only, got, strict=True):
        assert gt.item() == pytest.approx(b.item() + 0.4 * a.item())
    zero = coteaching_losses(with_aux, t, bce_loss, 0.75, granularity, aux_weight=0.0)
    assert [z.item() for z in zero] == pytest.approx([b.item() for b in base])


def test_invalid_granularity():
    t = _target()
    outs = [{"logits": _confident(t)}, {"logits": _confident(t)}]
    with pytest.raises(ValueError, match="granularity='image'"):
        coteaching_losses(outs, t, bce_loss, 0.9, "image", aux_weight=0.0)

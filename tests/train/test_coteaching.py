"""Co-teaching: small-loss selection, cross-update of the two networks, and fit() with it."""

import math
import re
import shutil
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

from bldseg.models import create_model
from bldseg.models.backbones.internimage import DropPath
from bldseg.predict import load_checkpoint
from bldseg.report import coteaching_dropped_nothing
from bldseg.train import engine
from bldseg.train.config import CoTeachConfig, RunConfig
from bldseg.train.coteaching import (
    DropTally,
    coteaching_losses,
    first_dropping_epoch,
    longest_dropping_ramp,
    small_loss_mask,
    small_loss_mask_by_class,
)
from bldseg.train.engine import fit
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


def _one_of_each_class(t: torch.Tensor, k: int) -> list[tuple[int, int, int]]:
    """The k-th building-labelled and the k-th background-labelled (b, y, x) pixel of ``t``."""
    return [tuple(int(v) for v in (t[:, 0] == c).nonzero()[k]) for c in (1.0, 0.0)]


def test_pixel_weights_from_other_net_bce():
    t = _target(b=2, s=4)  # 32 pixels
    n = [int((t == c).sum()) for c in (1.0, 0.0)]
    # each class drops one pixel: ceil(keep * n_c) = n_c - 1 for both class sizes
    keep = min((c - 1) / c for c in n) - 1e-9
    assert all(math.ceil(keep * c) == c - 1 for c in n)
    f_wrong, g_wrong = _one_of_each_class(t, 0), _one_of_each_class(t, 3)
    f = _confident(t, wrong_pixels=f_wrong)
    g = _confident(t, wrong_pixels=g_wrong)
    outs = [{"logits": f}, {"logits": g}]
    loss_f, loss_g = coteaching_losses(outs, t, bce_loss, keep, "pixel", aux_weight=0.0)

    def keep_all_but(pixels):
        w = torch.ones_like(t)
        for b, y, x in pixels:
            w[b, 0, y, x] = 0
        return w

    def kept_mean(logits, w):  # BCE over the kept set
        return ((pixel_bce(logits, t) * w).sum() / w.sum()).item()

    w_from_g = keep_all_but(g_wrong)  # g drops its own two large-loss pixels, one per class
    assert torch.equal(small_loss_mask_by_class(pixel_bce(g, t), t, keep).float(), w_from_g)
    assert loss_f.item() == pytest.approx(kept_mean(f, w_from_g))
    assert loss_g.item() == pytest.approx(kept_mean(g, keep_all_but(f_wrong)))
    assert loss_f.item() > 10 * kept_mean(f, keep_all_but(f_wrong))

    loss_f.backward()
    for b, y, x in g_wrong:
        assert f.grad[b, 0, y, x] == 0
    for b, y, x in f_wrong:
        assert f.grad[b, 0, y, x] != 0


def test_pixel_update_is_the_mean_over_the_kept_set():
    # Tile 1 is labelled building everywhere while both networks see background: a noisy tile
    # that keeps 1 of its 16 pixels; tile 0 holds 8 well-predicted buildings and 8 background
    # pixels. Per class (24 buildings: keep 9, the 8 of tile 0 and tile 1's one right pixel; 8
    # background: keep 3) tile 0 keeps 11 and tile 1 one. Each kept pixel weighs 1 / |kept| in
    # the update (12 of them), not 1/2 for the noisy tile's survivor and 1/22 for the others (a
    # mean of per-tile means).
    t = torch.zeros(2, 1, 4, 4)
    t[0, 0, :2] = 1.0
    t[1] = 1.0
    logit = torch.full((2, 1, 4, 4), -3.0)
    logit[0, 0, :2] = 3.0
    logit[1, 0, 0, 0] = 3.0
    f = logit.clone().requires_grad_(True)
    keep = 9 / 24
    loss_f, _ = coteaching_losses(
        [{"logits": f}, {"logits": logit.clone()}], t, bce_loss, keep, "pixel", 0.0
    )
    kept = small_loss_mask_by_class(pixel_bce(logit, t), t, keep).float()
    assert kept.flatten(1).sum(1).tolist() == [11.0, 1.0]
    assert kept[1, 0, 0, 0] == 1 and kept[0, 0, :2].all()
    exact = (pixel_bce(f, t) * kept).sum() / kept.sum()
    assert loss_f.item() == pytest.approx(exact.item())
    loss_f.backward()
    weight = f.grad / (torch.sigmoid(logit) - t)  # d BCE / d logit = w * (p - t)
    torch.testing.assert_close(weight, kept / 12)
    # Dice: each tile's loss on its kept pixels, weighted by their number
    loss_d, _ = coteaching_losses(
        [{"logits": logit}, {"logits": logit}], t, dice_loss, keep, "pixel", 0.0
    )
    per_tile = dice_loss(logit, t, kept)
    assert loss_d.item() == pytest.approx(
        ((per_tile * torch.tensor([11.0, 1.0])).sum() / 12).item()
    )


@pytest.mark.parametrize("granularity", ["tile", "pixel"])
def test_aux_logits_weighted(granularity):
    t = _target()  # (4, 1, 4, 4)
    if granularity == "tile":
        main = {"f": {"wrong_tiles": [0]}, "g": {"wrong_tiles": [1]}}
        aux = {"wrong_tiles": [2]}
    else:
        main = {"f": {"wrong_pixels": [(0, 0, 0), (1, 3, 2)]}}
        main["g"] = {"wrong_pixels": [(0, 1, 1), (1, 0, 3)]}
        aux = {"wrong_pixels": [(2, 2, 2), (3, 1, 0)]}
    f, g = _confident(t, **main["f"]), _confident(t, **main["g"])
    # The aux heads, less confident, share a blind spot the main heads do not have: ranked on
    # them, each network would drop it from the other's update; ranked on the main heads
    # (what co-teaching does) it stays in, with its large aux loss.
    fa, ga = 0.5 * _confident(t, **aux).detach(), 0.25 * _confident(t, **aux).detach()
    plain = [{"logits": f}, {"logits": g}]
    with_aux = [{"logits": f, "aux_logits": fa}, {"logits": g, "aux_logits": ga}]
    # pixels: one of each class (ceil(0.95 n_c) = n_c - 1 for its 29 and 35)
    keep = 0.75 if granularity == "tile" else 0.95
    base = coteaching_losses(plain, t, bce_loss, keep, granularity, aux_weight=0.4)
    got = coteaching_losses(with_aux, t, bce_loss, keep, granularity, aux_weight=0.4)

    def aux_loss(a, ranked_by):
        """BCE of aux logits ``a`` on what the other network's ``ranked_by`` logits kept."""
        if granularity == "tile":
            kept = small_loss_mask(bce_loss(ranked_by, t), keep)
            return bce_loss(a[kept], t[kept]).mean()
        kept = small_loss_mask_by_class(pixel_bce(ranked_by, t), t, keep).float()
        return (pixel_bce(a, t) * kept).sum() / kept.sum()

    expected = [aux_loss(fa, g.detach()), aux_loss(ga, f.detach())]
    for b, a, gt in zip(base, expected, got, strict=True):
        assert gt.item() == pytest.approx(b.item() + 0.4 * a.item())
    # the test can tell: a selection on the aux heads gives another loss
    on_aux = [aux_loss(fa, ga), aux_loss(ga, fa)]
    for a, wrong in zip(expected, on_aux, strict=True):
        assert a.item() > wrong.item() * 1.02
    zero = coteaching_losses(with_aux, t, bce_loss, keep, granularity, aux_weight=0.0)
    assert [z.item() for z in zero] == pytest.approx([b.item() for b in base])


def test_invalid_granularity():
    t = _target()
    outs = [{"logits": _confident(t)}, {"logits": _confident(t)}]
    with pytest.raises(ValueError, match="granularity='image'"):
        coteaching_losses(outs, t, bce_loss, 0.9, "image", aux_weight=0.0)


# --- what the selection drops ----------------------------------------------------------------


@pytest.mark.parametrize(
    "tau, t_k, batch, first",
    [
        (0.3, 2, 4, 2),  # floor(4 * 0.3 * T / 2): 0, 0, 1
        (0.3, 5, 4, 5),  # 0.96 at T = 4
        (0.25, 1, 4, 1),  # exactly 1.0 at T = 1 (R = 0.75 keeps 3)
        (0.2, 1, 4, None),  # floor(0.8): never
        (0.4, 3, 8, 1),  # floor(3.2 / 3) = 1
    ],
)
def test_first_dropping_epoch(tau, t_k, batch, first):
    ct = CoTeachConfig(enabled=True, tau=tau, t_k=t_k)
    assert first_dropping_epoch(ct, batch, 10) == first
    if first is not None:  # what small_loss_mask does in that epoch and the one before
        n = int((~small_loss_mask(torch.arange(float(batch)), ct.keep_ratio(first))).sum())
        before = small_loss_mask(torch.arange(float(batch)), ct.keep_ratio(first - 1))
        assert n >= 1 and bool(before.all())
    assert first_dropping_epoch(ct, batch, 2) == (first if first == 1 else None)


@pytest.mark.parametrize(
    "tau, batch, longest", [(0.25, 4, 1), (0.4, 4, 1), (0.4, 8, 3), (0.25, 8, 2), (0.1, 4, 1)]
)
def test_longest_dropping_ramp(tau, batch, longest):
    ct = CoTeachConfig(enabled=True, tau=tau)
    assert longest_dropping_ramp(ct, batch, 5) == longest
    if tau * batch >= 1:
        ramp = CoTeachConfig(enabled=True, tau=tau, t_k=longest)
        assert first_dropping_epoch(ramp, batch, 10) == 1
        assert first_dropping_epoch(replace(ramp, t_k=longest + 1), batch, 10) > 1


@pytest.mark.parametrize("granularity, dropped", [("tile", 1), ("pixel", 16)])
def test_tally_counts_what_each_network_dropped(granularity, dropped):
    t = _target()  # 4 tiles of 16 pixels
    outs = [{"logits": _confident(t, wrong_tiles=[0])}, {"logits": _confident(t)}]
    tally = DropTally()
    coteaching_losses(outs, t, bce_loss, 0.75, granularity, 0.0, tally)
    seen = 4 if granularity == "tile" else 64
    if granularity == "pixel":  # a quarter of each class, rounded down
        dropped = sum(int((t == c).sum()) // 4 for c in (0.0, 1.0))
    assert (tally.seen, tally.dropped) == (2 * seen, 2 * dropped)
    coteaching_losses(outs, t, bce_loss, 1.0, granularity, 0.0, tally)
    assert (tally.seen, tally.dropped) == (4 * seen, 2 * dropped)
    assert tally.share == pytest.approx(dropped / (2 * seen))
    assert DropTally().share == 0.0


# --- fit with co-teaching --------------------------------------------------------------------

FIT = {
    "aug.crop_size": 32,
    "batch_size": 4,
    "samples_per_epoch": 16,  # 4 full batches
    "val_fraction": 0.25,
    "val_tile": 32,
    "optim.lr": 3e-3,
    "impl": "compiled",
    "coteach.enabled": True,
}


def test_fit_records_what_tile_selection_dropped(small_world, tmp_path):
    # keep_ratio 1, 0.85, 0.7: ceil(R * 4) keeps all 4 tiles until the ramp's last epoch
    c = RunConfig.from_flat({**FIT, "epochs": 3, "coteach.tau": 0.3, "coteach.t_k": 2})
    with pytest.warns(UserWarning, match="co-teaching drops no tile") as caught:
        r = fit(c, tmp_path / "ramp", data=small_world)
    (w,) = [w for w in caught if "co-teaching" in str(w.message)]  # once, before training
    assert "before epoch 3 of 3" in str(w.message) and "coteach.t_k <= 1" in str(w.message)
    assert [h["keep_ratio"] for h in r.history] == pytest.approx([1.0, 0.85, 0.7])
    assert [h["dropped_share"] for h in r.history] == [0.0, 0.0, 0.25]
    assert coteaching_dropped_nothing(c, r.history) == (
        "tile co-teaching with tau 0.30, t_k 2 and batch_size 4 dropped nothing until epoch 3 "
        "of 3 (the dropped_share its history records)"
    )
    # a ramp the run never finishes: no epoch drops
    with pytest.warns(UserWarning, match=r"no tile in any of its 2 epochs \(its ramp first"):
        fit(c.with_updates({"epochs": 2}), tmp_path / "short", data=small_world, stop_after=0)
    # a ramp of at most floor(tau * batch_size) epochs drops from the second epoch: no warning
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="co-teaching drops")
        fast = fit(c.with_updates({"coteach.t_k": 1}), tmp_path / "t1", data=small_world)
    assert [h["dropped_share"] for h in fast.history] == [0.0, 0.25, 0.25]
    pixel = c.with_updates({"coteach.granularity": "pixel"})
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="co-teaching drops")
        px = fit(pixel, tmp_path / "pixel", data=small_world, stop_after=2)
    # 4 * 32 * 32 pixels per batch: the share is R(T)'s up to rounding
    assert [h["dropped_share"] for h in px.history] == pytest.approx([0.0, 0.15], abs=1e-3)


def test_fit_model_is_network_f_whatever_g_scores(small_world, tmp_path, monkeypatch):
    real = engine.threshold_metrics
    calls = []

    def g_scores_higher(probs, truth, lo, hi):  # validation calls f, then g, every epoch
        m = real(probs, truth, lo, hi)
        calls.append(m["dice_best"])
        return {**m, "dice_best": m["dice_best"] + (0.5 if len(calls) % 2 == 0 else 0.0)}

    monkeypatch.setattr(engine, "threshold_metrics", g_scores_higher)
    c = RunConfig.from_flat({**FIT, "epochs": 1, "coteach.tau": 0.25, "coteach.t_k": 1})
    r = fit(c, tmp_path, data=small_world)
    assert len(calls) == 2
    pairs = zip(calls[::2], calls[1::2], strict=True)
    for h, (f_dice, g_dice) in zip(r.history, pairs, strict=True):
        assert h["val_dice_best"] == f_dice  # f's, though g's is 0.5 higher
        assert h["val_dice_best_peer"] == g_dice + 0.5
        assert "val_net" not in h and "val_dice_best_other" not in h
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    for k, w in last["models"][0].items():
        assert torch.equal(best["model"][k], w), k
    # f's validation maps are the library entry: the ensemble search scores f
    probs = np.load(tmp_path / "val_probs.npz")["probs"]
    model, _, _ = load_checkpoint(tmp_path / "best.pt", torch.device("cpu"))
    val = engine.TileDataset(
        small_world.train,
        engine.validation_tiles(small_world.train, engine.split_for(c, small_world.train)[1], 32),
        engine.build_eval_transform(),
    )
    loader = torch.utils.data.DataLoader(val, batch_size=8)
    amp = engine.autocast_dtype(c.precision, torch.device("cpu"))
    mine = engine.predict_probs(model, loader, torch.device("cpu"), amp, c.tta)
    assert np.array_equal(mine, probs)


def test_coteaching_resumes_exactly_and_reads_older_histories(small_world, tmp_path):
    # drop-path on as well as the heads' Dropout2d: g draws its masks from its own stream,
    # which last.pt records beside the global one (f's)
    c = RunConfig.from_flat(
        {**FIT, "epochs": 2, "coteach.tau": 0.25, "coteach.t_k": 1, "drop_path_rate": 0.3}
    )
    straight = fit(c, tmp_path / "a", data=small_world)
    fit(c, tmp_path / "b", data=small_world, stop_after=1)
    shutil.copytree(tmp_path / "b", tmp_path / "old")
    resumed = fit(c, tmp_path / "b", data=small_world)
    assert resumed.history == [
        {**h, **{k: resumed.history[i][k] for k in ("epoch_s", "data_s", "cpu_s")}}
        for i, h in enumerate(straight.history)
    ]
    nets_a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["models"]
    nets_b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["models"]
    for net, (a, b) in zip("fg", zip(nets_a, nets_b, strict=True), strict=True):
        for k, w in a.items():
            assert torch.equal(w, b[k]), (net, k)
    # A last.pt of an older bldseg, which kept the better network each epoch (val_net,
    # val_dice_best_other, no dropped_share) and drew both networks' masks from one stream
    # (no peer_rng): it resumes, says whose best.pt it keeps and that g's stream is new, and
    # the report reads its history.
    state = torch.load(tmp_path / "old" / "last.pt", weights_only=True)
    for row in (*state["history"], state["best"]):
        row.pop("dropped_share")
        row["val_dice_best_other"] = row.pop("val_dice_best_peer")
        row["val_net"] = "g"
    del state["peer_rng"]
    torch.save(state, tmp_path / "old" / "last.pt")
    with pytest.warns(UserWarning) as caught:
        old = fit(c, tmp_path / "old", data=small_world)
    said = [str(w.message) for w in caught]
    assert any(re.search(r"older bldseg.*best.pt \(epoch 1\) is network g's", m) for m in said)
    assert any("network g continues from a new stream (seed 1, epoch 1)" in m for m in said)
    assert old.status == "completed" and old.history[0]["val_net"] == "g"
    assert [("dropped_share" in h) for h in old.history] == [False, True]
    assert coteaching_dropped_nothing(c, old.history) is None


@pytest.fixture(scope="module")
def plain_with_dropout(small_world, tmp_path_factory):
    """A plain 2-epoch run with the heads' Dropout2d and drop-path in every block: its config,
    result and run folder. 48-px crops: co-teaching's selected-sample losses (the path a
    keep-everything step no longer takes) round otherwise than a plain mean over 48 * 48 pixels
    (over 32 * 32, a power of two, they happened not to)."""
    c = RunConfig.from_flat(
        {
            **FIT,
            "coteach.enabled": False,
            "epochs": 2,
            "drop_path_rate": 0.3,
            "aug.crop_size": 48,
            "val_tile": 48,
        }
    )
    out = tmp_path_factory.mktemp("plain")
    return c, fit(c, out, data=small_world), out


@pytest.mark.parametrize("granularity", ["tile", "pixel"])
def test_tau_0_trains_network_f_exactly_as_plain_training(
    small_world, tmp_path, plain_with_dropout, granularity
):
    # g was built after a re-seed and ran its forwards (and validation) between f's, on the
    # global random stream: f's dropout and drop-path masks were others than a plain run's
    # (weights up to 6.6 apart after 2 epochs), so no tau-0 arm was the plain arm it claimed.
    c, plain, plain_dir = plain_with_dropout
    model = create_model(c.model, **c.model_kwargs())
    assert any(isinstance(m, torch.nn.Dropout2d) and m.p > 0 for m in model.modules())
    assert any(isinstance(m, DropPath) and m.p > 0 for m in model.modules())
    ct = c.with_updates(
        {"coteach.enabled": True, "coteach.tau": 0.0, "coteach.granularity": granularity}
    )
    r = fit(ct, tmp_path, data=small_world)
    keys = ("train_loss", "val_dice_best", "val_dice_05", "val_thr_best")
    for a, b in zip(plain.history, r.history, strict=True):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}  # exactly
        assert b["dropped_share"] == 0.0
    f, g = torch.load(tmp_path / "last.pt", weights_only=True)["models"]
    (alone,) = torch.load(plain_dir / "last.pt", weights_only=True)["models"]
    for k, w in alone.items():
        assert torch.equal(f[k], w), k  # bit for bit: the same ops in the same order
    assert not all(torch.equal(g[k], w) for k, w in alone.items())  # g is its own network
    best = torch.load(tmp_path / "best.pt", weights_only=True)["model"]
    alone_best = torch.load(plain_dir / "best.pt", weights_only=True)["model"]
    assert all(torch.equal(best[k], w) for k, w in alone_best.items())


def test_pixel_selection_drops_the_same_share_of_each_class():
    # Buildings are a minority whose losses are the largest while a network learns: ranked with
    # the background, every dropped pixel was a building (measured on the built-in world: 90%
    # of the dropped pixels, 15% of all), and the networks learnt to predict background.
    g = torch.Generator().manual_seed(1)
    t = (torch.rand(2, 1, 16, 16, generator=g) > 0.85).float()  # ~15% building
    losses = torch.rand(t.shape, generator=g) + 3 * t  # every building above the background
    n_bld, n_bg = int(t.sum()), int((1 - t).sum())
    assert not small_loss_mask(losses, 0.8)[t > 0].any()  # ranked together: buildings all gone
    keep = small_loss_mask_by_class(losses, t, 0.8)
    assert int(keep[t > 0].sum()) == math.ceil(0.8 * n_bld)
    assert int(keep[t == 0].sum()) == math.ceil(0.8 * n_bg)
    # within a class the smallest losses are kept
    kept_bg, dropped_bg = losses[(t == 0) & keep], losses[(t == 0) & ~keep]
    assert kept_bg.max() <= dropped_bg.min()
    # one class only, or keep everything: as small_loss_mask
    assert torch.equal(small_loss_mask_by_class(losses, t * 0, 0.8), small_loss_mask(losses, 0.8))
    assert small_loss_mask_by_class(losses, t, 1.0).all()

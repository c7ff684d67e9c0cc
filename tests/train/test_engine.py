import copy
import json
import shutil
import time
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from bldseg import metrics
from bldseg.predict import (
    EnsembleSpec,
    load_checkpoint,
    predict_cache,
    predict_image,
    write_submission,
)
from bldseg.train import engine
from bldseg.train.augment import IMAGENET_MEAN, IMAGENET_STD
from bldseg.train.config import RunConfig
from bldseg.train.engine import fit, threshold_metrics
from bldseg.train.losses import LOSSES, bce_loss
from bldseg.train.suspects import precision_at_k, rank_suspects, write_suspects

BASE = {
    "aug.crop_size": 64,
    "batch_size": 8,
    "val_fraction": 0.25,
    "samples_per_epoch": 64,
    "optim.lr": 3e-3,
    "impl": "compiled",
}


def cfg(**kw) -> RunConfig:
    return RunConfig.from_flat({**BASE, **kw})


@pytest.fixture(scope="module")
def trained(small_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return fit(cfg(epochs=6), out, data=small_world, resume=False), out


def test_tiny_model_learns(trained):
    result, out = trained
    assert result.status == "completed" and len(result.history) == 6
    dice = [h["val_dice_best"] for h in result.history]
    # the second half of training beats the first epoch clearly (6 validation images of 96 px
    # make one epoch's score noisy, so the best of the last three epochs)
    assert max(dice[-3:]) > dice[0] + 0.08, dice
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < 0.7 * losses[0], losses
    for name in ("best.pt", "last.pt", "val_probs.npz", "history.json", "augmentation.json"):
        assert (out / name).exists(), name
    for png in ("curves.png", "threshold_curve.png", "roc.png", "worst_tiles.png"):
        assert (out / "plots" / png).stat().st_size > 5000, png


def test_saved_library_matches_best_epoch(trained, small_world):
    result, out = trained
    z = np.load(out / "val_probs.npz")
    assert z["probs"].dtype == np.uint8 and z["probs"].shape == z["truth"].shape
    assert len(z["tile_ids"]) == len(z["probs"]) == len(z["image_ids"])
    # the metrics of the saved maps are the best epoch's metrics, recomputed from scratch
    m = threshold_metrics(z["probs"], z["truth"].astype(bool))
    assert m["dice_best"] == pytest.approx(result.best["val_dice_best"], abs=1e-12)
    # truth really is the cached mask under each tile
    i = small_world.train.ids.index(str(z["image_ids"][0]))
    y, x = z["tile_yx"][0]
    s = z["probs"].shape[-1]
    np.testing.assert_array_equal(z["truth"][0], small_world.train.masks[i, y : y + s, x : x + s])


def _brute_best(probs, truth, levels) -> tuple[float, int]:
    """Best score and its lowest level among ``levels``, by thresholding each one."""
    score, neg_level = max((metrics.competition_score(probs >= L, truth), -L) for L in levels)
    return score, -neg_level


def test_threshold_metrics_agree_with_brute_force(trained):
    _, out = trained
    z = np.load(out / "val_probs.npz")
    probs, truth = z["probs"], z["truth"].astype(bool)
    m = threshold_metrics(probs, truth, 0.3, 0.7, wide=None)
    assert m["dice_05"] == metrics.competition_score(probs >= 128, truth)
    score, level = _brute_best(probs, truth, range(77, 179))  # 0.30..0.70
    assert m["dice_best"] == score and m["thr_best"] == level / 255
    assert m["thr_widened"] == 0.0
    # with widening (the default) the choice is the narrow one unless that sat on an edge
    w = threshold_metrics(probs, truth, 0.3, 0.7)
    if level in (77, 178):
        wide_score, wide_level = _brute_best(probs, truth, range(13, 243))  # 0.05..0.95
        assert w["thr_widened"] == 1.0
        if wide_score > score:
            assert (w["dice_best"], w["thr_best"]) == (wide_score, wide_level / 255)
    else:
        assert w == {**m, "thr_widened": 0.0}


@pytest.mark.parametrize("scale", [0.25, 1.0])
def test_threshold_on_the_edge_widens_the_sweep(scale):
    """Under-confident maps (all probabilities scaled down) have their best threshold below
    0.30: the sweep widens and finds it; confident maps keep the default range."""
    from bldseg.ensemble.synthetic import fake_library

    lib = fake_library(1, 32, 32, seed=5, noise=1.0)
    probs = np.round(lib.probs[0] * scale).astype(np.uint8)
    m = threshold_metrics(probs, lib.truth)
    score, level = _brute_best(probs, lib.truth, range(13, 243))  # 0.05..0.95
    if scale < 1:
        assert m["thr_widened"] == 1.0
        assert m["thr_best"] == level / 255 < 0.3 and m["dice_best"] == score
        narrow = threshold_metrics(probs, lib.truth, wide=None)
        assert narrow["thr_widened"] == 0.0 and narrow["thr_best"] == 77 / 255
        assert m["dice_best"] > narrow["dice_best"]
    else:
        assert m["thr_widened"] == 0.0 and 0.3 < m["thr_best"] < 0.7


def test_epoch_rows_record_the_widening(trained):
    result, out = trained
    assert all(h["val_thr_widened"] in (0.0, 1.0) for h in result.history)
    assert json.loads((out / "history.json").read_text())[-1]["val_thr_widened"] in (0.0, 1.0)


@pytest.mark.parametrize(
    "on",
    [
        {},
        # on a GPU dropout and drop-path draw from the CUDA generator, and fp16 has a loss scale:
        # last.pt must carry both
        pytest.param(
            {"device": "cuda", "precision": "fp16", "drop_path_rate": 0.2},
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"),
        ),
    ],
    ids=["cpu", "cuda-fp16"],
)
def test_resume_continues_exactly(small_world, tmp_path, on):
    c = cfg(epochs=3, **on)
    straight = fit(c, tmp_path / "a", data=small_world)

    # interrupt after 2 epochs: run a 2-epoch prefix by stopping via the callback
    class Stop(Exception):
        pass

    def stop_after_two(row, _):
        if row["epoch"] == 2:
            raise Stop

    with pytest.raises(Stop):
        fit(c, tmp_path / "b", data=small_world, on_epoch_end=stop_after_two)
    resumed = fit(c, tmp_path / "b", data=small_world)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    for a, b in zip(straight.history, resumed.history, strict=True):
        assert a["train_loss"] == b["train_loss"] and a["val_dice_best"] == b["val_dice_best"]
    sa = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["models"][0]
    sb = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["models"][0]
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_killed_between_best_and_last_keeps_one_story(small_world, tmp_path, monkeypatch):
    # A run killed after a new best epoch's files but before last.pt: best.pt must still be
    # the best epoch last.pt records, and the resumed run must end as an uninterrupted one.
    c = cfg(epochs=3)
    straight = fit(c, tmp_path / "a", data=small_world)
    out = tmp_path / "b"
    save = engine._save_atomic

    class Killed(Exception):
        pass

    def killed_at_a_later_best(obj, path):
        if path.name == "last.pt" and obj["epoch"] >= 2 and obj["best"]["epoch"] == obj["epoch"]:
            raise Killed(obj["epoch"])
        save(obj, path)

    monkeypatch.setattr(engine, "_save_atomic", killed_at_a_later_best)
    with pytest.raises(Killed) as killed:
        fit(c, out, data=small_world)
    monkeypatch.setattr(engine, "_save_atomic", save)
    recorded = torch.load(out / "last.pt", weights_only=True)["best"]["epoch"]
    assert recorded < killed.value.args[0]
    assert torch.load(out / "best.pt", weights_only=True)["epoch"] == recorded
    resumed = fit(c, out, data=small_world)
    for key in ("epoch", "val_dice_best", "train_loss"):
        assert resumed.best[key] == straight.best[key], key
    best_a = torch.load(tmp_path / "a" / "best.pt", weights_only=True)
    best_b = torch.load(out / "best.pt", weights_only=True)
    assert best_b["epoch"] == straight.best["epoch"]
    for k, v in best_a["model"].items():
        assert torch.equal(v, best_b["model"][k]), k
    a, b = np.load(tmp_path / "a" / "val_probs.npz"), np.load(out / "val_probs.npz")
    assert np.array_equal(a["probs"], b["probs"])
    assert not list(out.glob("*.pending"))


def test_a_last_batch_of_one_image_is_dropped(small_world, tmp_path):
    # 17 samples in batches of 8: a last batch of one would stop BatchNorm after UPerNet's
    # 1x1 pyramid pooling ("Expected more than 1 value per channel") at the end of epoch 1.
    c = cfg(epochs=2, samples_per_epoch=17)
    assert engine.steps_per_epoch(c, small_world) == 2
    result = fit(c, tmp_path, data=small_world)
    assert result.status == "completed" and len(result.history) == 2
    # 18 samples keep their short last batch of two
    assert engine.steps_per_epoch(cfg(samples_per_epoch=18), small_world) == 3


def test_an_epoch_without_a_step_is_refused(small_world, tmp_path):
    # one sample in batches of 8: its batch of one is dropped, and the run "completed" with
    # an untrained best.pt and train_loss 0.0
    with pytest.raises(ValueError, match=r"no training step.*samples_per_epoch=1.*batch_size=8"):
        fit(cfg(epochs=1, samples_per_epoch=1), tmp_path, data=small_world)
    assert not (tmp_path / "best.pt").exists()


def test_logged_lr_is_the_one_the_last_step_used(small_world, tmp_path):
    # OneCycle's LR read after the epoch's last sch.step() lies past the schedule's end
    c = cfg(epochs=2, samples_per_epoch=32, **{"sched.name": "onecycle"})
    result = fit(c, tmp_path, data=small_world)
    final = c.optim.lr / c.sched.div_factor / c.sched.final_div_factor
    assert result.history[-1]["lr"] == pytest.approx(final, rel=1e-6)


def test_tile_coteaching_that_drops_nothing_says_so(small_world, tmp_path):
    # Algorithm 1 keeps at least R(T)|D| samples: floor(0.1 * 8) = 0 tiles dropped per batch
    c = cfg(epochs=1, samples_per_epoch=16, **{"coteach.enabled": True, "coteach.tau": 0.1})
    with pytest.warns(UserWarning, match=r"= 0 tiles per batch.*batch_size >= 10"):
        fit(c, tmp_path / "tile", data=small_world)
    pixel = c.with_updates({"coteach.granularity": "pixel"})
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="co-teaching drops")
        fit(pixel, tmp_path / "pixel", data=small_world)


@pytest.fixture(scope="module")
def one_epoch_run(small_world, tmp_path_factory):
    """A finished one-epoch run folder; tests that damage it work on their own copy."""
    out = tmp_path_factory.mktemp("one_epoch") / "run"
    fit(cfg(epochs=1), out, data=small_world)
    return out


def test_resume_refuses_other_config(small_world, one_epoch_run, tmp_path):
    tmp_path = shutil.copytree(one_epoch_run, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    other = cfg(epochs=1, **{"optim.lr": 1e-3, "aug.crop_size": 48})
    with pytest.raises(ValueError, match=r"different config \(aug.crop_size: 64 -> 48, optim"):
        fit(other, tmp_path, data=small_world)
    # refused before writing: augmentation.json was rewritten for the refused config
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def _flip_a_tensor_byte(path) -> str:
    """Flips one byte inside the largest tensor member of the checkpoint ``path``, keeping its
    length (a bad disk sector, a faulty copy); returns the member's name."""
    import zipfile

    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    assert info.compress_type == zipfile.ZIP_STORED  # torch stores tensors uncompressed
    # the local header's lengths: its extra field (alignment padding) is not the central one's
    name_len, extra_len = (
        int.from_bytes(raw[info.header_offset + o :][:2], "little") for o in (26, 28)
    )
    raw[info.header_offset + 30 + name_len + extra_len + info.file_size // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    return info.filename


@pytest.mark.parametrize("damage", ["truncated", "missing", "flipped"])
def test_a_finished_run_with_an_unreadable_best_pt_is_not_reported_done(
    small_world, one_epoch_run, tmp_path, damage
):
    # Run again, a finished run said "completed ... best.pt" over a best.pt nothing could load;
    # last.pt cannot give that epoch's weights back, so it is refused, naming the file
    tmp_path = shutil.copytree(one_epoch_run, tmp_path / "run")
    best = tmp_path / "best.pt"
    said = ""
    if damage == "truncated":
        best.write_bytes(best.read_bytes()[:1000])
    elif damage == "missing":
        best.unlink()
    else:
        # same length, one tensor byte changed: torch loads it, only the checksums tell
        member = _flip_a_tensor_byte(best)
        said = f".*the checksum of its member {member} does not match its bytes"
    with pytest.raises(
        ValueError, match=r"best\.pt holds the best epoch \(1\) of this run and" + said
    ):
        fit(cfg(epochs=1), tmp_path, data=small_world)


def test_a_damaged_last_pt_says_how_to_go_on(small_world, one_epoch_run, tmp_path):
    tmp_path = shutil.copytree(one_epoch_run, tmp_path / "run")
    last = tmp_path / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"last\.pt is not a readable.*train into another --out"):
        fit(cfg(epochs=1), tmp_path, data=small_world)


def test_coteaching_end_to_end(small_world, tmp_path):
    c = cfg(epochs=2, **{"coteach.enabled": True, "coteach.tau": 0.25, "coteach.t_k": 1})
    r = fit(c, tmp_path, data=small_world)
    assert r.status == "completed"
    assert [h["keep_ratio"] for h in r.history] == [1.0, 0.75]
    # the run's model is network f; g's score is logged beside it, as a number
    assert all("val_net" not in h and isinstance(h["val_dice_best_peer"], float) for h in r.history)
    # measured: the first epoch keeps every tile, the second drops one of each batch of 4
    assert [h["dropped_share"] for h in r.history] == [0.0, 0.25]
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert len(state["models"]) == 2


def test_diverging_run_ends_as_diverged(small_world, tmp_path, monkeypatch):
    def nan_after_first_step(logits, target, weight=None):
        nan_after_first_step.calls += 1
        base = bce_loss(logits, target, weight)
        return base * float("nan") if nan_after_first_step.calls > 2 else base

    nan_after_first_step.calls = 0
    monkeypatch.setitem(LOSSES, "bce", nan_after_first_step)
    r = fit(cfg(epochs=2), tmp_path, data=small_world)
    assert r.status == "diverged"
    assert "became nan at epoch 1, step 2" in r.message
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "diverged"


def test_train_command_fails_on_a_diverged_run(small_world, tmp_path, monkeypatch, capsys):
    from bldseg.commands import train as train_cmd

    def nan_loss(logits, target, weight=None):
        return bce_loss(logits, target, weight) * float("nan")

    monkeypatch.setitem(LOSSES, "bce", nan_loss)
    argv = ["--data", str(small_world.root), "--out", str(tmp_path / "run")]
    for kv in ("loss=bce", "epochs=1", "samples_per_epoch=16", "aug.crop_size=32"):
        argv += ["--set", kv]
    assert train_cmd.main(argv) == 1
    assert "error: training diverged: " in capsys.readouterr().err


def test_train_command_reports_what_fit_refuses(small_world, tmp_path, capsys):
    # errors in the user's input that fit() finds were tracebacks
    from bldseg.commands import train as train_cmd

    argv = ["--data", str(small_world.root), "--out", str(tmp_path / "run"), "--set", "epochs=1"]
    assert train_cmd.main([*argv, "--pretrained", str(tmp_path / "none.pth")]) == 1
    err = capsys.readouterr().err
    assert "error: " in err and "none.pth" in err and "Traceback" not in err


def test_layer_decay_groups():
    from bldseg.models import create_model

    model = create_model("upernet_internimage_tiny", impl="reference")
    c = cfg(**{"optim.layer_decay": 0.5, "optim.weight_decay": 0.1})
    check_layer_decay_groups(model, engine.build_optimizer(model, c))


def check_layer_decay_groups(model, opt) -> None:
    """The groups of optim.layer_decay=0.5, optim.weight_decay=0.1 on the tiny model."""
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    stem = by_param[id(named["backbone.patch_embed.conv1.weight"])]
    head = by_param[id(named["decode_head.classifier.weight"])]
    assert head["lr"] == pytest.approx(3e-3) and stem["lr"] == pytest.approx(3e-3 * 0.5**6)
    assert by_param[id(named["backbone.patch_embed.conv1.bias"])]["weight_decay"] == 0.0
    assert head["weight_decay"] == 0.1


def test_layer_decay_and_weight_decay_follow_the_official_constructor():
    # InternImage-T (depths 4, 4, 18, 4) with the official fine-tuning config's
    # layer_decay_rate 0.9: ids 0 (stem) .. 31 (heads), scale 0.9 ** (31 - id). A level's
    # norm/downsample take the next level's first block's id, levels 2 and 3 both 1+4+4+18.
    from bldseg.models import create_model

    model = create_model("upernet_internimage_t", impl="reference")
    c = cfg(**{"optim.layer_decay": 0.9, "optim.weight_decay": 0.05, "optim.lr": 0.5})
    opt = engine.build_optimizer(model, c)
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    expected_id = {
        "backbone.patch_embed.conv1.weight": 0,
        "backbone.levels.0.blocks.0.mlp.fc1.weight": 1,
        "backbone.levels.0.blocks.3.mlp.fc1.weight": 4,
        "backbone.levels.0.downsample.conv.weight": 5,
        "backbone.levels.0.norm.0.weight": 5,
        "backbone.levels.1.blocks.0.mlp.fc1.weight": 5,
        "backbone.levels.1.downsample.conv.weight": 9,
        "backbone.levels.2.blocks.17.mlp.fc1.weight": 26,
        "backbone.levels.2.downsample.conv.weight": 27,
        "backbone.levels.3.blocks.0.mlp.fc1.weight": 27,
        "backbone.levels.3.norm.0.weight": 27,
        "backbone.levels.3.blocks.3.mlp.fc1.weight": 30,
        "decode_head.classifier.weight": 31,
    }
    for name, layer in expected_id.items():
        assert by_param[id(named[name])]["lr"] == pytest.approx(0.5 * 0.9 ** (31 - layer)), name
    # Weight decay as the official constructor: not on 1-D parameters (norms, biases, layer
    # scale); on every matrix, the offset projections included (official name "dcn.offset";
    # its "sampling_offsets" rule is Deformable DETR's name and matches nothing here).
    wd = {n: by_param[id(p)]["weight_decay"] for n, p in named.items()}
    assert wd["backbone.levels.1.blocks.2.dcn.offset.weight"] == 0.05
    assert wd["backbone.levels.1.blocks.2.dcn.offset.bias"] == 0.0
    assert wd["backbone.levels.1.blocks.2.dcn.mask.weight"] == 0.05
    assert wd["backbone.levels.0.downsample.norm.1.weight"] == 0.0
    assert all((v == 0.0) == (named[n].ndim == 1) for n, v in wd.items())


def test_optimizer_is_fused_and_matches_the_loop_implementation():
    from bldseg.models import create_model

    torch.manual_seed(0)
    model = create_model("upernet_internimage_tiny", impl="reference").eval()  # no dropout
    c = cfg(**{"optim.layer_decay": 0.5, "optim.weight_decay": 0.1})
    opt = engine.build_optimizer(model, c)
    assert all(g["fused"] for g in opt.param_groups)
    # The same groups (LRs, decays) on a copy, with torch's per-parameter loop.
    loop_model = copy.deepcopy(model)
    by_name = dict(loop_model.named_parameters())
    names = {id(p): n for n, p in model.named_parameters()}
    loop_opt = torch.optim.AdamW(
        [
            {**g, "params": [by_name[names[id(p)]] for p in g["params"]], "fused": None}
            for g in opt.param_groups
        ],
        foreach=False,
    )
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(2, 3, 32, 32)
    for _ in range(3):
        for m, o in ((model, opt), (loop_model, loop_opt)):
            o.zero_grad()
            m(x).square().mean().backward()  # eval mode: the logits (N, 1, H, W)
            o.step()
    moved = 0
    for name, p in model.named_parameters():
        # atol: the zero-initialised offset weights get gradients near Adam's eps, where the
        # two implementations' rounding, compounded over 3 steps, moves an element by ~1e-6
        # (a step moves it by ~lr = 3e-3)
        torch.testing.assert_close(p, by_name[name], atol=1e-5, rtol=1e-5, msg=name)
        moved += not torch.equal(p, start[name])
    assert moved > len(start) // 2


class Skewed(torch.nn.Module):
    """Probability = a red + b column ramp + c row ramp: no flip leaves it unchanged."""

    # odd weights, so that no pixel of the test's views sits on a half level (see the test)
    a, b, c = 0.5917, 0.2931, 0.1152

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        red = x[:, :1].double() * IMAGENET_STD[0] + IMAGENET_MEAN[0]  # (B, 1, H, W) in [0, 1]
        h, w = x.shape[-2:]
        rows = torch.linspace(0, 1, h, dtype=torch.float64)[:, None]  # (H, 1)
        cols = torch.linspace(0, 1, w, dtype=torch.float64)[None, :]  # (1, W)
        p = self.a * red + self.b * cols + self.c * rows
        return torch.logit(p.clamp(1e-9, 1 - 1e-9)).float()  # (B, 1, H, W)


def test_tta_is_the_mean_of_the_three_views_flipped_back():
    rng = np.random.default_rng(0)
    s = 32
    rgb = rng.integers(0, 256, (2, s, s, 3), dtype=np.uint8)  # (B, S, S, 3)
    x = (rgb / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    x = torch.from_numpy(x.transpose(0, 3, 1, 2)).float()  # (B, 3, S, S), as TileDataset gives
    # By hand: each view's map flipped back onto the image keeps the red term in place and
    # mirrors only the ramp of the axis it flipped.
    red = rgb[..., 0] / 255.0  # (B, S, S)
    ramp = np.linspace(0, 1, s)
    col, row = ramp[None, None, :], ramp[None, :, None]
    a, b, c = Skewed.a, Skewed.b, Skewed.c
    identity = a * red + b * col + c * row
    h_flip = a * red + b * col[..., ::-1] + c * row
    v_flip = a * red + b * col + c * row[:, ::-1]
    mean = (identity + h_flip + v_flip) / 3  # (B, S, S) float64
    # no pixel within 2e-4 of a level's rounding edge, where the float32 sigmoid could round
    # it the other way, so the quantised maps must agree exactly
    assert np.abs((mean * 255) % 1 - 0.5).min() > 2e-4
    expected = metrics.quantise(mean)
    assert (expected != metrics.quantise(identity)).mean() > 0.5  # TTA really changes the map
    got = engine.predict_probs(Skewed(), [{"image": x[:1]}, {"image": x[1:]}], "cpu", tta=True)
    np.testing.assert_array_equal(got, expected)
    # without TTA: the identity view alone
    plain = engine.predict_probs(Skewed(), [{"image": x}], torch.device("cpu"))
    np.testing.assert_array_equal(plain, metrics.quantise(identity))
    # two models (a K-fold run's): the mean of all six views, quantised once
    both = engine.predict_probs([Skewed(), Skewed()], [{"image": x}], torch.device("cpu"), tta=True)
    np.testing.assert_array_equal(both, expected)
    # a tile-sized image through prediction's sliding window: the same map
    tile = predict_image(Skewed(), rgb[0], window=s, tta=True, device="cpu")
    np.testing.assert_array_equal(tile, expected[0])


def test_predict_writes_scored_submission(trained, small_world, tmp_path):
    result, out = trained
    _model, c, m = load_checkpoint(out / "best.pt")
    assert c.epochs == 6 and m["epoch"] == result.best["epoch"]
    spec = EnsembleSpec([str(out / "best.pt")], threshold=result.best["val_thr_best"])
    pred = predict_cache(spec, small_world.test, progress=False)
    sub = write_submission(small_world.test.ids, pred, tmp_path / "submission.csv")
    assert list(sub["img_id"]) == list(pd.read_csv(small_world.root / "test.csv")["img_id"])
    assert ((sub["mask_rle"] == "-1") == (pred.sum((1, 2)) == 0)).all()
    score = metrics.score_csv(small_world.test_truth_csv, tmp_path / "submission.csv")
    assert 0.0 < score <= 1.0
    # two copies of the same model as an equal-weight ensemble predict exactly the same
    pair = EnsembleSpec([str(out / "best.pt")] * 2, threshold=spec.threshold)
    assert np.array_equal(predict_cache(pair, small_world.test, progress=False), pred)
    spec.min_area = 10**6
    assert not predict_cache(spec, small_world.test, progress=False).any()


def test_suspects_rank_noisy_masks_first(trained, small_world, tmp_path):
    _, out = trained
    model, _, m = load_checkpoint(out / "best.pt")
    # at the model's own threshold, as the suspects command ranks (this briefly trained model
    # predicts nothing at 0.5, which would rank the images by mask size alone)
    thr = m["val_thr_best"]
    df = rank_suspects(model, small_world.train, range(len(small_world.train)), threshold=thr)
    assert len(df) == 24 and df["smoothed_dice"].is_monotonic_increasing
    assert df["pred_pixels"].gt(0).mean() > 0.5
    noise = pd.read_csv(small_world.root / "train_noise.csv")
    noisy = set(noise.loc[noise["noise"] != "none", "img_id"])
    assert len(noisy) == 7  # a random ranking finds 7/24 = 0.29 of them in its top 7
    # found 4 of 7 when written; 3 of 7 leaves one image of slack and still beats chance
    assert precision_at_k(df["img_id"], noisy) >= 3 / 7
    csv, png = write_suspects(df, small_world.train, model, tmp_path, top=4, threshold=thr)
    assert pd.read_csv(csv)["img_id"].tolist() == df["img_id"].tolist()
    assert png.stat().st_size > 5000


def test_crop_larger_than_the_images(small_world, tmp_path, capsys):
    # An explicit crop above the 96-px images is an error naming the flag to change ...
    with pytest.raises(ValueError, match=r"aug.crop_size=192 .*\(96x96\).*--set aug.crop_size=96"):
        fit(cfg(**{"aug.crop_size": 192}, epochs=1), tmp_path / "a", data=small_world)
    # ... while the CPU defaults' crop_fit trains on whole images and records that crop.
    run = fit(
        cfg(**{"aug.crop_size": 192, "aug.crop_fit": True}, epochs=1, samples_per_epoch=8),
        tmp_path / "b",
        data=small_world,
    )
    assert run.status == "completed"
    assert "crops of 96 px" in capsys.readouterr().out
    _, saved, _ = load_checkpoint(tmp_path / "b" / "best.pt")
    assert saved.aug.crop_size == 96 and saved.aug.crop_fit
    z = np.load(tmp_path / "b" / "val_probs.npz")
    assert z["probs"].shape[-2:] == (96, 96)


def test_a_progress_bar_does_not_change_training(small_world, tmp_path):
    # tqdm starts an extra iterator over the loader: the batches must not depend on it.
    c = cfg(epochs=1, samples_per_epoch=16, batch_size=4)
    quiet = fit(c, tmp_path / "quiet", data=small_world, progress=False, resume=False)
    shown = fit(c, tmp_path / "shown", data=small_world, progress=True, resume=False)
    for a, b in zip(quiet.history, shown.history, strict=True):
        assert a["train_loss"] == b["train_loss"] and a["val_dice_best"] == b["val_dice_best"]


def test_history_records_the_time_spent_waiting_for_batches(small_world, tmp_path, monkeypatch):
    from bldseg.data.dataset import RandomCropDataset

    read = RandomCropDataset.__getitem__

    def slow_read(self, item):  # a slow disk or augmentation: 20 ms per crop
        time.sleep(0.02)
        return read(self, item)

    monkeypatch.setattr(RandomCropDataset, "__getitem__", slow_read)
    result = fit(cfg(epochs=2, samples_per_epoch=16), tmp_path, data=small_world, resume=False)
    for row in result.history:
        # 16 crops at 20 ms each were waited for, inside the epoch's wall time
        assert 16 * 0.02 <= row["data_s"] < row["epoch_s"], row


def test_compiled_training_steps_train_the_same_model(small_world, tmp_path):
    # Dynamo's graph capture with the "eager" backend runs the captured graph as is: the
    # wiring (compiled steps, eager validation and checkpoints) without inductor's minutes of
    # compilation, and results equal to plain eager training.
    c = cfg(epochs=1, samples_per_epoch=16, batch_size=4)
    plain = fit(c, tmp_path / "plain", data=small_world, resume=False)
    traced = fit(c.with_updates({"compile": "eager"}), tmp_path / "c", data=small_world)
    assert traced.status == "completed"
    for a, b in zip(plain.history, traced.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_dice_best"] == pytest.approx(b["val_dice_best"], abs=1e-3)
    # the checkpoint holds the eager module's keys (no "_orig_mod." prefix)
    state = torch.load(tmp_path / "c" / "best.pt", weights_only=True)["model"]
    assert state.keys() == torch.load(tmp_path / "plain" / "best.pt")["model"].keys()
    with pytest.raises(ValueError, match=r"compile='nope' is not a torch\.compile backend"):
        cfg(compile="nope")


@pytest.mark.parametrize("channels_last", [True, False])
def test_channels_last_runs_keep_nhwc_weights_through_prediction(
    small_world, tmp_path, channels_last
):
    """``channels_last`` trains with NHWC weights, and the checkpoint's model is rebuilt the
    same way for prediction; both layouts compute the same function."""
    out = tmp_path / "run"
    fit(cfg(epochs=1, channels_last=channels_last), out, data=small_world)
    model, c, _ = load_checkpoint(out / "best.pt")
    assert c.channels_last is channels_last
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert convs and all(w.is_contiguous(memory_format=layout) for w in convs)
    other = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    assert not other.backbone.patch_embed.conv1.weight.is_contiguous(
        memory_format=torch.channels_last
    )
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # (B, 3, S, S)
    with torch.no_grad():
        torch.testing.assert_close(model(x), other(x), rtol=1e-4, atol=1e-5)

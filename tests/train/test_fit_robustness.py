"""Run folders stay consistent when things go wrong: a single run and a K-fold run never share
a folder, weights that became NaN end a run as diverged, the plots mark the threshold the run
predicts at, failed writes leave no temporary, and a resumed run rewrites its history."""

import errno
import json
import os
import shutil

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from bldseg import metrics
from bldseg.data.dataset import TileDataset, validation_tiles
from bldseg.models import create_model
from bldseg.train import engine, plots
from bldseg.train.augment import build_eval_transform
from bldseg.train.config import RunConfig
from bldseg.train.engine import (
    NonFiniteProbabilitiesError,
    fit,
    predict_probs,
    save_val_probs,
    threshold_metrics,
)
from bldseg.train.folds import FOLDS_FILE, fit_folds, oof_metrics, write_oof

# Two optimizer steps per epoch (16 crops of 32 px, batches of 8): seconds per run.
BASE = {
    "model": "upernet_internimage_tiny",
    "aug.crop_size": 32,
    "batch_size": 8,
    "val_fraction": 0.25,
    "samples_per_epoch": 16,
    "optim.lr": 3e-3,
    "impl": "compiled",
}


#: A sweep holding one threshold level (128/255).
ONE_LEVEL = {"threshold_lo": 0.5, "threshold_hi": 0.502}


def cfg(**kw) -> RunConfig:
    return RunConfig.from_flat({**BASE, **kw})


def listing(folder):
    """Every file under ``folder`` with its size and mtime (what a refused run must not touch)."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
    }


@pytest.fixture(scope="module")
def single_run(small_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    assert fit(cfg(epochs=1), out, data=small_world).status == "completed"
    return out


@pytest.fixture(scope="module")
def kfold_run(small_world, tmp_path_factory):
    # A one-level sweep (128/255 only): its best is on both edges, so the out-of-fold choice
    # is always made in the widened range.
    out = tmp_path_factory.mktemp("kfold") / "run"
    c = cfg(epochs=1, folds=2, **ONE_LEVEL)
    assert fit_folds(c, out, data=small_world).status == "completed"
    return out


# 1. a single run and a K-fold run never share a folder


def test_fit_refuses_a_kfold_run_folder(kfold_run, small_world):
    before = listing(kfold_run)
    with pytest.raises(ValueError, match=r"folds\.json.*another --out"):
        fit(cfg(epochs=1), kfold_run, data=small_world)
    assert listing(kfold_run) == before


def test_fit_refuses_a_folder_holding_fold_runs(single_run, small_world, tmp_path):
    # a fold trained on its own machine, its folder copied over before folds.json
    (tmp_path / "fold1").mkdir()
    shutil.copy(single_run / "last.pt", tmp_path / "fold1" / "last.pt")
    with pytest.raises(ValueError, match=r"fold1.last\.pt.*another --out"):
        fit(cfg(epochs=1), tmp_path, data=small_world)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fold1"]


def test_fit_folds_refuses_a_single_run_folder(single_run, small_world):
    before = listing(single_run)
    with pytest.raises(ValueError, match=r"last\.pt.*another --out"):
        fit_folds(cfg(epochs=1, folds=2), single_run, data=small_world)
    assert listing(single_run) == before and not (single_run / FOLDS_FILE).exists()


def test_kfold_run_trains_its_folds_in_sub_folders(kfold_run):
    # fit_folds' own fits into fold<f>/ are not refused
    for f in (0, 1):
        assert (kfold_run / f"fold{f}" / "best.pt").is_file()
    assert not (kfold_run / "last.pt").exists() and (kfold_run / FOLDS_FILE).is_file()


# 2. non-finite weights end the run as diverged


def test_nan_gradients_on_an_epochs_last_step_end_the_run_as_diverged(
    small_world, tmp_path, monkeypatch
):
    # The loss is finite, the backward overflows: the weights become NaN after the epoch's
    # last step (the second), so no loss sees them before validation does.
    real = engine.clip_grad_norm_
    calls = [0]

    def overflowing(params, max_norm):
        params = list(params)
        calls[0] += 1
        if calls[0] == 2:
            for p in params:
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
        return real(params, max_norm)

    monkeypatch.setattr(engine, "clip_grad_norm_", overflowing)
    result = fit(cfg(epochs=2), tmp_path, data=small_world)
    assert result.status == "diverged", result.message
    assert "epoch 1" in result.message and "non-finite" in result.message
    # the advice leaves out what the run already does (clipping on, float32)
    assert result.message.endswith(
        "(its gradients overflowed); lower optim.lr / optim.weight_decay"
    )
    status = json.loads((tmp_path / "status.json").read_text())
    assert status == {"status": "diverged", "message": result.message}
    # the diverged epoch is not recorded: no checkpoint holds NaN weights
    assert result.history == [] and not (tmp_path / "last.pt").exists()


@pytest.mark.parametrize(
    ("flat", "amp", "advice"),
    [
        ({}, None, "lower optim.lr / optim.weight_decay"),
        (
            {"optim.grad_clip": 0.0},
            None,
            "lower optim.lr / optim.weight_decay or set optim.grad_clip (e.g. 1.0)",
        ),
        (
            {"optim.grad_clip": 0.0},
            torch.bfloat16,
            "lower optim.lr / optim.weight_decay, set optim.grad_clip (e.g. 1.0) or train with "
            "precision=fp32",
        ),
        ({}, torch.bfloat16, "lower optim.lr / optim.weight_decay or train with precision=fp32"),
    ],
)
def test_divergence_advice_leaves_out_what_the_run_already_does(flat, amp, advice):
    # it told a run with clipping on to set optim.grad_clip, and an fp32 run to train in fp32
    assert engine._divergence_advice(cfg(**flat), amp) == advice


def test_predict_probs_names_non_finite_probabilities(small_world):
    model = create_model("upernet_internimage_tiny")
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    cache = small_world.train
    tiles = validation_tiles(cache, np.arange(2), 32)[:2]
    loader = DataLoader(TileDataset(cache, tiles, build_eval_transform()), batch_size=2)
    with pytest.raises(NonFiniteProbabilitiesError, match="not finite"):
        predict_probs(model, loader, torch.device("cpu"))


# 3. threshold_curve.png marks the threshold the run predicts at


def legend_of(monkeypatch, name: str) -> dict[str, list[str]]:
    """Records the legend of each figure named ``name`` as it is saved."""
    seen: dict[str, list[str]] = {}
    real = plots.save_figure

    def recording(fig, path, dpi=110):
        if path.name == name:
            seen[name] = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        return real(fig, path, dpi)

    monkeypatch.setattr(plots, "save_figure", recording)
    return seen


def write_library(folder, probs, truth, **extra):
    ids = np.array([f"t{i}" for i in range(len(probs))])
    np.savez(
        folder / "val_probs.npz",
        probs=probs,
        truth=truth,
        tile_ids=ids,
        image_ids=ids,
        group_ids=ids,
        tile_yx=np.zeros((len(probs), 2), np.int64),
        **extra,
    )


def test_single_run_plot_marks_its_recorded_threshold(tmp_path, monkeypatch):
    # Buildings at p=0.39, background at 0.02: every threshold between scores 1; the default
    # range's best (0.302) sits on its edge, the widened sweep ties and keeps it.
    truth = np.zeros((4, 16, 16), np.uint8)
    truth[:, 4:10, 4:10] = 1
    probs = np.where(truth == 1, 100, 5).astype(np.uint8)
    tm = threshold_metrics(probs, truth)
    assert tm["thr_widened"] == 1.0 and tm["thr_best"] == pytest.approx(77 / 255)
    write_library(tmp_path, probs, truth)
    row = {"epoch": 1, "train_loss": 1.0, "lr": 1e-3, **{f"val_{k}": v for k, v in tm.items()}}
    (tmp_path / "history.json").write_text(json.dumps([row]))
    seen = legend_of(monkeypatch, "threshold_curve.png")
    lo, hi = metrics.widened_range(0.3, 0.7)  # as fit draws a widened best epoch
    plots.write_run_plots(tmp_path, None, lo=lo, hi=hi)
    assert f"best {metrics.threshold_text(tm['thr_best'])}: 1.0000" in seen["threshold_curve.png"]


def test_kfold_plot_marks_the_out_of_fold_threshold(tmp_path, monkeypatch):
    # Buildings at p~0.12-0.23: the out-of-fold choice widens below 0.3
    rng = np.random.default_rng(0)
    truth = np.zeros((6, 16, 16), np.uint8)
    truth[:, 4:10, 4:10] = 1
    probs = np.where(
        truth == 1, rng.integers(30, 60, truth.shape), rng.integers(0, 25, truth.shape)
    )
    write_library(tmp_path, probs.astype(np.uint8), truth, fold=np.array([0, 0, 0, 1, 1, 1]))
    oof = oof_metrics(tmp_path, 0.3, 0.7)
    assert oof["val_thr_widened"] == 1.0 and oof["val_thr_best"] < 0.3
    (tmp_path / FOLDS_FILE).write_text(json.dumps({"folds": 2, "oof": oof}))
    seen = legend_of(monkeypatch, "threshold_curve.png")
    # drawn over the default range: the marker is still the recorded choice, below it
    plots.write_run_plots(tmp_path, None, lo=0.3, hi=0.7)
    expected = f"best {metrics.threshold_text(oof['val_thr_best'])}: {oof['val_dice_best']:.4f}"
    assert expected in seen["threshold_curve.png"], seen


def test_fit_folds_shades_the_widened_range(small_world, tmp_path, monkeypatch):
    seen = legend_of(monkeypatch, "threshold_curve.png")
    c = cfg(epochs=1, folds=2, **ONE_LEVEL)
    assert fit_folds(c, tmp_path, data=small_world).status == "completed"
    oof = json.loads((tmp_path / FOLDS_FILE).read_text())["oof"]
    assert oof["val_thr_widened"] == 1.0
    legend = seen["threshold_curve.png"]
    lo, hi = metrics.widened_range(ONE_LEVEL["threshold_lo"], ONE_LEVEL["threshold_hi"])
    assert f"sweep {lo:.2f}-{hi:.2f}" in legend, legend
    assert any(
        t.startswith(f"best {metrics.threshold_text(oof['val_thr_best'])}:") for t in legend
    ), legend


# 4. failed writes leave no temporary


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if "tmp" in p.name)


def full_disk(path):
    """Writes part of a file, then fails as a full disk does."""
    with open(path, "wb") as f:
        f.write(b"\0" * 4096)
    raise OSError(errno.ENOSPC, "No space left on device")


def test_failed_checkpoint_write_leaves_no_temporary(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: full_disk(f))
    with pytest.raises(OSError, match="No space"):
        engine._save_atomic({"epoch": 1}, tmp_path / "last.pt")
    assert list(tmp_path.iterdir()) == []


def test_failed_library_write_leaves_no_temporary(small_world, tmp_path):
    cache = small_world.train
    tiles = validation_tiles(cache, np.arange(1), 32)[:1]
    # pickling a lambda fails after the archive is opened (probs is its first array)
    probs = np.array([lambda: 0], dtype=object)
    with pytest.raises(Exception, match="lambda"):
        save_val_probs(tmp_path / "val_probs.npz", probs, np.zeros((1, 32, 32)), tiles, cache.ids)
    assert list(tmp_path.iterdir()) == []


def test_oof_writes_leave_no_temporary_and_do_not_share_one(kfold_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(kfold_run, run)
    real = np.savez
    names = []

    def recording(file, **arrays):
        names.append(os.fspath(file))
        return real(file, **arrays)

    monkeypatch.setattr(np, "savez", recording)
    write_oof(run, 2)
    write_oof(run, 2)
    # two writers (folds finishing on two machines) each write their own temporary
    assert len(set(names)) == 2 and leftovers(run) == []
    monkeypatch.setattr(np, "savez", lambda file, **arrays: full_disk(file))
    with pytest.raises(OSError, match="No space"):
        write_oof(run, 2)
    assert leftovers(run) == []
    with np.load(run / "val_probs.npz") as z, np.load(kfold_run / "val_probs.npz") as was:
        assert np.array_equal(z["tile_ids"], was["tile_ids"])  # the library before stays whole


def test_failed_figure_write_leaves_no_temporary(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    fig.savefig = lambda path, **kw: full_disk(path)
    with pytest.raises(OSError, match="No space"):
        plots.save_figure(fig, tmp_path / "curves.png")
    assert list(tmp_path.iterdir()) == [] and not plt.fignum_exists(fig.number)


# 5. a resumed run rewrites a history.json its kill left stale


class Killed(Exception):
    pass


def test_resume_after_the_last_checkpoint_rewrites_history(small_world, tmp_path, monkeypatch):
    real = engine.write_json

    def killed_before_history(path, obj, *a, **k):
        if path.name == "history.json" and len(obj) == 2:
            raise Killed("killed after last.pt of epoch 2, before history.json")
        return real(path, obj, *a, **k)

    monkeypatch.setattr(engine, "write_json", killed_before_history)
    with pytest.raises(Killed):
        fit(cfg(epochs=2), tmp_path, data=small_world)
    assert len(json.loads((tmp_path / "history.json").read_text())) == 1
    monkeypatch.setattr(engine, "write_json", real)
    result = fit(cfg(epochs=2), tmp_path, data=small_world)  # the same command again
    assert result.status == "completed"
    assert [h["epoch"] for h in json.loads((tmp_path / "history.json").read_text())] == [1, 2]

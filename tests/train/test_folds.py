"""K-fold training end to end on the tiny world: folds, out-of-fold library, prediction, and
the ensemble search over K-fold runs."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bldseg import metrics
from bldseg.commands import train as train_cmd
from bldseg.data.dataset import fold_assignment, fold_indices, split_groups
from bldseg.data.readers import tile_windows
from bldseg.ensemble.library import find_runs, load_library
from bldseg.ensemble.run import SearchConfig, run_search
from bldseg.predict import EnsembleSpec, image_loader, load_member, member_config, predict_cache
from bldseg.train import folds as folds_module
from bldseg.train.config import RunConfig
from bldseg.train.engine import eval_autocast, predict_probs, threshold_metrics
from bldseg.train.folds import fit_folds, fold_config

# The tiny world's images are TRAIN_0000..TRAIN_0023: grouped by their tens digit, 3 "scenes".
SCENES = r"TRAIN_\d\d(\d)"
TINY = [
    "aug.crop_size=64",
    "batch_size=8",
    "samples_per_epoch=32",
    "epochs=2",
    "impl=compiled",
]


def train(world, out: Path, *extra: str) -> int:
    argv = ["--data", str(world.root), "--data-root", str(world.root.parent), "--out", str(out)]
    argv += ["--split-group", SCENES, *extra]
    for s in TINY:
        argv += ["--set", s]
    return train_cmd.main(argv)


@pytest.fixture(scope="module")
def kfold_runs(small_world, tmp_path_factory):
    """Two configurations, each trained as a 2-fold run by the train command."""
    root = tmp_path_factory.mktemp("kfold") / "runs"
    assert train(small_world, root / "a", "--folds", "2") == 0
    assert train(small_world, root / "b", "--folds", "2", "--set", "optim.lr=3e-3") == 0
    return root


def test_kfold_run_folder(kfold_runs):
    run = kfold_runs / "a"
    manifest = json.loads((run / "folds.json").read_text())
    assert manifest["folds"] == 2 and manifest["runs"] == ["fold0", "fold1"]
    assert manifest["status"] == "completed" and sum(manifest["val_images"]) == 24
    for f in (0, 1):
        for name in ("best.pt", "last.pt", "val_probs.npz", "history.json"):
            assert (run / f"fold{f}" / name).is_file(), (f, name)
        assert RunConfig.from_flat(torch.load(run / f"fold{f}" / "best.pt")["config"]).fold == f
    history = json.loads((run / "history.json").read_text())
    folds = [json.loads((run / f"fold{f}" / "history.json").read_text()) for f in (0, 1)]
    assert [h["epoch"] for h in history] == [1, 2]
    for e, row in enumerate(history):  # the mean over folds, and each fold's own
        assert row["val_dice_best"] == pytest.approx(
            (folds[0][e]["val_dice_best"] + folds[1][e]["val_dice_best"]) / 2
        )
        assert row["fold1_val_dice_best"] == folds[1][e]["val_dice_best"]
    # the out-of-fold metrics are those of the out-of-fold maps
    z = np.load(run / "val_probs.npz")
    oof = metrics.choose_level(
        metrics.dice_at_levels(z["probs"], z["truth"].astype(bool)), metrics.QUANT_MAX, 0.3, 0.7
    )
    assert manifest["oof"]["val_dice_best"] == pytest.approx(oof.score)
    assert {"curves.png", "threshold_curve.png", "worst_tiles.png"} <= {
        p.name for p in (run / "plots").glob("*.png")
    }


def test_oof_library_covers_every_training_image_once(kfold_runs, small_world):
    cache = small_world.train
    run = kfold_runs / "a"
    z = np.load(run / "val_probs.npz")
    groups = split_groups(cache, SCENES)
    windows = tile_windows(*cache.image_size, 64)
    assert len(z["tile_ids"]) == len(set(z["tile_ids"])) == len(cache) * len(windows)
    assert sorted(set(z["image_ids"])) == sorted(cache.ids)
    for t in range(len(z["tile_ids"])):  # the right truth under each tile, its scene recorded
        i = cache.ids.index(str(z["image_ids"][t]))
        y, x = z["tile_yx"][t]
        np.testing.assert_array_equal(z["truth"][t], cache.masks[i, y : y + 64, x : x + 64])
        assert z["group_ids"][t] == groups[i]
    for f in (0, 1):
        # fold f's tiles are exactly its validation images, at its own best epoch's maps
        _, val = fold_indices(len(cache), 2, f, 0, groups)
        mine = z["fold"] == f
        assert set(z["image_ids"][mine]) == {cache.ids[i] for i in val}
        own = np.load(run / f"fold{f}" / "val_probs.npz")
        np.testing.assert_array_equal(z["probs"][mine], own["probs"])
        np.testing.assert_array_equal(z["tile_ids"][mine], own["tile_ids"])
    # no scene is validated by two folds
    assert set(z["group_ids"][z["fold"] == 0]).isdisjoint(z["group_ids"][z["fold"] == 1])


def test_lockstep_trains_the_models_of_the_sequential_run(kfold_runs, small_world, tmp_path):
    manifest = json.loads((kfold_runs / "a" / "folds.json").read_text())
    cfg = RunConfig.from_flat(manifest["config"])
    seen = []

    def on_epoch_end(row, out):
        # the out-of-fold library is whole before each report (a search may stop here)
        z = np.load(out / "val_probs.npz")
        seen.append((row["epoch"], len(set(z["image_ids"]))))

    r = fit_folds(
        cfg, tmp_path / "lock", data=small_world, on_epoch_end=on_epoch_end, lockstep=True
    )
    assert r.status == "completed" and seen == [(1, 24), (2, 24)]
    # the same calls as the train command but without its progress bars (which change the
    # training stream of fit itself, with or without folds)
    fit_folds(cfg, tmp_path / "seq", data=small_world)
    a, b = np.load(tmp_path / "seq" / "val_probs.npz"), np.load(tmp_path / "lock" / "val_probs.npz")
    for key in ("probs", "tile_ids", "fold"):
        np.testing.assert_array_equal(a[key], b[key])


class Stopped(Exception):
    """What a search trial meets when ASHA stops it: its report never returns."""


def test_a_stopped_run_predicts_at_its_out_of_fold_threshold(small_world, tmp_path):
    # ASHA stops a search trial inside its report, so fit_folds never reaches its end: the
    # out-of-fold scores must be in folds.json before each report, or prediction uses 0.5.
    cfg = RunConfig.from_flat(
        {"aug.crop_size": 64, "batch_size": 8, "samples_per_epoch": 32, "epochs": 2}
        | {"impl": "compiled", "folds": 2, "split_group": SCENES}
    )

    def stop(row, out):
        raise Stopped

    run = tmp_path / "run"
    with pytest.raises(Stopped):
        fit_folds(cfg, run, data=small_world, on_epoch_end=stop, lockstep=True)
    manifest = json.loads((run / "folds.json").read_text())
    assert manifest["status"] == "running"
    z = np.load(run / "val_probs.npz")
    scores = threshold_metrics(z["probs"], z["truth"].astype(bool), 0.3, 0.7)
    assert manifest["oof"] == {f"val_{k}": v for k, v in scores.items()}
    _, found = member_config(run / "folds.json")
    assert found["val_thr_best"] == scores["thr_best"]


def test_one_fold_at_a_time(small_world, tmp_path):
    assert train(small_world, tmp_path, "--folds", "2", "--fold", "1") == 0
    assert (tmp_path / "fold1" / "best.pt").is_file() and not (tmp_path / "fold0").exists()
    assert not (tmp_path / "val_probs.npz").exists()  # not until every fold is trained
    # every fold with a best.pt, but no out-of-fold result yet (a --fold still training in
    # another process looks so): predicted at 0.5 with the folds as they were, without a word
    shutil.copytree(tmp_path / "fold1", tmp_path / "fold0")
    for use in (member_config, load_member):
        with pytest.raises(ValueError, match=r"folds\.json: the K-fold run is not finished"):
            use(tmp_path / "folds.json")
    shutil.rmtree(tmp_path / "fold0")
    done = (tmp_path / "fold1" / "best.pt").stat().st_mtime_ns
    assert train(small_world, tmp_path, "--folds", "2") == 0  # trains fold 0 only
    assert (tmp_path / "fold1" / "best.pt").stat().st_mtime_ns == done
    assert len(np.load(tmp_path / "val_probs.npz")["tile_ids"]) == 24 * 4


def test_a_finished_kfold_run_refuses_another_config(kfold_runs, small_world, tmp_path, capsys):
    # another config "completed" with the first one's folds, while folds.json now recorded it
    import shutil

    run = shutil.copytree(kfold_runs / "a", tmp_path / "a")
    before = (run / "folds.json").read_bytes()
    assert train(small_world, run, "--folds", "2", "--set", "optim.lr=0.001") == 1
    assert "folds.json was written by a different config (optim.lr: " in capsys.readouterr().err
    assert (run / "folds.json").read_bytes() == before
    assert train(small_world, run, "--folds", "2") == 0  # the same config: nothing to train


def test_fold_flags_are_checked(small_world, tmp_path, capsys):
    assert train(small_world, tmp_path / "x", "--folds", "4") == 1
    err = capsys.readouterr().err
    assert "--folds 4: the data has only 3 split group(s)" in err and "--folds 3" in err
    assert not (tmp_path / "x" / "fold0").exists()
    for flags, said in [
        (["--folds", "1"], "argument --folds: 1: K-fold training needs K >= 2"),
        (["--folds", "2", "--fold", "2"], "--fold 2: the folds of --folds 2 are 0..1"),
        (["--fold", "0"], "--fold F selects one fold of K-fold training: pass --folds K"),
    ]:
        with pytest.raises(SystemExit) as e:
            train(small_world, tmp_path / "y", *flags)
        assert e.value.code == 2 and said in capsys.readouterr().err, flags


def test_predicting_with_a_kfold_run_averages_its_folds(kfold_runs, small_world, tmp_path):
    run = kfold_runs / "a"
    models, cfg, found = load_member(run)
    assert len(models) == 2 and cfg.folds == 2
    manifest = json.loads((run / "folds.json").read_text())
    assert found["val_thr_best"] == manifest["oof"]["val_thr_best"]
    loader = image_loader(small_world.test, 8)
    q = predict_probs(models, loader, torch.device("cpu"))
    with torch.no_grad():  # by hand: the mean of the two folds' probabilities, quantised once
        x = torch.cat([b["image"] for b in loader])
        p = (torch.sigmoid(models[0](x)) + torch.sigmoid(models[1](x))) / 2
    np.testing.assert_array_equal(q, metrics.quantise(p[:, 0].numpy()))
    # the predict command takes the run folder as a checkpoint, at its out-of-fold threshold
    from bldseg.commands import predict as predict_cmd

    out = tmp_path / "sub.csv"
    argv = ["--checkpoint", str(run), "--data", str(small_world.root)]
    argv += ["--data-root", str(small_world.root.parent), "--out", str(out)]
    assert predict_cmd.main(argv) == 0
    level = metrics.level_from_threshold(found["val_thr_best"])
    spec = EnsembleSpec([str(run / "folds.json")], threshold=found["val_thr_best"])
    # predict runs under the run's autocast, as its validation maps were made
    cpu = torch.device("cpu")
    q_run = predict_probs(models, loader, cpu, eval_autocast(cfg.precision, cpu))
    np.testing.assert_array_equal(
        predict_cache(spec, small_world.test, progress=False), q_run >= level
    )


def test_ensemble_search_on_kfold_libraries(kfold_runs, small_world, tmp_path):
    runs = find_runs(kfold_runs)
    assert runs == [kfold_runs / "a", kfold_runs / "b"]  # the folds are no models of their own
    lib = load_library(runs, root=kfold_runs)
    assert lib.n_models == 2 and lib.n_tiles == 24 * 4
    assert lib.checkpoints == [kfold_runs / n / "folds.json" for n in "ab"]
    s = run_search(
        SearchConfig(runs=str(kfold_runs), k=[2], out=str(tmp_path / "ens"), progress=False)
    )
    # the selection/check split is by scene: 2 of the 3 scenes choose, the third checks
    summary = json.loads((tmp_path / "ens" / "summary.json").read_text())
    assert s.best["members"] and np.isfinite(summary["best"]["check_dice"])
    spec = EnsembleSpec.load(tmp_path / "ens" / "best_ensemble.json")
    assert [Path(c).name for c in spec.checkpoints] == ["folds.json", "folds.json"]
    pred = predict_cache(spec, small_world.test, progress=False)  # 2 runs x 2 folds
    assert pred.shape == (len(small_world.test), 32, 32) and pred.dtype == bool


def test_suspects_of_a_kfold_run_are_scored_out_of_fold(kfold_runs, small_world, tmp_path, capsys):
    from bldseg.commands import suspects as suspects_cmd

    cache = small_world.train
    run = kfold_runs / "a"
    argv = ["--data", str(small_world.root), "--data-root", str(small_world.root.parent)]
    assert suspects_cmd.main(["--checkpoint", str(run), *argv, "--out", str(tmp_path)]) == 0
    assert "each image scored by the fold that held it out" in capsys.readouterr().out
    df = pd.read_csv(tmp_path / "suspects.csv")
    assert sorted(df["img_id"]) == sorted(cache.ids)  # every image once
    groups = split_groups(cache, SCENES)
    for f in (0, 1):
        _, val = fold_indices(len(cache), 2, f, 0, groups)
        mine = df[df["fold"] == f]
        assert set(mine["img_id"]) == {cache.ids[i] for i in val}
        thr = torch.load(run / f"fold{f}" / "best.pt")["metrics"]["val_thr_best"]
        assert np.allclose(mine["threshold"], thr)
    # most suspect first, and the contact sheet drawn with each image's own fold
    assert df["smoothed_dice"].is_monotonic_increasing
    assert (tmp_path / "suspects.png").stat().st_size > 0

    # One model (a fold's best.pt): every image by that model, no fold columns.
    one = tmp_path / "one"
    ckpt = str(run / "fold0" / "best.pt")
    assert suspects_cmd.main(["--checkpoint", ckpt, *argv, "--out", str(one)]) == 0
    assert "fold" not in pd.read_csv(one / "suspects.csv").columns

    # A K-fold run of other images: refused with a message naming the run, nothing written.
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    z = dict(np.load(moved / "val_probs.npz"))
    z["image_ids"] = np.array([f"OTHER_{v}" for v in z["image_ids"]])
    np.savez(moved / "val_probs.npz", **z)
    bad = tmp_path / "bad"
    assert suspects_cmd.main(["--checkpoint", str(moved), *argv, "--out", str(bad)]) == 1
    err = capsys.readouterr().err
    assert str(moved) in err and "not in this data" in err and not bad.exists()

    # A wrong path is reported before the data is read.
    assert (
        suspects_cmd.main(["--checkpoint", str(tmp_path / "nope"), *argv, "--out", str(bad)]) == 1
    )
    assert "checkpoint not found" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# A run trained with --group-column (a data option, not in the run's config)
# --------------------------------------------------------------------------------------------

ONE_EPOCH = ["aug.crop_size=64", "batch_size=8", "samples_per_epoch=16", "epochs=1"]


def train_grouped(data: Path, out: Path, *extra: str) -> int:
    """The train command on a competition folder, without --split-group."""
    argv = ["--data", str(data), "--data-root", str(data.parent / "cache"), "--out", str(out)]
    for s in [*ONE_EPOCH, "impl=compiled"]:
        argv += ["--set", s]
    return train_cmd.main([*argv, "--folds", "2", *extra])


@pytest.fixture(scope="module")
def grouped(small_world, tmp_path_factory):
    """The tiny world's images as a competition folder whose train.csv has a ``scene`` column
    (3 scenes, interleaved), and a 2-fold run of it with --group-column scene, fold 0 only."""
    root = tmp_path_factory.mktemp("grouped")
    data = root / "data"
    data.mkdir()
    shutil.copytree(small_world.root / "train_img", data / "train_img")
    df = pd.read_csv(small_world.root / "train.csv")
    df["scene"] = [f"s{i % 3}" for i in range(len(df))]
    df.to_csv(data / "train.csv", index=False)
    run = root / "run"
    assert train_grouped(data, run, "--group-column", "scene", "--fold", "0") == 0
    return data, run


def test_resuming_with_other_split_groups_is_refused(grouped, tmp_path, capsys):
    # Resumed without --group-column, fold 1 was dealt by image: images validated by fold 0
    # were trained on by fold 1, found only at the end ("a tile is validated in two folds")
    # with the folder stuck. Refused now before anything trains, naming the flag.
    data, run = grouped
    copy = shutil.copytree(run, tmp_path / "run")
    manifest = json.loads((copy / "folds.json").read_text())
    assert manifest["split"]["images"] == 24
    before = (copy / "folds.json").read_bytes()
    assert train_grouped(data, copy) == 1
    err = capsys.readouterr().err
    assert "folds.json: the data's 24 images are dealt into other folds" in err
    assert "--group-column" in err and "--split-group" in err
    assert not (copy / "fold1").exists() and (copy / "folds.json").read_bytes() == before
    # a folds.json from before the split was recorded: the trained fold's images decide
    manifest.pop("split")
    (copy / "folds.json").write_text(json.dumps(manifest))
    assert train_grouped(data, copy) == 1
    err = capsys.readouterr().err
    assert f"{copy / 'fold0' / 'val_probs.npz'}: fold 0 " in err and "--group-column" in err
    assert not (copy / "fold1").exists()


def test_resuming_a_single_run_with_other_split_groups_is_refused(grouped, tmp_path, capsys):
    # A single run (no --folds) resumed without --group-column validated on images it had
    # trained on, without a word: last.pt records its split, compared before anything trains.
    data, _ = grouped
    argv = ["--data", str(data), "--data-root", str(data.parent / "cache")]
    argv += ["--out", str(tmp_path / "run")]
    for s in [*ONE_EPOCH, "impl=compiled"]:
        argv += ["--set", s]
    assert train_cmd.main([*argv, "--group-column", "scene"]) == 0
    before = (tmp_path / "run" / "last.pt").read_bytes()
    capsys.readouterr()
    assert train_cmd.main(argv) == 1
    err = capsys.readouterr().err
    assert "last.pt: the data's 24 images are split into training and validation otherwise" in err
    assert "--group-column" in err and "--split-group" in err
    assert (tmp_path / "run" / "last.pt").read_bytes() == before
    # with the same groups the (finished) run is continued: nothing left to train
    assert train_cmd.main([*argv, "--group-column", "scene"]) == 0
    assert len(json.loads((tmp_path / "run" / "history.json").read_text())) == 1


@pytest.fixture(scope="module")
def grouped_done(grouped):
    """The grouped run, completed with --group-column scene from a folds.json of before the
    split was recorded (such a run keeps working)."""
    data, run = grouped
    manifest = json.loads((run / "folds.json").read_text())
    manifest.pop("split")
    (run / "folds.json").write_text(json.dumps(manifest))
    assert train_grouped(data, run, "--group-column", "scene") == 0
    assert json.loads((run / "folds.json").read_text())["split"]["images"] == 24
    return data, run


def test_suspects_take_the_folds_the_run_recorded(grouped_done, tmp_path, capsys):
    # Without --group-column (not in the run's config) the folds were dealt again by image:
    # most images were scored by the fold model that had trained on them, silently.
    from bldseg.commands import suspects as suspects_cmd

    data, run = grouped_done
    z = np.load(run / "val_probs.npz")
    held = dict(zip(z["image_ids"].tolist(), z["fold"].tolist(), strict=True))
    ids = pd.read_csv(data / "train.csv")["img_id"].tolist()
    by_image = fold_assignment(len(ids), 2, 0)  # what dealing again without the groups gives
    assert any(held[i] != f for i, f in zip(ids, by_image, strict=True))
    argv = ["--data", str(data), "--data-root", str(data.parent / "cache")]
    assert suspects_cmd.main(["--checkpoint", str(run), *argv, "--out", str(tmp_path)]) == 0
    df = pd.read_csv(tmp_path / "suspects.csv")
    assert sorted(df["img_id"]) == sorted(ids)
    assert {r.img_id: r.fold for r in df.itertuples()} == held


# --------------------------------------------------------------------------------------------
# Folds trained one per process (--fold F)
# --------------------------------------------------------------------------------------------


def test_folds_trained_side_by_side_complete_the_run(small_world, tmp_path, monkeypatch):
    # Two --fold processes started together both read the other's history at their start:
    # both ended "1 other fold(s) still to train" and no out-of-fold library was written.
    cfg = RunConfig.from_flat(
        {"aug.crop_size": 64, "batch_size": 8, "samples_per_epoch": 16, "epochs": 1}
        | {"impl": "compiled", "folds": 3, "split_group": SCENES}
    )
    run = tmp_path / "run"
    first = fit_folds(cfg, run, data=small_world, only=0)
    assert first.status == "stopped"
    assert first.message.endswith(f"2 other fold(s) of {run} still to train (--fold 1, 2)")
    real_fit = folds_module.fit

    def fit_beside_another(fold_cfg, out, **kw):
        if fold_cfg.fold == 1:  # fold 2 trains in another process meanwhile, and ends first
            real_fit(fold_config(fold_cfg, 2), folds_module.fold_dir(run, 2), **kw)
        return real_fit(fold_cfg, out, **kw)

    monkeypatch.setattr(folds_module, "fit", fit_beside_another)
    last = fit_folds(cfg, run, data=small_world, only=1)
    assert last.status == "completed", last.message
    manifest = json.loads((run / "folds.json").read_text())
    assert manifest["status"] == "completed" and "oof" in manifest
    z = np.load(run / "val_probs.npz")
    assert sorted(set(z["image_ids"])) == sorted(small_world.train.ids)
    assert sorted(set(z["fold"].tolist())) == [0, 1, 2]

    # folds 0 and 1 trained, fold 2 not: a rerun of --fold 1 said "2 other fold(s)"
    two = shutil.copytree(run, tmp_path / "two")
    shutil.rmtree(two / "fold2")
    (two / "val_probs.npz").unlink()
    again = fit_folds(cfg, two, data=small_world, only=1)
    assert again.status == "stopped"
    assert again.message.endswith(f"1 other fold(s) of {two} still to train (--fold 2)")
    assert not (two / "val_probs.npz").exists()

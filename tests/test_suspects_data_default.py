"""Without --data, ``bldseg suspects`` ranks the training images of the data the model trained on.

``bldseg train`` records the absolute ``--data`` in the run config of ``best.pt`` (and of a
K-fold run's ``folds.json``); suspects used to ignore it and fell back to the built-in synthetic
world, ranking (and writing a contact sheet of) images the model never saw, exit 0. The models
here are untrained tiny ones whose run config records the data, as fit records it: the ranking
itself does not matter, only which images it ranks.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bldseg.commands import suspects
from bldseg.data import prepare
from bldseg.models import create_model
from bldseg.train.config import RunConfig
from bldseg.train.folds import FOLDS_FILE, VAL_FILE, fold_dir
from tests.test_predict_data_default import write_competition
from tests.test_predict_folder import noise_image, write_png

TRAIN_IDS = [f"TRAIN_{i}" for i in range(8)]  # write_competition's training images


def checkpoint(path: Path, data: str | None, **config) -> Path:
    """An untrained tiny model's ``best.pt`` whose run config records ``data`` as its --data
    (and ``config``)."""
    cfg = RunConfig.from_flat({"aug.crop_size": 32, "impl": "compiled", "data": data, **config})
    model = create_model(cfg.model, **cfg.model_kwargs())
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": cfg.to_flat(), "model": model.state_dict(), "metrics": {}}, path)
    return path


@pytest.fixture(scope="module")
def comp(tmp_path_factory) -> Path:
    """A competition folder of 8 training images of 32 px (and 3 test images)."""
    return write_competition(tmp_path_factory.mktemp("suspects_data") / "comp")


@pytest.fixture
def data_root(tmp_path, monkeypatch) -> Path:
    """A --data-root whose synthetic world (what suspects without --data ranked before it read
    the record) is tiny, so that ranking it takes a second."""
    tiny = {"n_train": 2, "train_size": 64, "n_test": 4, "test_size": 32, "test_scene_size": 64}
    monkeypatch.setattr(prepare, "DEFAULT_SYNTHETIC", tiny)
    return tmp_path / "data_root"


def ranked_ids(out: Path) -> list[str]:
    return sorted(pd.read_csv(out / "suspects.csv", dtype=str)["img_id"])


def test_without_data_the_training_data_is_ranked(comp, data_root, tmp_path, capsys):
    ckpt = checkpoint(tmp_path / "run" / "best.pt", str(comp))
    out = tmp_path / "sus"
    base = ["--data-root", str(data_root), "--threshold", "0.5", "--top", "2"]
    assert suspects.main(["--checkpoint", str(ckpt), *base, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert (
        f"no --data given: ranking the training images of {comp}, the data {ckpt} was trained "
        "on (recorded in the checkpoint); pass --data to rank another\n" in captured.out
    ), captured.out
    assert "warning" not in captured.err
    assert ranked_ids(out) == TRAIN_IDS  # not the synthetic world's images
    assert not (data_root / "synthetic").exists()  # nor was it generated

    # a K-fold run: its folds.json records the run config
    kfold = tmp_path / "kfold"
    for f in (0, 1):
        checkpoint(fold_dir(kfold, f) / "best.pt", str(comp), folds=2, fold=f)
    config = torch.load(ckpt, weights_only=True)["config"] | {"folds": 2}
    (kfold / FOLDS_FILE).write_text(json.dumps({"folds": 2, "config": config}))
    np.savez(kfold / VAL_FILE, image_ids=np.array(TRAIN_IDS), fold=np.arange(8) % 2)
    out = tmp_path / "sus_kfold"
    assert suspects.main(["--checkpoint", str(kfold), *base, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"ranking the training images of {comp}, the data {kfold / FOLDS_FILE} was" in printed
    assert ranked_ids(out) == TRAIN_IDS

    # a model trained on the synthetic world ranks its images, as before
    on_synthetic = checkpoint(tmp_path / "s" / "best.pt", None)
    out = tmp_path / "sus_synthetic"
    assert suspects.main(["--checkpoint", str(on_synthetic), *base, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "no --data given" not in captured.out and "warning" not in captured.err
    synthetic_ids = pd.read_csv(data_root / "synthetic" / "train.csv", dtype=str)["img_id"]
    assert ranked_ids(out) == sorted(synthetic_ids)


def test_recorded_data_that_is_gone_is_refused(data_root, tmp_path, capsys):
    gone = tmp_path / "moved_away"
    ckpt = checkpoint(tmp_path / "run" / "best.pt", str(gone))
    out = tmp_path / "sus"
    argv = ["--checkpoint", str(ckpt), "--data-root", str(data_root), "--out", str(out)]
    assert suspects.main(argv) == 1
    assert capsys.readouterr().err == (
        f"error: {gone}, the data {ckpt} was trained on (recorded in the checkpoint), no "
        "longer exists; pass --data with the dataset's training images (a competition folder, "
        "an image/mask folder or a bldseg cache)\n"
    )
    assert not out.exists() and not data_root.exists()  # refused before any data was read
    # --images names the images itself (fit records no --data for it): the record is not read
    for i in range(2):
        write_png(tmp_path / "images" / f"{i}.png", noise_image(32, 32, seed=i))
        mask = np.zeros((32, 32, 3), np.uint8)
        mask[8:24, 8:24] = 255
        write_png(tmp_path / "masks" / f"{i}.png", mask)
    folders = ["--images", str(tmp_path / "images"), "--masks", str(tmp_path / "masks")]
    assert suspects.main([*argv, *folders, "--threshold", "0.5", "--top", "1"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert ranked_ids(out) == ["0", "1"]
    shutil.rmtree(out)

    # recorded data that is there but no dataset: the message says where --data came from
    empty = tmp_path / "empty"
    empty.mkdir()
    ckpt = checkpoint(tmp_path / "e" / "best.pt", str(empty))
    argv = ["--checkpoint", str(ckpt), "--data-root", str(data_root), "--out", str(out)]
    assert suspects.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: --data {empty}: not a dataset bldseg knows"), err
    assert err.endswith(f"(the recorded data {ckpt} was trained on; pass --data)\n"), err
    assert not out.exists()


def test_a_data_other_than_the_recorded_one_is_warned_about(comp, tmp_path, capsys, monkeypatch):
    other = shutil.copytree(comp, tmp_path / "other")
    ckpt = checkpoint(tmp_path / "run" / "best.pt", str(comp))
    out = tmp_path / "sus"
    base = ["--checkpoint", str(ckpt), "--data-root", str(tmp_path / "data"), "--out", str(out)]
    base += ["--threshold", "0.5", "--top", "2"]
    assert suspects.main([*base, "--data", str(other)]) == 0
    captured = capsys.readouterr()
    assert (
        f"warning: ranking the training images of --data {other}, but {ckpt} trained on {comp} "
        "(recorded in the checkpoint); leave --data out to rank that data's training images\n"
    ) in captured.err, captured.err
    assert captured.err.count("warning") == 1
    assert "no --data given" not in captured.out
    assert ranked_ids(out) == TRAIN_IDS  # the given data's, which has the same ids
    # the recorded dataset, however spelled: no warning
    monkeypatch.chdir(comp.parent)
    for data in (str(comp), f"./{comp.name}/", str(comp / "train.csv")):
        assert suspects.main([*base, "--data", data]) == 0
        captured = capsys.readouterr()
        assert "warning" not in captured.err, data
        assert "no --data given" not in captured.out, data


def test_the_data_flag_says_what_it_defaults_to():
    data = next(a for a in suspects.build_parser()._actions if a.dest == "data")
    assert "default: the data the model was trained on" in data.help
    assert "synthetic world for models trained on it" in data.help

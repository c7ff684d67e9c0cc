"""Without --data, ``bldseg predict`` predicts the test split of the data the model trained on.

``bldseg train`` records the absolute ``--data`` in the run config of ``best.pt``; prediction
used to ignore it and fell back to the built-in synthetic world, writing a submission of
synthetic ids (and an "official score" against the synthetic truth) for a model trained on
the user's data. Here a tiny model is trained by the train command on a tiny competition
folder, and the checkpoints of the other cases are copies of it recording other data.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bldseg.commands import train as train_cmd
from bldseg.data import prepare
from bldseg.data.rle import rle_encode
from bldseg.predict import EnsembleSpec
from bldseg.train.folds import FOLDS_FILE, fold_dir
from tests.test_predict_folder import noise_image, predict_main, write_png

TEST_IDS = ["T0", "T1", "T2"]


def write_competition(root: Path) -> Path:
    """A competition folder: 8 training and 3 test images of 32 px, with the test truth."""
    square = np.zeros((32, 32), bool)
    square[8:24, 8:24] = True
    rows = []
    for i in range(8):
        write_png(root / "train" / f"{i}.png", noise_image(32, 32, seed=i))
        rows.append((f"TRAIN_{i}", f"train/{i}.png", rle_encode(square)))
    pd.DataFrame(rows, columns=["img_id", "img_path", "mask_rle"]).to_csv(
        root / "train.csv", index=False
    )
    for i in range(len(TEST_IDS)):
        write_png(root / "test" / f"{i}.png", noise_image(32, 32, seed=50 + i))
    pd.DataFrame({"img_id": TEST_IDS, "img_path": [f"test/{i}.png" for i in range(3)]}).to_csv(
        root / "test.csv", index=False
    )
    pd.DataFrame({"img_id": TEST_IDS, "mask_rle": [rle_encode(square)] * 3}).to_csv(
        root / "test_truth.csv", index=False
    )
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``(competition folder, best.pt)``: a tiny model trained by ``bldseg train --data``."""
    root = tmp_path_factory.mktemp("trained")
    comp = write_competition(root / "comp")
    argv = ["--data", str(comp), "--data-root", str(root / "data"), "--out", str(root / "run")]
    for s in ("aug.crop_size=32", "batch_size=8", "samples_per_epoch=16", "epochs=1"):
        argv += ["--set", s]
    assert train_cmd.main([*argv, "--set", "impl=compiled"]) == 0
    return comp, root / "run" / "best.pt"


def recorded_on(ckpt: Path, data: str | None, path: Path, kind: str | None = None) -> Path:
    """A copy of ``ckpt`` whose run config records ``data``, as fit records its ``--data``
    (None: the synthetic world, unless ``kind`` names another kind of data)."""
    state = torch.load(ckpt, weights_only=True)
    state["config"]["data"] = data
    state["data_kind"] = kind or ("synthetic" if data is None else state["data_kind"])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


@pytest.fixture
def data_root(tmp_path, monkeypatch) -> Path:
    """A --data-root whose synthetic world (what prediction without --data predicted before it
    read the record) is tiny, so that predicting it takes a second."""
    tiny = {"n_train": 2, "train_size": 64, "n_test": 4, "test_size": 32, "test_scene_size": 64}
    monkeypatch.setattr(prepare, "DEFAULT_SYNTHETIC", tiny)
    return tmp_path / "data_root"


def submitted_ids(path: Path) -> list[str]:
    return list(pd.read_csv(path, dtype=str)["img_id"])


def test_without_data_the_training_data_is_predicted(trained, data_root, tmp_path, capsys):
    comp, ckpt = trained
    out = tmp_path / "sub.csv"
    base = ["--data-root", str(data_root), "--out", str(out)]
    assert predict_main("--checkpoint", str(ckpt), *base) == 0
    printed = capsys.readouterr().out
    assert (
        f"no --data given: predicting the test split of {comp}, the data {ckpt} was trained on "
        "(recorded in the checkpoint); pass --data to predict another" in printed
    ), printed
    assert submitted_ids(out) == TEST_IDS  # not the synthetic world's tiles
    assert not (data_root / "synthetic").exists()  # nor was it generated
    assert f"official score vs {comp / 'test_truth.csv'}: " in printed

    # an ensemble spec (the README's walk-through passes no --data), and a K-fold member,
    # whose folds.json records the run config
    kfold = tmp_path / "kfold"
    for f in (0, 1):
        fold_dir(kfold, f).mkdir(parents=True)
        shutil.copy(ckpt, fold_dir(kfold, f) / "best.pt")
    config = torch.load(ckpt, weights_only=True)["config"]
    (kfold / FOLDS_FILE).write_text(json.dumps({"folds": 2, "config": config}))
    spec = tmp_path / "submit.json"
    EnsembleSpec([str(ckpt), str(kfold)], threshold=0.5).save(spec)
    out.unlink()
    assert predict_main("--ensemble", str(spec), *base) == 0
    printed = capsys.readouterr().out
    assert f"predicting the test split of {comp}, the data its 2 members were" in printed
    assert submitted_ids(out) == TEST_IDS


def test_members_trained_on_different_data_are_refused(trained, data_root, tmp_path, capsys):
    comp, ckpt = trained
    other = shutil.copytree(comp, tmp_path / "other")
    on_other = recorded_on(ckpt, str(other), tmp_path / "b" / "best.pt")
    on_synthetic = recorded_on(ckpt, None, tmp_path / "c" / "best.pt")
    out = tmp_path / "sub.csv"
    base = ["--threshold", "0.5", "--data-root", str(data_root), "--out", str(out)]
    assert predict_main("--checkpoint", str(ckpt), "--checkpoint", str(on_other), *base) == 1
    assert capsys.readouterr().err == (
        f"error: the members were trained on different data ({ckpt} trained on {comp}; "
        f"{on_other} trained on {other}); pass --data with the dataset whose test split to "
        "predict\n"
    )
    assert predict_main("--checkpoint", str(ckpt), "--checkpoint", str(on_synthetic), *base) == 1
    err = capsys.readouterr().err
    assert f"{on_synthetic} trained on no recorded --data (the built-in synthetic world" in err
    assert not out.exists()  # refused before anything was predicted

    # --data chooses (the member trained elsewhere is warned about)
    argv = ["--checkpoint", str(ckpt), "--checkpoint", str(on_other), "--data", str(comp)]
    assert predict_main(*argv, *base) == 0
    assert f"but {on_other} trained on {other} (recorded" in capsys.readouterr().err
    assert submitted_ids(out) == TEST_IDS
    # a model trained on the synthetic world predicts its test split, as before
    assert predict_main("--checkpoint", str(on_synthetic), *base) == 0
    captured = capsys.readouterr()
    assert "no --data given" not in captured.out and "warning" not in captured.err
    assert submitted_ids(out) == submitted_ids(data_root / "synthetic" / "test.csv")


def test_recorded_data_that_is_gone_is_refused(trained, data_root, tmp_path, capsys):
    _, ckpt = trained
    gone = tmp_path / "moved_away"
    moved = recorded_on(ckpt, str(gone), tmp_path / "m" / "best.pt")
    out = tmp_path / "sub.csv"
    argv = ["--checkpoint", str(moved), "--data-root", str(data_root)]
    assert predict_main(*argv, "--out", str(out)) == 1
    assert capsys.readouterr().err == (
        f"error: {gone}, the data {moved} was trained on (recorded in the checkpoint), no "
        "longer exists; pass --data with the dataset's test split (a competition folder, its "
        "test CSV or a bldseg cache)\n"
    )
    assert not out.exists()
    # folder prediction reads no test split: the record does not matter there
    write_png(tmp_path / "images" / "a.png", noise_image(32, 32, seed=0))
    masks = tmp_path / "masks"
    assert predict_main(*argv, "--images", str(tmp_path / "images"), "--out", str(masks)) == 0
    assert (masks / "a.png").is_file()


def test_recorded_data_without_a_test_split_says_where_it_came_from(
    trained, data_root, tmp_path, capsys
):
    # trained on image/mask folders (bldseg train --data DIR): there is no test split
    _, ckpt = trained
    folders = tmp_path / "folders"
    write_png(folders / "images" / "a.png", noise_image(32, 32, seed=0))
    write_png(folders / "masks" / "a.png", np.zeros((32, 32, 3), np.uint8))
    on_folders = recorded_on(ckpt, str(folders), tmp_path / "f" / "best.pt")
    out = tmp_path / "sub.csv"
    argv = ["--checkpoint", str(on_folders), "--data-root", str(data_root)]
    assert predict_main(*argv, "--out", str(out)) == 1
    err = capsys.readouterr().err
    assert f"error: --data {folders}: no test split to predict" in err, err
    assert err.endswith("(the recorded data the model(s) were trained on; pass --data)\n"), err
    assert not out.exists()


def test_a_data_other_than_the_recorded_one_is_warned_about(trained, tmp_path, capsys, monkeypatch):
    comp, ckpt = trained
    other = shutil.copytree(comp, tmp_path / "other")
    out = tmp_path / "sub.csv"
    base = ["--checkpoint", str(ckpt), "--data-root", str(tmp_path / "data"), "--out", str(out)]
    assert predict_main(*base, "--data", str(other)) == 0
    captured = capsys.readouterr()
    assert (
        f"warning: predicting the test split of --data {other}, but {ckpt} trained on {comp} "
        "(recorded in the checkpoint); leave --data out to predict that data's test split\n"
    ) in captured.err, captured.err
    assert "no --data given" not in captured.out
    assert submitted_ids(out) == TEST_IDS
    # the recorded dataset, however spelled: no warning
    monkeypatch.chdir(comp.parent)
    for data in (str(comp), f"./{comp.name}/", str(comp / "test.csv"), str(comp / "train.csv")):
        assert predict_main(*base, "--data", data) == 0
        assert "warning" not in capsys.readouterr().err, data


def test_out_may_not_overwrite_the_recorded_datas_csvs(trained, data_root, tmp_path, capsys):
    comp, ckpt = trained
    copy = shutil.copytree(comp, tmp_path / "comp")
    on_copy = recorded_on(ckpt, str(copy), tmp_path / "r" / "best.pt")
    before = (copy / "test.csv").read_bytes()
    argv = ["--checkpoint", str(on_copy), "--data-root", str(data_root)]
    assert predict_main(*argv, "--out", str(copy / "test.csv")) == 1
    err = capsys.readouterr().err
    assert f"error: --out {copy / 'test.csv'} is the recorded data's test.csv" in err, err
    assert (copy / "test.csv").read_bytes() == before


def test_a_model_trained_on_image_folders_needs_data(trained, data_root, tmp_path, capsys):
    # trained with --images/--masks: no --data recorded, yet not the synthetic world, which
    # was predicted in its place; its best.pt says which kind of data it was
    comp, ckpt = trained
    assert torch.load(ckpt, weights_only=True)["data_kind"] == "competition"
    folders = recorded_on(ckpt, None, tmp_path / "f" / "best.pt", kind="folders")
    out = tmp_path / "sub.csv"
    base = ["--checkpoint", str(folders), "--data-root", str(data_root), "--out", str(out)]
    assert predict_main(*base) == 1
    assert capsys.readouterr().err == (
        f"error: {folders} was trained on image folders given by --images/--masks, which the "
        "checkpoint does not name; pass --data with the dataset whose test split to predict, or "
        "predict a folder of images with --images DIR --out masks/\n"
    )
    assert not out.exists() and not (data_root / "synthetic").exists()
    assert predict_main(*base, "--data", str(comp)) == 0
    assert submitted_ids(out) == TEST_IDS
    # a checkpoint from before the record (no data_kind) is read as before: the synthetic world
    state = torch.load(folders, weights_only=True)
    del state["data_kind"]
    torch.save(state, folders)
    assert predict_main(*base, "--threshold", "0.5") == 0
    assert submitted_ids(out) == submitted_ids(data_root / "synthetic" / "test.csv")

"""Prediction reads images as the model's training images were read (--bands, --stretch, --alpha).

``fit`` records the image read options in ``best.pt`` and ``last.pt``; ``bldseg predict`` (folder
and test-split paths) defaults to them, a flag given explicitly wins with a warning, ensemble
members recorded differently are refused, and older checkpoints keep the flags' defaults.

The "pointwise" model of the folder tests (probability = the red value / 255) shows which band
was read as red: the images here are black in red and green, and blue on their left half, so
``--bands 3,2,1`` predicts the left half and the default bands predict nothing.
"""

import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from bldseg.data.prepare import DataOptions
from bldseg.data.readers import ReadOptions
from bldseg.data.rle import rle_encode
from bldseg.models import registry
from bldseg.predict import EnsembleSpec, predict_folder, recorded_image_read
from bldseg.train.config import RunConfig
from bldseg.train.engine import fit, image_read_record, load_state
from bldseg.train.folds import FOLDS_FILE, fold_dir
from tests.test_predict_folder import Pointwise, predict_main, read_png, save_checkpoint, write_png
from tests.train.test_engine import BASE  # the engine tests' small, fast run

LEFT = np.zeros((32, 32), bool)
LEFT[:, :16] = True  # where the images are blue: the buildings when bands 3,2,1 are read


@pytest.fixture
def pointwise_model(monkeypatch):
    """Registers the pointwise model for this test, so real checkpoints can name it."""
    monkeypatch.setitem(registry._MODELS, "test_pointwise", lambda **kw: Pointwise())
    return "test_pointwise"


def blue_left(alpha: bool = False) -> np.ndarray:
    """(32, 32, 3) RGB, or RGBA with a transparent top-left corner."""
    img = np.zeros((32, 32, 4 if alpha else 3), np.uint8)
    img[:, :16, 2] = 255
    if alpha:
        img[..., 3] = 255
        img[:4, :4, 3] = 0
    return img


def write_image(path: Path, img: np.ndarray) -> Path:
    if img.shape[2] == 3:
        return write_png(path, img)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGBA2BGRA))
    return path


def checkpoint(path: Path, model: str, **read) -> Path:
    """A pointwise checkpoint; with ``read``, recording those image read options as fit does."""
    save_checkpoint(path, model, 0, image_read=False, **{"aug.crop_size": 32})
    if read:
        state = torch.load(path, weights_only=True)
        state["image_read"] = image_read_record(ReadOptions(**read))
        torch.save(state, path)
    return path


def test_fit_records_how_the_images_were_decoded(small_world, tmp_path):
    cfg = RunConfig.from_flat({**BASE, "epochs": 1, "samples_per_epoch": 16})
    data = dataclasses.replace(small_world)
    data.options = DataOptions(read=ReadOptions(bands=(3, 2, 1), stretch=(1.0, 99.0), alpha="fill"))
    fit(cfg, tmp_path / "run", data=data)
    for name in ("best.pt", "last.pt"):
        state = load_state(tmp_path / "run" / name)  # weights-only: plain data
        assert state["image_read"] == {"alpha": "fill", "bands": [3, 2, 1], "stretch": [1, 99]}
    options, unrecorded = recorded_image_read([tmp_path / "run"])
    assert options == {"alpha": "fill", "bands": (3, 2, 1), "stretch": (1.0, 99.0)}
    assert unrecorded == []
    # data that does not say how it was read: nothing recorded, as before
    data.options = None
    fit(cfg, tmp_path / "unknown", data=data)
    assert load_state(tmp_path / "unknown" / "best.pt")["image_read"] is None
    assert recorded_image_read([tmp_path / "unknown"]) == (None, [str(tmp_path / "unknown")])


def test_folder_prediction_reads_images_as_in_training(pointwise_model, tmp_path, capsys):
    ckpt = checkpoint(tmp_path / "mb" / "best.pt", pointwise_model, bands=(3, 2, 1), alpha="fill")
    images, out = tmp_path / "images", tmp_path / "out"
    write_image(images / "a.png", blue_left())
    write_image(images / "b.png", blue_left(alpha=True))  # refused unless read with --alpha fill
    argv = ["--checkpoint", str(ckpt), "--images", str(images), "--out", str(out)]

    assert predict_main(*argv) == 0
    captured = capsys.readouterr()
    assert f"reading the images as {ckpt} was trained: --bands 3,2,1" in captured.out
    assert "--alpha fill" in captured.out and "warning" not in captured.err, captured
    expected_b = LEFT.copy()
    expected_b[:4, :4] = False  # transparent: filled with black
    np.testing.assert_array_equal(read_png(out / "a.png") == 255, LEFT)
    np.testing.assert_array_equal(read_png(out / "b.png") == 255, expected_b)
    # the library's default reads them the same way
    r = predict_folder(EnsembleSpec([str(ckpt)]), images, tmp_path / "lib", progress=False)
    np.testing.assert_array_equal(read_png(r.masks[0]) == 255, LEFT)

    # a flag given wins (test imagery may differ), with a warning naming both
    assert predict_main(*argv, "--bands", "1,2,3") == 0
    err = capsys.readouterr().err
    assert (
        f"warning: predicting with --bands 1,2,3, but {ckpt} was trained on images read with "
        "--bands 3,2,1" in err
    ), err
    assert not (read_png(out / "a.png") == 255).any()  # red is black: nothing predicted
    # the same value as recorded: no warning
    assert predict_main(*argv, "--bands", "3,2,1", "--alpha", "fill") == 0
    assert "warning" not in capsys.readouterr().err
    assert predict_main(*argv, "--stretch", "2", "98") == 0  # the value recorded (the default)
    assert "warning" not in capsys.readouterr().err


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning")]


def test_checkpoints_without_the_record_keep_the_flags_defaults(pointwise_model, tmp_path, capsys):
    # read with the flags' defaults without a word: a model trained on images read otherwise
    # predicted from images it had never seen the like of
    old = checkpoint(tmp_path / "old.pt", pointwise_model)
    images, out = tmp_path / "images", tmp_path / "out"
    write_image(images / "a.png", blue_left())
    argv = ["--checkpoint", str(old), "--images", str(images), "--out", str(out)]
    assert predict_main(*argv) == 0
    captured = capsys.readouterr()
    assert "reading the images" not in captured.out
    assert _warnings(captured.err) == [
        f"warning: {old} record(s) no image read options (trained before bldseg recorded them); "
        "assuming the flags' defaults: no --bands (the default), --stretch 2 98, --alpha refuse; "
        "pass --bands, --stretch and --alpha as it was trained if they differ"
    ]
    assert not (read_png(out / "a.png") == 255).any()  # bands 1,2,3
    # a flag given is not assumed: only those left out are named
    assert predict_main(*argv, "--bands", "3,2,1") == 0
    (warning,) = _warnings(capsys.readouterr().err)
    assert "assuming the flags' defaults: --stretch 2 98, --alpha refuse;" in warning
    np.testing.assert_array_equal(read_png(out / "a.png") == 255, LEFT)
    # all three given: nothing is assumed
    every = ["--bands", "3,2,1", "--stretch", "2", "98", "--alpha", "refuse"]
    assert predict_main(*argv, *every) == 0
    assert _warnings(capsys.readouterr().err) == []

    # beside a member that records its options, those are used, and the older one is named
    new = checkpoint(tmp_path / "new.pt", pointwise_model, bands=(3, 2, 1))
    argv = ["--checkpoint", str(old), "--checkpoint", str(new), "--threshold", "0.5"]
    assert predict_main(*argv, "--images", str(images), "--out", str(out)) == 0
    err = capsys.readouterr().err
    assert f"warning: {old} record(s) no image read options" in err, err
    assert f"as {new} was trained: --bands 3,2,1" in err, err
    np.testing.assert_array_equal(read_png(out / "a.png") == 255, LEFT)


def test_members_trained_on_a_cache_are_warned_about_once(pointwise_model, tmp_path, capsys):
    # a model trained on a bldseg cache records no image read options (the cache does not say
    # how its images were decoded): an ensemble of such models was read with the defaults,
    # silently, as no other member recorded any
    members = []
    for name in ("a", "b"):
        ckpt = checkpoint(tmp_path / f"{name}.pt", pointwise_model)
        state = torch.load(ckpt, weights_only=True)
        state["data_kind"] = "cache"
        torch.save(state, ckpt)
        members += ["--checkpoint", str(ckpt)]
    images, out = tmp_path / "images", tmp_path / "out"
    write_image(images / "a.png", blue_left())
    argv = [*members, "--threshold", "0.5", "--images", str(images), "--out", str(out)]
    assert predict_main(*argv, "--alpha", "fill") == 0
    (warning,) = _warnings(capsys.readouterr().err)  # once, naming both
    assert warning.startswith(
        f"warning: {tmp_path / 'a.pt'}, {tmp_path / 'b.pt'} record(s) no image read options "
        "(trained on a bldseg cache built by an older bldseg, which did not record how its "
        "images were decoded); "
        "assuming the flags' defaults: no --bands (the default), --stretch 2 98;"
    ), warning
    assert "as they were trained" in warning and "--alpha refuse" not in warning
    # beside a member that records them, the others' record is assumed, and the reason given
    new = checkpoint(tmp_path / "new.pt", pointwise_model, bands=(3, 2, 1))
    assert predict_main(*argv, "--checkpoint", str(new)) == 0
    (warning, *_) = _warnings(capsys.readouterr().err)
    assert (
        "(trained on a bldseg cache built by an older bldseg, which did not record how its "
        "images were decoded)" in warning
    )
    assert f"reading the images as {new} was trained: --bands 3,2,1" in warning


def test_members_trained_on_images_read_differently_are_refused(pointwise_model, tmp_path, capsys):
    a = checkpoint(tmp_path / "a.pt", pointwise_model, bands=(3, 2, 1))
    b = checkpoint(tmp_path / "b.pt", pointwise_model, stretch=(1.0, 99.0))
    images, out = tmp_path / "images", tmp_path / "out"
    write_image(images / "a.png", blue_left())
    argv = ["--checkpoint", str(a), "--checkpoint", str(b), "--images", str(images)]
    assert predict_main(*argv, "--out", str(out)) == 1
    err = capsys.readouterr().err
    assert f"{a} with --bands 3,2,1 --stretch 2 98 --alpha refuse" in err, err
    assert f"{b} with --stretch 1 99 --alpha refuse" in err, err
    assert not out.exists()  # refused before anything was written
    with pytest.raises(ValueError, match="trained on images read differently"):
        predict_folder(EnsembleSpec([str(a), str(b)]), images, out, progress=False)

    # the folds of one K-fold member are members too (each may be trained on its own)
    cfg = RunConfig.from_flat({"model": pointwise_model, "aug.crop_size": 32, "folds": 2})
    run = tmp_path / "kfold"
    run.mkdir()
    (run / FOLDS_FILE).write_text(json.dumps({"folds": 2, "config": cfg.to_flat()}))
    checkpoint(fold_dir(run, 0) / "best.pt", pointwise_model, bands=(3, 2, 1))
    checkpoint(fold_dir(run, 1) / "best.pt", pointwise_model, alpha="refuse")  # default bands
    with pytest.raises(ValueError, match=r"fold1.* with --stretch 2 98 --alpha refuse"):
        recorded_image_read([run])


def test_a_record_that_is_not_bldsegs_names_the_file(pointwise_model, tmp_path):
    ckpt = checkpoint(tmp_path / "bad.pt", pointwise_model)
    state = torch.load(ckpt, weights_only=True)
    state["image_read"] = {"bands": "4,1,2"}
    torch.save(state, ckpt)
    with pytest.raises(ValueError, match=rf"{ckpt}: its record of how the training images"):
        recorded_image_read([ckpt])


def test_a_test_split_is_read_as_in_training(pointwise_model, tmp_path, capsys):
    ckpt = checkpoint(tmp_path / "mb.pt", pointwise_model, bands=(3, 2, 1))
    comp = tmp_path / "comp"
    for i in range(2):
        write_image(comp / "test" / f"t{i}.png", blue_left())
    pd.DataFrame({"img_id": ["T0", "T1"], "img_path": ["test/t0.png", "test/t1.png"]}).to_csv(
        comp / "test.csv", index=False
    )
    sub = tmp_path / "sub.csv"
    argv = ["--checkpoint", str(ckpt), "--data", str(comp), "--data-root", str(tmp_path / "root")]
    assert predict_main(*argv, "--out", str(sub)) == 0
    assert list(pd.read_csv(sub, dtype=str)["mask_rle"]) == [rle_encode(LEFT)] * 2
    assert predict_main(*argv, "--out", str(sub), "--bands", "1,2,3") == 0
    assert "warning: predicting with --bands 1,2,3" in capsys.readouterr().err
    assert list(pd.read_csv(sub, dtype=str)["mask_rle"]) == ["-1"] * 2


def test_prepared_data_carries_its_read_options_to_search_trials(small_world):
    # The CLI's and a search's trials get their data from prepare_data / the runner's handle:
    # without the options there, no checkpoint trained by `bldseg train` or a search recorded
    # how its images were read.
    from bldseg.data.prepare import prepare_data
    from bldseg.tune.runner import _data_paths, _open_data

    assert small_world.options == DataOptions()
    handle = _data_paths(small_world)
    assert _open_data(handle).options == small_world.options
    assert _open_data({**handle, "options": None}).options is None
    # and what the data was (checkpoints record it: a model trained on image folders records
    # no --data, and must not be taken for one of the synthetic world)
    assert _open_data(handle).kind == small_world.kind
    assert _open_data({**handle, "kind": "synthetic"}).kind == "synthetic"
    # a bldseg cache given as the data: the read options its manifest records
    cache = prepare_data(small_world.train.root.parent)
    assert cache.kind == "cache" and cache.options == small_world.options


def test_help_does_not_say_a_cache_records_nothing():
    # A model trained on a bldseg cache records how its images were read (the read options the
    # cache's manifest records); the help said such checkpoints record none.
    from bldseg.commands.predict import build_parser

    text = " ".join(build_parser("bldseg predict").format_help().split())
    assert "which does not say how its images were decoded" not in text
    assert "written before bldseg recorded it, or trained on a cache built before caches" in text

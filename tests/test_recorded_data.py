"""Commands that read a model's training data again read it as the training did.

``bldseg train`` records every data option it read the data with (``data_options`` in
``best.pt`` and ``last.pt``: mask values, tiles, mask names, image bands...). ``bldseg
suspects`` without --data used to rebuild the data from the flags typed now, and ``predict
--masks`` decoded the ground truth by the flags' defaults: masks whose buildings are 0
(``--mask-values 0``) were read inverted, silently, and a run trained with ``--tile-size`` failed
on whole images. Here a tiny model is trained by the train command on such a folder, once.
"""

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from bldseg.commands import suspects as suspects_cmd
from bldseg.commands import train as train_cmd
from bldseg.data.prepare import DataOptions, prepare_data
from bldseg.data.readers import ReadOptions
from bldseg.predict import recorded_data_options
from bldseg.train.engine import data_options_record, load_state
from bldseg.train.folds import FOLDS_FILE, fold_dir
from tests.test_predict_folder import noise_image, predict_main, write_png

TILE = 32
STEMS = ["a", "b", "c", "d"]


def inverted_mask(i: int) -> np.ndarray:
    """(64, 64) uint8: 255 background, a building of value 0 in the top-left tile."""
    mask = np.full((64, 64), 255, np.uint8)
    mask[4 + i : 20 + i, 6 : 14 + 2 * i] = 0
    return mask


def tile_buildings(stem: str, i: int) -> dict[str, int]:
    """Building pixels of each 32-px tile of image ``stem`` (buildings = value 0)."""
    buildings = inverted_mask(i) == 0
    return {
        f"{stem}_y{y}_x{x}": int(buildings[y : y + TILE, x : x + TILE].sum())
        for y in (0, TILE)
        for x in (0, TILE)
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``(folder dataset, data root, best.pt)``: trained by ``bldseg train --mask-values 0
    --tile-size 32`` on 64-px images whose masks mark buildings 0."""
    root = tmp_path_factory.mktemp("recorded")
    data = root / "inv"
    for i, stem in enumerate(STEMS):
        write_png(data / "images" / f"{stem}.png", noise_image(64, 64, seed=i))
        (data / "masks").mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(data / "masks" / f"{stem}.png"), inverted_mask(i))
    data_root = root / "data"
    argv = ["--data", str(data), "--data-root", str(data_root), "--out", str(root / "run")]
    argv += ["--mask-values", "0", "--tile-size", str(TILE)]
    for s in ("aug.crop_size=32", "batch_size=8", "samples_per_epoch=16", "epochs=1"):
        argv += ["--set", s]
    assert train_cmd.main([*argv, "--set", "impl=compiled"]) == 0
    return data, data_root, root / "run" / "best.pt"


def _suspects(ckpt: Path, out: Path, data_root: Path, *flags: str) -> pd.DataFrame:
    argv = ["--checkpoint", str(ckpt), "--out", str(out), "--data-root", str(data_root), *flags]
    assert suspects_cmd.main(argv) == 0
    return pd.read_csv(out / "suspects.csv", dtype={"img_id": str})


def _mask_pixels(df: pd.DataFrame) -> dict[str, int]:
    return dict(zip(df["img_id"], df["mask_pixels"].astype(int), strict=True))


def _expected() -> dict[str, int]:
    return {k: v for i, s in enumerate(STEMS) for k, v in tile_buildings(s, i).items()}


def _edited(ckpt: Path, path: Path, **entries) -> Path:
    """A copy of ``ckpt`` with ``entries`` set (None: removed, a checkpoint of an older bldseg)."""
    state = torch.load(ckpt, weights_only=True)
    for key, value in entries.items():
        if value is None:
            state.pop(key, None)
        else:
            state[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning:")]


def test_fit_records_how_the_data_was_read(trained):
    _, _, ckpt = trained
    for name in ("best.pt", "last.pt"):
        state = load_state(ckpt.parent / name)  # weights-only: plain data
        record = state["data_options"]
        assert record["tile_size"] == TILE and record["read"]["mask_values"] == [0]
    assert recorded_data_options(ckpt) == DataOptions(
        tile_size=TILE, read=ReadOptions(mask_values=(0,))
    )
    # folder paths are recorded absolute: read again from any folder
    rel = DataOptions(masks="inv/masks", read=ReadOptions(mask_colors=((0, 0, 255),)))
    record = data_options_record(rel)
    assert Path(record["masks"]).is_absolute()
    assert record["read"]["mask_colors"] == [[0, 0, 255]]  # lists: JSON-plain
    assert DataOptions.from_dict(record).read == rel.read


def test_suspects_reads_the_recorded_data_as_it_was_trained(trained, tmp_path, capsys):
    # the masks mark buildings 0 (--mask-values 0) and were tiled (--tile-size 32): read by the
    # flags typed now, every mask was inverted, silently (and a larger --tile-size failed)
    data, data_root, ckpt = trained
    df = _suspects(ckpt, tmp_path / "sus", data_root)
    assert _mask_pixels(df) == _expected()
    out = capsys.readouterr()
    assert (
        f"reading {data} as {ckpt} was trained (recorded in the checkpoint): --tile-size 32 "
        "--mask-values 0" in out.out
    ), out.out
    assert not _warnings(out.err)
    # --data naming the same dataset is read the same way
    df = _suspects(ckpt, tmp_path / "sus2", data_root, "--data", str(data))
    assert _mask_pixels(df) == _expected()


def test_a_data_flag_typed_wins_with_a_warning(trained, tmp_path, capsys):
    data, data_root, ckpt = trained
    df = _suspects(ckpt, tmp_path / "sus", data_root, "--mask-values", "255")
    expected = {k: TILE * TILE - v for k, v in _expected().items()}  # as typed: inverted
    assert _mask_pixels(df) == expected
    (warning,) = _warnings(capsys.readouterr().err)
    assert warning == (
        f"warning: reading {data} with --mask-values 255, but {ckpt} was trained on it read "
        "with --mask-values 0 (recorded in the checkpoint); leave the flag out to read it as in "
        "training"
    )
    # a flag of the same group replaces the recorded --mask-values (not refused as both)
    df = _suspects(ckpt, tmp_path / "sus2", data_root, "--mask-nonzero")
    assert _mask_pixels(df) == expected
    assert "was trained on it read with --mask-values 0" in capsys.readouterr().err


def test_suspects_on_an_older_checkpoint_warns_once(trained, tmp_path, capsys):
    data, data_root, ckpt = trained
    old = _edited(ckpt, tmp_path / "old" / "best.pt", data_options=None)
    df = _suspects(old, tmp_path / "sus", data_root, "--tile-size", str(TILE))
    # read with the flags typed, as before the record
    assert _mask_pixels(df) == {k: TILE * TILE - v for k, v in _expected().items()}
    (warning,) = _warnings(capsys.readouterr().err)
    # every data flag typed is named (it said "read with the mask flags' defaults", and with
    # --mask-values 0 typed beside --tile-size, "read with --mask-values 0")
    assert warning == (
        f"warning: {old} records no data read options (trained before bldseg recorded them): "
        f"{data} is read with --tile-size 32 (the other data flags at their defaults); if it "
        "was read otherwise in training, pass the same --mask-values, --mask-nonzero, "
        "--mask-colors, --mask-threshold, --mask-pattern and --tile-size"
    )
    _suspects(old, tmp_path / "sus2", data_root, "--tile-size", str(TILE), "--mask-values", "0")
    (warning,) = _warnings(capsys.readouterr().err)
    assert f"{data} is read with --tile-size 32 --mask-values 0 (the other" in warning, warning


def test_a_model_trained_on_a_cache_ranks_the_cache(trained, tmp_path, capsys):
    # the record of a cache given as the data holds the read options its manifest records,
    # which a cache (already decoded) refuses as flags: they are not applied to it
    data, data_root, ckpt = trained
    options = DataOptions(tile_size=TILE, read=ReadOptions(mask_values=(0,)))
    cache = prepare_data(data, options=options, data_root=data_root, progress=False).train.root
    cached = prepare_data(cache, progress=False)
    on_cache = _edited(
        ckpt,
        tmp_path / "c" / "best.pt",
        config={**torch.load(ckpt, weights_only=True)["config"], "data": str(cache)},
        data_kind="cache",
        data_options=data_options_record(cached.options),
    )
    df = _suspects(on_cache, tmp_path / "sus", data_root)
    assert _mask_pixels(df) == _expected()
    assert not _warnings(capsys.readouterr().err)


def _on_folders(ckpt: Path, path: Path, images: Path, masks: Path) -> Path:
    """A copy of ``ckpt`` as ``bldseg train --images IMAGES --masks MASKS --mask-values 0
    --tile-size 32`` writes it: no --data in its config, the folders in its data options."""
    options = DataOptions(
        images=str(images), masks=str(masks), tile_size=TILE, read=ReadOptions(mask_values=(0,))
    )
    config = {**torch.load(ckpt, weights_only=True)["config"], "data": None}
    record = data_options_record(options)
    return _edited(ckpt, path, config=config, data_kind="folders", data_options=record)


def test_suspects_reads_the_recorded_image_folders_as_in_training(trained, tmp_path, capsys):
    # a run trained with --images/--masks records no --data: suspects refused it ("the
    # checkpoint does not name" the folders), and with the folders typed again it read the
    # masks inverted and untiled, without a word
    data, data_root, ckpt = trained
    images, masks = data / "images", data / "masks"
    on_folders = _on_folders(ckpt, tmp_path / "f" / "best.pt", images, masks)
    df = _suspects(on_folders, tmp_path / "sus", data_root)
    assert _mask_pixels(df) == _expected()
    out = capsys.readouterr()
    assert out.out.startswith(
        f"no --data given: ranking the training images of --images {images} --masks {masks}, "
        f"the folders {on_folders} was trained on (recorded in the checkpoint); pass --data or "
        f"--images to rank others\nreading {images} as {on_folders} was trained (recorded in the "
        "checkpoint): --tile-size 32 --mask-values 0\n"
    ), out.out
    assert not _warnings(out.err)
    # the folders typed again (here relative) are the recorded ones: read as recorded
    argv = ["--images", "inv/images", "--masks", "inv/masks"]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(data.parent)
        df = _suspects(on_folders, tmp_path / "sus2", data_root, *argv)
    assert _mask_pixels(df) == _expected()
    assert not _warnings(capsys.readouterr().err)
    # a flag typed wins, with the usual warning
    df = _suspects(
        on_folders, tmp_path / "sus3", data_root, "--images", str(images), "--mask-values", "255"
    )
    assert _mask_pixels(df) == {k: TILE * TILE - v for k, v in _expected().items()}
    (warning,) = _warnings(capsys.readouterr().err)
    assert warning.startswith(f"warning: reading {images} with --mask-values 255, but "), warning
    # and the same folders named as --data DIR (DIR/images, DIR/masks) are its own data too
    df = _suspects(on_folders, tmp_path / "sus4", data_root, "--data", str(data))
    assert _mask_pixels(df) == _expected()
    assert not _warnings(capsys.readouterr().err)


def test_a_run_on_data_named_by_data_reads_its_image_folder_as_its_own(trained, tmp_path, capsys):
    # --images DATA/images for a model trained on --data DATA: the same images, read as trained
    data, data_root, ckpt = trained
    df = _suspects(ckpt, tmp_path / "sus", data_root, "--images", str(data / "images"))
    assert _mask_pixels(df) == _expected()
    assert not _warnings(capsys.readouterr().err)


def test_moved_image_folders_are_refused_naming_them_and_the_flags(trained, tmp_path, capsys):
    data, data_root, ckpt = trained
    gone = tmp_path / "gone"
    on_folders = _on_folders(ckpt, tmp_path / "f" / "best.pt", gone / "images", gone / "masks")
    argv = ["--checkpoint", str(on_folders), "--out", str(tmp_path / "sus")]
    assert suspects_cmd.main([*argv, "--data-root", str(data_root)]) == 1
    assert capsys.readouterr().err == (
        f"error: {gone / 'images'} and {gone / 'masks'}, of the folders {on_folders} was trained "
        f"on (--images {gone / 'images'} --masks {gone / 'masks'}, recorded in the checkpoint), "
        "no longer exist; pass --images and --masks (or --footprints) with their new place, and "
        "the flags they were read with, --tile-size 32 --mask-values 0, if they are read alike\n"
    )
    # following that without the flags: read as typed (the record is not applied to other
    # folders), with a warning naming them
    folders = ["--images", str(data / "images"), "--masks", str(data / "masks")]
    df = _suspects(on_folders, tmp_path / "sus", data_root, *folders)
    assert len(df) == len(STEMS)  # whole images: untiled, as typed
    warnings = _warnings(capsys.readouterr().err)
    assert warnings == [
        f"warning: ranking the training images of --images {data / 'images'}, but {on_folders} "
        f"was trained on --images {gone / 'images'} --masks {gone / 'masks'} (recorded in the "
        "checkpoint); leave --images out to rank those",
        f"warning: {on_folders} was trained on data read with --tile-size 32 --mask-values 0 "
        f"(recorded in the checkpoint), which applies to that data only; --images "
        f"{data / 'images'} is read with the flags given: pass those flags too if it is read "
        "alike (the same data moved, or a copy)",
    ]
    # with the flags typed, nothing is left to say about them
    flags = ["--tile-size", str(TILE), "--mask-values", "0"]
    df = _suspects(on_folders, tmp_path / "sus2", data_root, *folders, *flags)
    assert _mask_pixels(df) == _expected()
    (warning,) = _warnings(capsys.readouterr().err)
    assert warning.startswith("warning: ranking the training images of --images"), warning


def test_moved_data_names_the_training_flags(trained, tmp_path, capsys):
    # suspects said only "no longer exists; pass --data": following it read the masks
    # inverted and untiled, as --data other than the recorded one drops the record, silently
    data, data_root, ckpt = trained
    gone = tmp_path / "gone"
    config = {**torch.load(ckpt, weights_only=True)["config"], "data": str(gone)}
    moved = _edited(ckpt, tmp_path / "m" / "best.pt", config=config)
    argv = ["--checkpoint", str(moved), "--out", str(tmp_path / "sus")]
    assert suspects_cmd.main([*argv, "--data-root", str(data_root)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {gone}, the data {moved} was trained on (recorded in the "), err
    assert err.endswith(
        "(a competition folder, an image/mask folder or a bldseg cache), and the flags it was "
        "read with, --tile-size 32 --mask-values 0, if it is read alike there\n"
    ), err
    df = _suspects(moved, tmp_path / "sus", data_root, "--data", str(data))
    assert len(df) == len(STEMS)  # read as typed: whole images
    warnings = _warnings(capsys.readouterr().err)
    assert len(warnings) == 2, warnings
    assert warnings[1] == (
        f"warning: {moved} was trained on data read with --tile-size 32 --mask-values 0 "
        f"(recorded in the checkpoint), which applies to that data only; --data {data} is read "
        "with the flags given: pass those flags too if it is read alike (the same data moved, "
        "or a copy)"
    )
    # a flag typed otherwise than recorded is still named, as recorded
    _suspects(moved, tmp_path / "sus2", data_root, "--data", str(data), "--mask-values", "0")
    warnings = _warnings(capsys.readouterr().err)
    assert warnings[1].startswith(
        f"warning: {moved} was trained on data read with --tile-size 32 ("
    )


def test_suspects_names_conflicting_mask_flags_as_flags(trained, tmp_path, capsys):
    _, data_root, ckpt = trained
    argv = [
        "--checkpoint",
        str(ckpt),
        "--out",
        str(tmp_path / "sus"),
        "--data-root",
        str(data_root),
    ]
    with pytest.raises(SystemExit) as e:
        suspects_cmd.main([*argv, "--mask-nonzero", "--mask-values", "0"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.endswith("error: give --mask-values or --mask-nonzero, not both\n"), err
    with pytest.raises(SystemExit):
        suspects_cmd.main([*argv, "--mask-threshold", "2"])
    assert (
        "error: --mask-threshold 2.0: a fraction of the range, in (0, 1)" in capsys.readouterr().err
    )


def _predict(ckpts: list[Path], data: Path, out: Path, *flags: str) -> int:
    members = [a for c in ckpts for a in ("--checkpoint", str(c))]
    masks = ["--images", str(data / "images"), "--masks", str(data / "masks")]
    return predict_main(*members, *masks, "--out", str(out), "--threshold", "0.5", *flags)


def _truth_pixels(out: Path) -> int:
    rows = json.loads((out / "scores.json").read_text())["per_image"]
    return sum(r["truth_pixels"] for r in rows)


def test_predict_scores_against_masks_read_as_in_training(trained, tmp_path, capsys):
    data, _, ckpt = trained
    buildings = sum(int((inverted_mask(i) == 0).sum()) for i in range(len(STEMS)))
    assert _predict([ckpt], data, tmp_path / "p") == 0
    out = capsys.readouterr()
    assert _truth_pixels(tmp_path / "p") == buildings  # not the 255 background
    assert f"reading --masks as {ckpt} was trained: --mask-values 0" in out.out
    assert not _warnings(out.err)

    assert _predict([ckpt], data, tmp_path / "q", "--mask-values", "255") == 0
    assert _truth_pixels(tmp_path / "q") == len(STEMS) * 64 * 64 - buildings
    (warning,) = _warnings(capsys.readouterr().err)
    assert warning == (
        f"warning: reading --masks with --mask-values 255, but {ckpt} was trained on masks "
        "read with --mask-values 0 (recorded in the checkpoint); leave the flag out to read "
        "them as in training"
    )


def test_predict_masks_of_older_and_competition_members(trained, tmp_path, capsys):
    data, _, ckpt = trained
    buildings = sum(int((inverted_mask(i) == 0).sum()) for i in range(len(STEMS)))
    old = _edited(ckpt, tmp_path / "old.pt", data_options=None)
    assert _predict([old], data, tmp_path / "p") == 0
    assert _truth_pixels(tmp_path / "p") == len(STEMS) * 64 * 64 - buildings  # as before
    (warning,) = _warnings(capsys.readouterr().err)
    assert warning.startswith(
        f"warning: {old} record(s) no mask read options (trained before bldseg recorded them); "
        "reading --masks with the mask flags' defaults; pass --mask-values"
    ), warning
    # beside a member that records them, the older one is read as that one's masks were
    assert _predict([old, ckpt], data, tmp_path / "q") == 0
    assert _truth_pixels(tmp_path / "q") == buildings
    (warning,) = _warnings(capsys.readouterr().err)
    assert f"reading --masks as {ckpt} was trained: --mask-values 0" in warning
    # a member trained on a competition CSV learnt run-length masks: it has no say, no warning
    comp = _edited(ckpt, tmp_path / "comp.pt", data_kind="competition", data_options=None)
    assert _predict([comp], data, tmp_path / "r") == 0
    assert not _warnings(capsys.readouterr().err)


def test_members_whose_masks_were_read_differently_need_the_flags(trained, tmp_path, capsys):
    data, _, ckpt = trained
    record = data_options_record(DataOptions(read=ReadOptions(mask_values=(255,))))
    other = _edited(ckpt, tmp_path / "other.pt", data_options=record)
    assert _predict([ckpt, other], data, tmp_path / "p") == 1
    assert capsys.readouterr().err == (
        f"error: the members' training masks were read differently ({ckpt} with --mask-values "
        f"0; {other} with --mask-values 255); pass --mask-values, --mask-nonzero or "
        "--mask-colors as --masks needs them\n"
    )
    assert _predict([ckpt, other], data, tmp_path / "p", "--mask-values", "0") == 0
    capsys.readouterr()
    # a flag of another group leaves the difference open: it read with the defaults, silently
    assert _predict([ckpt, other], data, tmp_path / "q", "--mask-threshold", "0.3") == 1
    assert capsys.readouterr().err == (
        f"error: the members' training masks were read differently ({ckpt} with --mask-values "
        f"0; {other} with --mask-values 255); pass --mask-values, --mask-nonzero or "
        "--mask-colors as --masks needs them (--mask-threshold 0.3 leaves that open)\n"
    )


def test_mask_flags_must_settle_each_difference_and_the_rest_is_read_as_recorded(
    trained, tmp_path, capsys
):
    data, _, ckpt = trained
    buildings = sum(int((inverted_mask(i) == 0).sum()) for i in range(len(STEMS)))
    both = {"mask_threshold": 0.3}
    a = _edited(
        ckpt,
        tmp_path / "a.pt",
        data_options=data_options_record(DataOptions(read=ReadOptions(mask_values=(0,), **both))),
    )
    b = _edited(
        ckpt,
        tmp_path / "b.pt",
        data_options=data_options_record(DataOptions(read=ReadOptions(mask_values=(255,), **both))),
    )
    # they differ in the mask values only: --mask-values settles it, the agreed threshold holds
    assert _predict([a, b], data, tmp_path / "p", "--mask-values", "0") == 0
    out = capsys.readouterr()
    assert _truth_pixels(tmp_path / "p") == buildings
    assert f"reading --masks as {a}, {b} were trained: --mask-threshold 0.3" in out.out
    assert not _warnings(out.err)
    # members differing in the threshold too need both
    c = _edited(
        ckpt,
        tmp_path / "c.pt",
        data_options=data_options_record(DataOptions(read=ReadOptions(mask_values=(255,)))),
    )
    assert _predict([a, c], data, tmp_path / "q", "--mask-nonzero") == 1
    err = capsys.readouterr().err
    assert err.endswith(
        "; pass --mask-threshold as --masks needs it (--mask-nonzero leaves that open)\n"
    ), err
    flags = ["--mask-values", "0", "--mask-threshold", "0.5"]
    assert _predict([a, c], data, tmp_path / "q", *flags) == 0
    assert _truth_pixels(tmp_path / "q") == buildings


def test_predict_names_the_image_folders_a_model_was_trained_on(trained, tmp_path, capsys):
    # they hold no test split: it said the checkpoint does not name them
    data, data_root, ckpt = trained
    images, masks = data / "images", data / "masks"
    on_folders = _on_folders(ckpt, tmp_path / "f.pt", images, masks)
    argv = ["--checkpoint", str(on_folders), "--out", str(tmp_path / "s.csv")]
    assert predict_main(*argv, "--data-root", str(data_root)) == 1
    assert capsys.readouterr().err == (
        f"error: {on_folders} was trained on the image folders --images {images} --masks "
        f"{masks} (recorded in the checkpoint), not on a dataset --data names; pass --data with "
        "the dataset whose test split to predict, or predict a folder of images with --images "
        "DIR --out masks/\n"
    )


def test_the_folds_of_a_kfold_member_must_agree(trained, tmp_path):
    _, _, ckpt = trained
    run = tmp_path / "kfold"
    config = torch.load(ckpt, weights_only=True)["config"]
    (run / FOLDS_FILE).parent.mkdir(parents=True)
    (run / FOLDS_FILE).write_text(json.dumps({"folds": 2, "config": config}))
    for f in (0, 1):
        fold_dir(run, f).mkdir(parents=True)
        shutil.copy(ckpt, fold_dir(run, f) / "best.pt")
    assert recorded_data_options(run) == recorded_data_options(ckpt)
    record = data_options_record(DataOptions(read=ReadOptions(mask_values=(255,))))
    _edited(ckpt, fold_dir(run, 1) / "best.pt", data_options=record)
    with pytest.raises(ValueError, match="its folds were trained on data read differently"):
        recorded_data_options(run)

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
    assert warning.startswith(
        f"warning: {old} records no data read options (trained before bldseg recorded them): "
        f"the masks of {data} are read with the mask flags' defaults; if they were read "
        "otherwise in training, pass the same --mask-values"
    ), warning


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
        f"0; {other} with --mask-values 255); pass --mask-values, --mask-nonzero, --mask-colors "
        "and --mask-threshold as --masks needs them\n"
    )
    assert _predict([ckpt, other], data, tmp_path / "p", "--mask-values", "0") == 0


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

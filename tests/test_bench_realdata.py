"""experiments/bench_realdata.py: each held-out split has its own link folders and runs."""

import json
import os
import sys
from pathlib import Path

import cv2
import pytest

from bldseg.data.dataset import split_indices
from bldseg.data.readers import read_folder_dataset
from tests.data.formats import scene

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import bench_realdata  # noqa: E402


def _folder(root: Path, n: int = 8) -> Path:
    """A user's folder: images/tile<i>.png with masks/tile<i>.png (0/255), 32 px."""
    for i in range(n):
        rgb, m = scene(32, 20 + i)
        for sub, array in (("images", rgb[..., ::-1]), ("masks", m * 255)):
            (root / sub).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / sub / f"tile{i}.png"), array)
    return root


def _linked(folder: Path) -> set[str]:
    return {p.name for p in (folder / "images").iterdir() if p.is_symlink()}


def test_links_are_made_again_from_scratch(tmp_path):
    data = _folder(tmp_path / "data")
    records = read_folder_dataset(data / "images", data / "masks")
    groups = bench_realdata.split_groups(records, None)
    tr, te = split_indices(len(records), 0.25, 0, groups)
    split = bench_realdata.split_record(data, records, tr, te, 0.25, 0, None)
    split_dir = tmp_path / "work" / "split"
    train_dir, test_dir = bench_realdata.link_split(split_dir, split, records, tr, te, data)
    # a link another split left behind (the held-out tiles of an earlier call, say)
    os.symlink(records[te[0]].image_path, train_dir / "images" / "stale.png")
    train_dir, test_dir = bench_realdata.link_split(split_dir, split, records, tr, te, data)
    assert _linked(train_dir) == {records[i].image_path.name for i in tr}
    assert _linked(test_dir) == {records[i].image_path.name for i in te}
    assert not list(split_dir.glob(".*"))  # no temporary folder left
    assert all(p.exists() for p in (data / "images").iterdir())  # the user's files stay
    # A folder recording another split is refused, naming what differs.
    other = {**split, "split_seed": 1}
    with pytest.raises(SystemExit, match="split_seed"):
        bench_realdata.link_split(split_dir, other, records, tr, te, data)


def test_another_split_gets_its_own_folders_and_seed_is_training_only(tmp_path):
    data = _folder(tmp_path / "data")
    records = read_folder_dataset(data / "images", data / "masks")
    names = [r.image_path.name for r in records]
    groups = bench_realdata.split_groups(records, None)
    # on these 8 tiles seeds 0 and 1 hold out different tiles: --seed 1 must not change them
    assert list(split_indices(8, 0.5, 0, groups)[1]) != list(split_indices(8, 0.5, 1, groups)[1])
    # another fraction, seed or grouping is another split: its own key, so its own folders
    tr, te = split_indices(8, 0.25, 0, groups)
    quarter = bench_realdata.split_record(data, records, tr, te, 0.25, 0, None)
    small = ["--epochs", "1", "--samples-per-epoch", "8", "--set", "aug.crop_size=32"]
    out = tmp_path / "r.json"
    where = ["--data", str(data), "--work", str(tmp_path / "work"), "--json", str(out)]
    bench_realdata.main([*where, "--test-fraction", "0.5", "--seed", "1", *small])
    run = json.loads(out.read_text())
    assert run["split"] != f"split-{bench_realdata._key(quarter)}"
    assert (run["seed"], run["split_seed"]) == (1, 0)
    train_idx, test_idx = split_indices(8, 0.5, 0, groups)  # the split seed's, not --seed's
    split_dir = Path(run["run_dir"]).parent
    assert _linked(split_dir / "test") == {names[i] for i in test_idx}
    assert _linked(split_dir / "train") == {names[i] for i in train_idx}
    recorded = json.loads((split_dir / "split.json").read_text())
    assert (recorded["test_fraction"], recorded["split_seed"]) == (0.5, 0)
    assert run["test_tiles"] == len(test_idx)
    assert run["test_official_low"] <= run["test_official_score"] <= run["test_official_high"]
    assert run["test_scenes_scored"] <= len(test_idx)


def test_the_test_score_has_a_scene_bootstrap_interval(tmp_path):
    # the held-out official score was printed alone: 8 tiles of 2 scenes give a wide interval
    data = _folder(tmp_path / "data")
    records = read_folder_dataset(data / "images", data / "masks")
    groups = bench_realdata.split_groups(records, r"tile(\d)")  # one scene per tile
    two = [f"s{int(g) % 2}" for g in groups]  # two scenes, tiles interleaved
    test_idx = [0, 1, 2, 3]
    dice = [0.9, 0.5, None, 0.7]  # tile2 empty in mask and prediction: left out
    scores = {
        "per_image": [
            {"image": records[i].image_path.name, "dice": d}
            for i, d in zip(test_idx, dice, strict=True)
        ]
    }
    iv = bench_realdata.test_interval(scores, records, test_idx, two, data / "images")
    assert iv.estimate == pytest.approx(0.7) and (iv.n, iv.clusters) == (3, 2)
    assert iv.low < iv.estimate < iv.high
    assert iv.low >= 0.5 and iv.high <= 0.9
    alone = bench_realdata.test_interval(scores, records, test_idx, groups, data / "images")
    assert alone.clusters == 3  # the empty/empty tile's scene has no score

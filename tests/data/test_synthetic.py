"""Tests of the built-in synthetic world: determinism, layout, label noise, realism checks."""

from __future__ import annotations

import inspect
import json
import re
import runpy
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from bldseg.data import synthetic
from bldseg.data.rle import rle_decode
from bldseg.data.synthetic import (
    NOISE_KINDS,
    corrupt_mask,
    generate_scene,
    generate_world,
)

# Tiny world: 12 train scenes of 96 px, 40 test tiles of 32 px cut from 5 scenes of 96 px.
SMALL = dict(
    n_train=12,
    train_size=96,
    n_test=40,
    test_size=32,
    test_scene_size=96,
    noise_fraction=0.5,
    seed=3,
    progress=False,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> synthetic.SyntheticWorld:
    return generate_world(tmp_path_factory.mktemp("world") / "w", **SMALL)


@pytest.fixture(scope="module")
def scenes() -> list[synthetic.SyntheticScene]:
    # 16 training-like scenes of 128 px: enough pixels for share/threshold statistics.
    return [
        generate_scene(np.random.SeedSequence([11, i]), 128, 128, min_buildings=1)
        for i in range(16)
    ]


def _read_rgb(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert img is not None, path
    return img[..., ::-1]


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


# --- scenes ---------------------------------------------------------------------------------


def test_scene_deterministic_and_seed_sensitive() -> None:
    a = generate_scene(5, 80, 96, min_buildings=1)
    b = generate_scene(5, 80, 96, min_buildings=1)
    c = generate_scene(6, 80, 96, min_buildings=1)
    assert a.image.shape == (80, 96, 3) and a.image.dtype == np.uint8
    assert a.mask.shape == (80, 96) and set(np.unique(a.mask)) <= {0, 1}
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert not np.array_equal(a.image, c.image)
    np.testing.assert_array_equal(a.mask, (a.instances > 0).astype(np.uint8))


def test_min_buildings_guaranteed(scenes: list[synthetic.SyntheticScene]) -> None:
    assert all(s.mask.any() for s in scenes)


def test_buildings_cover_plausible_share(scenes: list[synthetic.SyntheticScene]) -> None:
    share = np.mean([s.mask.mean() for s in scenes])
    assert 0.05 < share < 0.40, share


def test_scene_is_not_solvable_by_colour_threshold(
    scenes: list[synthetic.SyntheticScene],
) -> None:
    # The best per-pixel threshold on a single channel, brightness or greyness (chosen on the
    # very data it is scored on, so an upper bound) must stay far from a real model's Dice.
    img = np.stack([s.image for s in scenes]).astype(np.float32)  # (N, H, W, 3)
    gt = np.stack([s.mask for s in scenes]).astype(bool)
    feats = {
        "r": img[..., 0],
        "g": img[..., 1],
        "b": img[..., 2],
        "brightness": img.mean(-1),
        "greyness": -np.abs(img - img.mean(-1, keepdims=True)).sum(-1),
    }
    best = 0.0
    for f in feats.values():
        for th in np.quantile(f, np.linspace(0.02, 0.98, 49)):
            for pred in (f > th, f <= th):
                best = max(best, 2 * (pred & gt).sum() / (pred.sum() + gt.sum()))
    assert best < 0.5, best


def test_sweep_equals_union_of_shifted_copies() -> None:
    # The shadow (Minkowski sum with a segment) of an L-shaped polygon vs a brute-force union
    # of many shifted rasters.
    poly = np.array([[10, 10], [30, 10], [30, 30], [20, 30], [20, 20], [10, 20]], float)
    d = np.array([9.0, 5.0])
    swept = np.zeros((64, 64), np.uint8)
    synthetic._sweep(swept, [poly], d)
    brute = np.zeros_like(swept)
    for t in np.linspace(0, 1, 200):
        synthetic._fill_full(brute, [poly + t * d], 1)
    # Rasterisation of edges may differ by a pixel along the boundary only.
    assert (swept != brute).sum() <= 0.05 * brute.sum()
    assert swept[12, 12] and swept[34, 38] and not swept[50, 12]


def _long_side(pixels: np.ndarray) -> float:
    # Longest side (px) of the smallest rotated rectangle holding an instance's (N, 2) pixels.
    (_, _), (w, h), _ = cv2.minAreaRect(pixels[:, ::-1].astype(np.float32))
    return max(w, h) + 1


def test_building_sizes_keep_to_the_documented_ranges() -> None:
    # Footprints that lie wholly inside 448-px scenes, measured on the instance map: each kind's
    # long side within its BUILDING_SIZES length range (2.5 px of rasterisation slack: the
    # pixel hull of a small rotated footprint is up to about 2 px longer than the polygon).
    sides: dict[str, list[float]] = {}
    for i in range(6):
        s = generate_scene(np.random.SeedSequence([21, i]), 448, 448, min_buildings=1)
        for k in np.unique(s.instances[s.instances > 0]):
            px = np.argwhere(s.instances == k)  # (N, 2) y, x
            if px.min() == 0 or px.max() == 447:
                continue  # cut by the scene's border
            sides.setdefault(s.kinds[k - 1], []).append(_long_side(px))
    for kind, values in sides.items():
        (lo, hi), _, _ = synthetic.BUILDING_SIZES[kind]
        assert lo - 2.5 <= min(values) and max(values) <= hi + 2.5, (kind, min(values), max(values))
    houses = np.array(sides["house"])
    assert len(houses) >= 20 and 15 <= np.median(houses) <= 40  # 0.5 m/px: 10-20 m houses
    assert max(max(v) for v in sides.values()) >= 100  # large buildings, 50 m and more
    # Houses outnumber sheds: most buildings are large enough to score on.
    assert len(sides["house"]) > len(sides.get("shed", []))


def test_default_test_tiles_hold_several_buildings(tmp_path: Path) -> None:
    # The default world's test tiles (its default tile and scene sizes), from a few scenes:
    # buildings are the connected components of the truth (placement keeps a gap between them).
    defaults = inspect.signature(generate_world).parameters
    size = defaults["test_size"].default
    scene = defaults["test_scene_size"].default
    per_scene = (scene // size) ** 2
    w = generate_world(
        tmp_path / "w",
        n_train=1,
        train_size=32,
        n_test=6 * per_scene,
        test_scene_size=scene,
        progress=False,
    )
    truth = pd.read_csv(w.test_truth_csv, keep_default_na=False)
    assert (truth.height == size).all() and (truth.width == size).all()
    counts = np.array(
        [cv2.connectedComponents(rle_decode(r, (size, size)))[0] - 1 for r in truth.mask_rle]
    )
    assert np.median(counts) >= 5, counts
    assert (counts >= 3).mean() >= 0.7, counts
    assert (counts == 0).mean() <= 0.2, counts  # some empty tiles, as in the competition


# --- label noise ----------------------------------------------------------------------------


def test_corrupt_mask_kinds() -> None:
    # Buildings >= 6 px from the border, so a shift (at most 6 px) never pushes one off.
    inst = np.zeros((60, 60), np.int32)
    inst[10:20, 10:20] = 1
    inst[25:35, 27:40] = 2
    inst[38:44, 12:18] = 3
    mask = (inst > 0).astype(np.uint8)
    rng = np.random.default_rng(0)
    out = {k: corrupt_mask(mask, inst, k, rng) for k in NOISE_KINDS}
    for k, m in out.items():
        assert m.shape == mask.shape and m.dtype == np.uint8, k
        assert not np.array_equal(m, mask), k
    assert not out["empty"].any()
    assert (out["dilate"] >= mask).all() and out["dilate"].sum() > mask.sum()
    assert (out["erode"] <= mask).all() and out["erode"].sum() < mask.sum()
    # Missing buildings are dropped whole: each instance is kept entirely or not at all.
    for k in (1, 2, 3):
        kept = out["missing"][inst == k]
        assert kept.all() or not kept.any()
    assert out["missing"].sum() < mask.sum()
    # A shift keeps the shape.
    assert out["shift"].sum() == mask.sum()
    with pytest.raises(ValueError, match="unknown noise kind"):
        corrupt_mask(mask, inst, "rotate", rng)


# --- world on disk --------------------------------------------------------------------------


def test_world_layout_and_columns(world: synthetic.SyntheticWorld) -> None:
    root = world.root
    train = pd.read_csv(world.train_csv, keep_default_na=False)
    clean = pd.read_csv(world.train_clean_csv, keep_default_na=False)
    noise = pd.read_csv(world.train_noise_csv)
    test = pd.read_csv(world.test_csv)
    truth = pd.read_csv(world.test_truth_csv, keep_default_na=False)
    sub = pd.read_csv(world.sample_submission_csv, keep_default_na=False, dtype=str)
    assert list(train.columns) == ["img_id", "img_path", "mask_rle"]
    assert list(clean.columns) == ["img_id", "img_path", "mask_rle"]
    assert list(noise.columns) == ["img_id", "noise"]
    assert list(test.columns) == ["img_id", "img_path", "group"]
    assert list(truth.columns) == ["img_id", "mask_rle", "height", "width"]
    assert list(sub.columns) == ["img_id", "mask_rle"]
    assert len(train) == 12 and len(test) == 40 and len(truth) == 40 and len(sub) == 40
    assert train.img_id.iloc[0] == "TRAIN_0000" and test.img_id.iloc[0] == "TEST_00000"
    assert (sub.mask_rle == "-1").all()
    assert (train.img_path == clean.img_path).all() and (train.img_id == noise.img_id).all()
    for _, r in clean.iterrows():
        img = _read_rgb(root / r.img_path)
        assert img.shape == (96, 96, 3)
        assert rle_decode(r.mask_rle, (96, 96)).any()  # every training image has a building
    for _, r in truth.iterrows():
        assert (r.height, r.width) == (32, 32)
        rle_decode(r.mask_rle, (32, 32))
    assert _read_rgb(root / test.img_path.iloc[0]).shape == (32, 32, 3)
    # 9 tiles per 96-px scene: the group names each tile's source scene, in cutting order
    assert test.group.tolist() == [f"scene_{t // 9:04d}" for t in range(40)]
    meta = json.loads((root / "world.json").read_text())
    assert meta["params"]["format_version"] == synthetic.FORMAT_VERSION
    assert meta["params"]["n_train"] == 12 and meta["params"]["seed"] == 3
    assert not list(root.rglob("*.tmp"))


def test_some_test_tiles_are_empty(world: synthetic.SyntheticWorld) -> None:
    truth = pd.read_csv(world.test_truth_csv, keep_default_na=False)
    empty = (truth.mask_rle == "-1").mean()
    assert 0 < empty < 1, empty


def test_noise_fraction_and_clean_masks(world: synthetic.SyntheticWorld) -> None:
    train = pd.read_csv(world.train_csv, keep_default_na=False)
    clean = pd.read_csv(world.train_clean_csv, keep_default_na=False)
    noise = pd.read_csv(world.train_noise_csv)
    noisy = noise.noise != "none"
    assert noisy.sum() == round(0.5 * 12)
    assert set(noise.noise) <= {"none", *NOISE_KINDS}
    differs = np.array(
        [
            not np.array_equal(rle_decode(a, (96, 96)), rle_decode(b, (96, 96)))
            for a, b in zip(train.mask_rle, clean.mask_rle, strict=True)
        ]
    )
    np.testing.assert_array_equal(differs, noisy.to_numpy())


def test_world_bytes_deterministic(tmp_path: Path, world: synthetic.SyntheticWorld) -> None:
    again = generate_world(tmp_path / "again", **SMALL)
    assert _tree_bytes(again.root) == _tree_bytes(world.root)
    other = generate_world(tmp_path / "other", **{**SMALL, "seed": 4})
    a = (world.root / "train_img" / "TRAIN_0000.png").read_bytes()
    assert (other.root / "train_img" / "TRAIN_0000.png").read_bytes() != a


def test_image_does_not_depend_on_count(tmp_path: Path, world: synthetic.SyntheticWorld) -> None:
    fewer = generate_world(tmp_path / "fewer", **{**SMALL, "n_train": 3, "n_test": 9})
    for name in ("train_img/TRAIN_0002.png", "test_img/TEST_00008.png"):
        assert (fewer.root / name).read_bytes() == (world.root / name).read_bytes()


def test_idempotent_parameter_mismatch_and_overwrite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = {**SMALL, "n_train": 2, "n_test": 4}
    w = generate_world(tmp_path / "w", **params)
    before = _tree_bytes(w.root)

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("a complete world must not be regenerated")

    with monkeypatch.context() as m:
        m.setattr(synthetic, "_build", fail)
        again = generate_world(tmp_path / "w", **params)
    assert again.train_csv == w.train_csv and _tree_bytes(w.root) == before

    with pytest.raises(ValueError, match="overwrite=True"):
        generate_world(tmp_path / "w", **{**params, "seed": 9})
    generate_world(tmp_path / "w", **{**params, "seed": 9, "n_train": 1}, overwrite=True)
    assert len(pd.read_csv(w.train_csv)) == 1
    assert sorted(p.name for p in (w.root / "train_img").iterdir()) == ["TRAIN_0000.png"]
    assert json.loads((w.root / "world.json").read_text())["params"]["seed"] == 9


def test_half_written_world_is_regenerated(tmp_path: Path) -> None:
    params = {**SMALL, "n_train": 2, "n_test": 4}
    w = generate_world(tmp_path / "w", **params)
    before = _tree_bytes(w.root)
    # An interrupted build: world.json is written last, so it is missing; a PNG is truncated.
    (w.root / "world.json").unlink()
    (w.root / "train_img" / "TRAIN_0001.png").write_bytes(b"\x89PNG")
    generate_world(tmp_path / "w", **params)
    assert _tree_bytes(w.root) == before


# One command preparing the built-in world: its generation can be held at the start (``A``,
# until ``go`` exists), and each entry and exit of the generation is logged.
_PREPARE = """
import sys, time
from pathlib import Path
from bldseg.data import synthetic
from bldseg.data.prepare import prepare_data

name, root, log, go = sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
build = synthetic._build

def logged_build(world, progress):
    with log.open("a") as f:
        f.write(f"{name} enters\\n")
    if name == "A":  # B starts to prepare while A generates
        while not go.exists():
            time.sleep(0.02)
        time.sleep(1.0)
    build(world, progress)
    with log.open("a") as f:
        f.write(f"{name} leaves\\n")

synthetic._build = logged_build
if name == "B":
    go.touch()
world = dict(n_train=4, train_size=32, n_test=4, test_size=16, test_scene_size=32, seed=1)
data = prepare_data(None, data_root=root, synthetic=world, progress=False)
print(len(data.train), len(data.test))
"""


def test_two_commands_generating_the_world_at_once(tmp_path: Path) -> None:
    # Both found no world and generated it: the second deleted train_img/ while the first
    # wrote and cached it, which failed with "image not found". The second must wait, then
    # use the world the first generated.
    log, go = tmp_path / "log", tmp_path / "go"

    def start(name: str) -> subprocess.Popen:
        argv = [sys.executable, "-c", _PREPARE, name, str(tmp_path / "root"), str(log), str(go)]
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    a = start("A")
    deadline = time.monotonic() + 60
    while not (log.is_file() and "A enters" in log.read_text()):
        assert a.poll() is None, a.communicate()
        assert time.monotonic() < deadline, "A never started generating"
        time.sleep(0.05)
    b = start("B")
    outs = [p.communicate(timeout=120) for p in (a, b)]
    assert [p.returncode for p in (a, b)] == [0, 0], [err[-2000:] for _, err in outs]
    assert [out.split() for out, _ in outs] == [["4", "4"], ["4", "4"]]
    assert log.read_text().splitlines() == ["A enters", "A leaves"]  # generated once


def test_refuses_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text("img_id,img_path,mask_rle\n")
    with pytest.raises(ValueError, match="not a synthetic world"):
        generate_world(tmp_path, **SMALL)
    assert (tmp_path / "train.csv").read_text() == "img_id,img_path,mask_rle\n"


def _competition_folder(root: Path) -> dict[str, bytes]:
    """A user's real dataset in the competition layout; returns its files' bytes."""
    (root / "train_img").mkdir(parents=True)
    (root / "test_img").mkdir()
    cv2.imwrite(str(root / "train_img" / "a.png"), np.zeros((32, 32, 3), np.uint8))
    cv2.imwrite(str(root / "test_img" / "b.png"), np.zeros((32, 32, 3), np.uint8))
    (root / "train.csv").write_text("img_id,img_path,mask_rle\na,train_img/a.png,-1\n")
    (root / "test.csv").write_text("img_id,img_path\nb,test_img/b.png\n")
    return _tree_bytes(root)


def test_overwrite_never_replaces_a_real_dataset(tmp_path: Path) -> None:
    # Building deletes train_img/ and test_img/: overwrite may replace only a world of ours.
    before = _competition_folder(tmp_path / "comp")
    with pytest.raises(ValueError, match=r"comp is not empty and is not a synthetic world"):
        generate_world(tmp_path / "comp", **SMALL, overwrite=True)
    # A world.json of someone else's does not make the folder ours either.
    (tmp_path / "comp" / "world.json").write_text('{"params": {}}')
    with pytest.raises(ValueError, match="not a synthetic world"):
        generate_world(tmp_path / "comp", **SMALL, overwrite=True)
    (tmp_path / "comp" / "world.json").unlink()
    assert _tree_bytes(tmp_path / "comp") == before


def _make_synthetic(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    """Runs experiments/make_synthetic.py with ``argv``; returns its exit status."""
    script = Path(__file__).resolve().parents[2] / "experiments" / "make_synthetic.py"
    monkeypatch.setattr(sys, "argv", [script.name, *argv])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(script), run_name="__main__")
    return e.value.code


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--n-train", "0"], "n_train=0 and n_test=.* must both be at least 1"),
        (["--noise-fraction", "2"], r"noise_fraction=2\.0 must lie in \[0, 1\]"),
        (["--overwrite"], r"comp is not empty and is not a synthetic world.*--overwrite"),
    ],
)
def test_make_synthetic_user_errors_are_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    flags: list[str],
    match: str,
) -> None:
    before = _competition_folder(tmp_path / "comp")
    assert _make_synthetic([str(tmp_path / "comp"), "--no-progress", *flags], monkeypatch) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert re.search(rf"^make_synthetic\.py: error: .*{match}", err)
    assert _tree_bytes(tmp_path / "comp") == before


def test_make_synthetic_names_the_flag_for_another_world(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    sizes = ["--train-size", "32", "--test-size", "16", "--test-scene-size", "32"]
    args = [str(tmp_path / "w"), "--no-progress", "--n-train", "2", "--n-test", "4", *sizes]
    assert _make_synthetic(args, monkeypatch) == 0
    assert _make_synthetic([*args, "--seed", "1"], monkeypatch) == 1
    assert (
        "other parameters (old, new): {'seed': (0, 1)}; pass --overwrite" in capsys.readouterr().err
    )
    assert _make_synthetic([*args, "--seed", "1", "--overwrite"], monkeypatch) == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_train": 0}, "at least 1"),
        ({"test_size": 128}, "test_scene_size"),
        ({"noise_fraction": 1.5}, r"\[0, 1\]"),
        ({"train_size": 8}, ">= 16"),
    ],
)
def test_bad_parameters(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        generate_world(tmp_path / "w", **{**SMALL, **kwargs})

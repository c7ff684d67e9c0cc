import albumentations as A
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from bldseg.data.cache import build_cache
from bldseg.data.dataset import (
    RandomCropDataset,
    TileDataset,
    fold_assignment,
    fold_indices,
    split_indices,
    validation_tiles,
    window_for,
)
from bldseg.data.readers import read_competition_csv
from tests.data.test_readers import make_competition


@pytest.fixture
def cache(tmp_path):
    csv, _ = make_competition(tmp_path / "ds", n=5, size=64)
    return build_cache(read_competition_csv(csv), tmp_path / "cache", progress=False)


def test_split_is_deterministic_disjoint_and_complete():
    tr, va = split_indices(100, 0.05, seed=3)
    assert len(va) == 5 and len(tr) == 95
    assert set(tr).isdisjoint(va) and set(tr) | set(va) == set(range(100))
    tr2, va2 = split_indices(100, 0.05, seed=3)
    assert (va == va2).all() and (tr == tr2).all()
    assert not np.array_equal(split_indices(100, 0.05, seed=4)[1], va)
    assert len(split_indices(3, 0.05)[1]) == 1  # at least one validation image
    with pytest.raises(ValueError, match="val_fraction"):
        split_indices(10, 1.5)


def _scenes(sizes: list[int]) -> list[str]:
    """Group labels: scene i cut into sizes[i] tiles, tiles interleaved as a cache lists them."""
    labels = [f"scene{i}" for i, n in enumerate(sizes) for _ in range(n)]
    return [labels[i] for i in np.random.default_rng(0).permutation(len(labels))]


@pytest.mark.parametrize("seed", range(6))
def test_one_huge_scene_does_not_become_the_validation_side(seed):
    # a scene of 95 tiles and five single tiles at 5%: the big scene was taken whole whenever
    # the shuffle put it first (train 1 / val 99), silently
    groups = _scenes([95, 1, 1, 1, 1, 1])
    tr, va = split_indices(100, 0.05, seed=seed, groups=groups)
    assert len(va) == 5 and len(tr) == 95
    assert {groups[i] for i in va}.isdisjoint(groups[i] for i in tr)
    # no split near the fraction is possible: the smallest group, and a warning saying so
    with pytest.warns(UserWarning, match=r"val_fraction=0.05: whole split groups give 40"):
        tr, va = split_indices(100, 0.05, seed=seed, groups=_scenes([60, 40]))
    assert len(va) == 40


@pytest.mark.parametrize("seed", range(4))
def test_the_last_group_stays_for_training(seed):
    # two equal scenes at 80%: the second one brought the validation side closer to 80 samples
    # (100 against 50), so both were taken and training failed later with "no training images"
    groups = _scenes([50, 50])
    tr, va = split_indices(100, 0.8, seed=seed, groups=groups)
    assert len(tr) == len(va) == 50
    assert {groups[i] for i in va}.isdisjoint(groups[i] for i in tr)
    tr, va = split_indices(30, 0.95, seed=seed, groups=_scenes([10, 10, 10]))
    assert (len(tr), len(va)) == (10, 20)


@pytest.mark.parametrize("k", [2, 3, 5, 7])
def test_folds_partition_the_groups(k):
    groups = _scenes([9, 1, 4, 4, 6, 2, 3, 3, 5, 1, 2])  # 40 tiles of 11 scenes
    fold = fold_assignment(len(groups), k, seed=1, groups=groups)
    assert fold.shape == (40,) and set(fold.tolist()) == set(range(k))  # no fold is empty
    for g in set(groups):  # a scene lies in one fold
        assert len({int(f) for f, gg in zip(fold, groups, strict=True) if gg == g}) == 1, g
    sizes = np.bincount(fold, minlength=k)
    assert sizes.max() - sizes.min() <= 9  # at most the largest scene apart
    seen = np.zeros(40, int)
    for f in range(k):
        tr, va = fold_indices(len(groups), k, f, seed=1, groups=groups)
        # each fold trains on every other fold's images, never on a scene it validates on
        assert set(tr) | set(va) == set(range(40)) and set(tr).isdisjoint(va)
        assert {groups[i] for i in tr}.isdisjoint({groups[i] for i in va})
        np.testing.assert_array_equal(va, np.flatnonzero(fold == f))
        seen[va] += 1
    assert (seen == 1).all()  # every image in exactly one validation fold
    np.testing.assert_array_equal(fold, fold_assignment(40, k, seed=1, groups=groups))
    # labels spelt differently, same scenes: the same folds (codes by first appearance)
    renamed = [g.replace("scene", "S-") for g in groups]
    np.testing.assert_array_equal(fold, fold_assignment(40, k, seed=1, groups=renamed))


def test_folds_depend_on_the_seed_and_balance_single_images():
    a = fold_assignment(20, 4, seed=0)
    assert (np.bincount(a) == 5).all()  # one group per image: equal folds
    assert not np.array_equal(a, fold_assignment(20, 4, seed=1))
    # K = number of groups: one scene per fold
    groups = _scenes([3, 2, 5])
    assert sorted(np.bincount(fold_assignment(10, 3, 0, groups))) == [2, 3, 5]


def test_fold_errors_name_the_flag():
    groups = _scenes([3, 2, 5])
    with pytest.raises(ValueError, match=r"--folds 4: the data has only 3 split group"):
        fold_assignment(10, 4, 0, groups)
    with pytest.raises(ValueError, match=r"--folds 1: K-fold training needs at least 2"):
        fold_assignment(10, 1, 0, groups)
    with pytest.raises(ValueError, match=r"--fold 3: the folds of --folds 3 are 0\.\.2"):
        fold_indices(10, 3, 3, 0, groups)
    with pytest.raises(ValueError, match=r"--fold -1"):
        fold_indices(10, 3, -1, 0, groups)


def test_validation_tiles_cover_images(cache):
    tiles = validation_tiles(cache, [1, 3], 24)
    assert {t.index for t in tiles} == {1, 3}
    assert len(tiles) == 2 * 9  # 64 px with 24 px tiles: starts 0, 24, 40
    assert tiles[0].tile_id(cache.ids) == "TRAIN_0001_y0_x0"
    with pytest.raises(ValueError, match="larger than the cached images"):
        validation_tiles(cache, [0], 128)


def test_tile_dataset_returns_exact_windows(cache):
    tiles = validation_tiles(cache, [2], 32)
    ds = TileDataset(cache, tiles)
    s = ds[3]
    t = tiles[3]
    expect = cache.images[2, t.y : t.y + 32, t.x : t.x + 32].transpose(2, 0, 1) / 255.0
    np.testing.assert_allclose(s["image"].numpy(), expect, atol=1e-7)
    np.testing.assert_array_equal(
        s["mask"][0].numpy(), cache.masks[2, t.y : t.y + 32, t.x : t.x + 32]
    )
    assert s["tile"] == 3


def reference_pipeline(crop: int) -> A.Compose:
    return A.Compose(
        [
            A.RandomScale(scale_limit=0.2, p=0.5),
            A.RandomCrop(crop, crop),
            A.VerticalFlip(p=0.5),
            A.HorizontalFlip(p=0.5),
            A.Normalize(),
        ]
    )


def test_random_crops_are_consistent_and_deterministic(cache):
    ds = RandomCropDataset(cache, [0, 1, 2], None, window=32, seed=7)
    s = ds[1]
    assert s["image"].shape == (3, 32, 32) and s["mask"].shape == (1, 32, 32)
    # image and mask come from the same window: find it in the source image
    img = (s["image"].numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8)
    src = cache.images[s["index"]]
    found = [
        (y, x)
        for y in range(64 - 32 + 1)
        for x in range(64 - 32 + 1)
        if np.array_equal(src[y : y + 32, x : x + 32], img)
    ]
    assert len(found) == 1
    y, x = found[0]
    np.testing.assert_array_equal(
        s["mask"][0].numpy(), cache.masks[s["index"], y : y + 32, x : x + 32]
    )

    aug = RandomCropDataset(cache, [0, 1, 2], reference_pipeline(24), window=window_for(24, 0.2))
    a, b = aug[0], aug[0]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    aug.set_epoch(1)
    assert not torch.equal(aug[0]["image"], a["image"])
    assert a["image"].shape == (3, 24, 24) and a["image"].dtype == torch.float32
    assert set(a["mask"].unique().tolist()) <= {0.0, 1.0}


def test_the_transforms_of_a_sample_draw_independently(cache):
    # Two flips at p=0.5 on the whole image: each of the four outcomes about a quarter of the
    # time. Seeding every transform from the same number made them draw alike: only "none"
    # and "both" ever happened (a 180-degree turn, never a single flip).
    flips = A.Compose([A.VerticalFlip(p=0.5), A.HorizontalFlip(p=0.5)])
    ds = RandomCropDataset(cache, [0, 1, 2], flips, window=64, seed=3, samples_per_epoch=400)
    outcomes = {"none": 0, "vertical": 0, "horizontal": 0, "both": 0}
    for i in range(400):
        s = ds[i]
        got = (s["image"].numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8)
        src = cache.images[s["index"]]
        views = {
            "none": src,
            "vertical": src[::-1],
            "horizontal": src[:, ::-1],
            "both": src[::-1, ::-1],
        }
        outcomes[next(k for k, v in views.items() if np.array_equal(v, got))] += 1
    assert all(60 <= n <= 140 for n in outcomes.values()), outcomes


def test_dataloader_workers_match_main_process(cache):
    ds = RandomCropDataset(cache, [0, 1, 2, 3], reference_pipeline(24), window=30, seed=1)
    main = [ds[i]["image"] for i in range(4)]
    loader = DataLoader(ds, batch_size=2, num_workers=2, shuffle=False)
    got = torch.cat([b["image"] for b in loader])
    assert torch.equal(got, torch.stack(main))


def test_short_epochs_go_on_through_every_image(cache):
    # 5 images, 2 samples per epoch: epochs continue one shuffled pass after another, so every
    # image is drawn once per pass (item i of every epoch used to be image i: images 2-4 never)
    ds = RandomCropDataset(cache, [0, 1, 2, 3, 4], None, window=16, samples_per_epoch=2)
    drawn = []
    for epoch in range(5):
        ds.set_epoch(epoch)
        drawn += [ds[i]["index"] for i in range(2)]
    assert sorted(drawn) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert drawn[:5] != [0, 1, 2, 3, 4] or drawn[5:] != [0, 1, 2, 3, 4]  # shuffled passes
    # long epochs: each image as often as the epoch allows, and the same draw every time
    long = RandomCropDataset(cache, [0, 1, 2, 3, 4], None, window=16, samples_per_epoch=12)
    counts = np.bincount([long[i]["index"] for i in range(12)], minlength=5)
    assert sorted(counts.tolist()) == [2, 2, 2, 3, 3]
    assert [long[i]["index"] for i in range(12)] == [long[i]["index"] for i in range(12)]


def test_training_needs_masks(tmp_path):
    csv, _ = make_competition(tmp_path / "ds")
    unl = build_cache(read_competition_csv(csv, with_masks=False), tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="training needs masks"):
        RandomCropDataset(unl, [0])

"""Folder prediction: sliding windows, blending, mask files, GeoTIFF outputs, scoring, the CLI.

Two kinds of model keep these tests fast and exact:

- the tiny UPerNet-InternImage, randomly initialised and saved as a real checkpoint: a
  realistic network for the equivalence with :func:`predict_cache` and for the CLI;
- a "pointwise" model registered for the test, whose probability at a pixel is that pixel's
  red value / 255: every window agrees on every pixel, so a blended map must equal the red
  channel exactly, which catches any misplaced, mis-padded or mis-cropped window.
"""

import json
import re
import runpy
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from bldseg import metrics
from bldseg.data.cache import ensure_cache
from bldseg.data.readers import ReadOptions, read_folder_dataset
from bldseg.models import create_model, registry
from bldseg.predict import (
    OUTPUTS_FILE,
    EnsembleSpec,
    blend_weights,
    combine_members,
    load_checkpoint,
    predict_cache,
    predict_folder,
    predict_image,
    sliding_windows,
    write_submission,
)
from bldseg.train.augment import IMAGENET_MEAN, IMAGENET_STD, build_eval_transform
from bldseg.train.config import RunConfig
from bldseg.train.engine import image_read_record, predict_probs

REPO = Path(__file__).resolve().parents[1]
TINY = "upernet_internimage_tiny"


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def write_png(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


def read_png(path: Path) -> np.ndarray:
    m = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert m is not None, path
    return m


def noise_image(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth random RGB (blurred noise), so the network sees structure, not white noise."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return cv2.GaussianBlur(img, (5, 5), 0)


def save_checkpoint(
    path: Path, model_name: str, seed: int, *, image_read: bool = True, **flat
) -> Path:
    """A checkpoint in the format load_checkpoint reads (what fit() writes as best.pt): with
    ``image_read``, recording the default image read options, as fit does for data read by
    them (without: a checkpoint from before that record)."""
    cfg = RunConfig.from_flat({"model": model_name, "impl": "reference", **flat})
    torch.manual_seed(seed)
    model = create_model(cfg.model, impl=cfg.impl)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"model": model.state_dict(), "config": cfg.to_flat(), "metrics": {"val_thr_best": 0.5}}
    if image_read:
        state["image_read"] = image_read_record(ReadOptions())
    torch.save(state, path)
    return path


class Pointwise(nn.Module):
    """Probability of a pixel = its red value / 255 (undoing the ImageNet normalisation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        red = x[:, :1] * IMAGENET_STD[0] + IMAGENET_MEAN[0]  # (B, 1, H, W) in [0, 1]
        # float64 so the logit round trip lands within far less than half a level of red/255
        return torch.logit(red.double().clamp(1e-9, 1 - 1e-9)).float()


class WindowRamp(nn.Module):
    """Probability = column index inside the window / (S - 1): differs between windows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.shape[-1]
        ramp = torch.linspace(0.0, 1.0, s, dtype=torch.float64).clamp(1e-9, 1 - 1e-9)
        return torch.logit(ramp).float().expand(x.shape[0], 1, x.shape[-2], s)


class Constant(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.logit = float(np.log(p / (1 - p)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], 1, *x.shape[-2:]), self.logit)


@pytest.fixture
def pointwise_model(monkeypatch):
    """Registers the pointwise model for this test, so real checkpoints can name it."""
    monkeypatch.setitem(registry._MODELS, "test_pointwise", lambda **kw: Pointwise())
    return "test_pointwise"


@pytest.fixture(scope="module")
def tiny_ckpts(tmp_path_factory):
    """Two randomly initialised tiny UPerNet-InternImage checkpoints validated on 32-px tiles."""
    root = tmp_path_factory.mktemp("ckpt")
    return [
        str(save_checkpoint(root / f"m{s}" / "best.pt", TINY, s, **{"aug.crop_size": 32}))
        for s in (0, 1)
    ]


# --------------------------------------------------------------------------------------------
# Windows and blending
# --------------------------------------------------------------------------------------------


def test_sliding_windows_cover_with_last_row_shifted_inwards():
    assert sliding_windows(32, 32, 32, 0.25) == [(0, 0)]
    # step 32 - 8 = 24: 0, 24, 48, then the last shifted to 100 - 32 = 68
    ys = sorted({y for y, _ in sliding_windows(100, 75, 32, 0.25)})
    xs = sorted({x for _, x in sliding_windows(100, 75, 32, 0.25)})
    assert ys == [0, 24, 48, 68] and xs == [0, 24, 43]
    assert sorted({x for _, x in sliding_windows(64, 64, 32, 0.0)}) == [0, 32]
    w = blend_weights(32)
    assert w.shape == (32, 32) and np.array_equal(w, w.T) and np.array_equal(w, w[::-1])
    assert w.min() == pytest.approx(0.05**2) and w.max() == pytest.approx((1 - 1 / 32) ** 2)


@pytest.mark.parametrize("shape", [(100, 75), (20, 40), (32, 32), (33, 90), (1, 50)])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
def test_pointwise_model_blends_to_itself(shape, overlap):
    # Every window predicts every pixel as its red value, so any weighting must give it back;
    # a window placed, padded or cropped wrongly would not.
    image = noise_image(*shape, seed=sum(shape))
    q = predict_image(Pointwise(), image, window=32, overlap=overlap, batch_size=3)
    assert q.shape == shape and q.dtype == np.uint8
    np.testing.assert_array_equal(q, image[..., 0])


@pytest.mark.parametrize("p", [0.6, 0.3, 0.5, 0.97])
def test_constant_model_blends_to_the_constant(p):
    torch.manual_seed(0)
    image = noise_image(100, 75, seed=1)
    q = predict_image(Constant(p), image, window=32, overlap=0.5)
    one_window = predict_image(Constant(p), image[:32, :32], window=32)
    assert one_window.min() == one_window.max()
    assert (q == one_window[0, 0]).all()
    assert abs(int(q[0, 0]) - p * 255) <= 0.5


def test_blend_matches_naive_weighted_mean():
    # A model whose answer depends on where a pixel sits in its window: the blend must be the
    # weight-averaged answer of the windows covering each pixel (reference in float64).
    h, w, s, overlap = 70, 50, 32, 0.4
    q = predict_image(WindowRamp(), noise_image(h, w, seed=2), window=s, overlap=overlap)
    local = metrics.quantise(np.linspace(0.0, 1.0, s)) / 255.0  # (S,) one window's map
    weight = blend_weights(s).astype(np.float64)
    num = np.zeros((h, w))
    den = np.zeros((h, w))
    for y, x in sliding_windows(h, w, s, overlap):
        num[y : y + s, x : x + s] += weight * local[None, :]
        den[y : y + s, x : x + s] += weight
    ref = metrics.quantise(num / den)
    assert np.abs(q.astype(int) - ref.astype(int)).max() <= 1
    assert (q == ref).mean() > 0.99
    assert len(np.unique(q)) > 20  # really blended, not one window's ramp


def _predict_image_unbounded(
    model: nn.Module, image: np.ndarray, window: int, overlap: float
) -> np.ndarray:
    """predict_image as it was before its memory was bounded: a padded copy of every scene,
    new float32 maps for the division and the clip, and the whole map quantised at once."""
    h, w = image.shape[:2]
    padded = np.pad(
        image, ((0, max(0, window - h)), (0, max(0, window - w)), (0, 0)), mode="reflect"
    )
    hp, wp = padded.shape[:2]
    normalise = build_eval_transform()
    weight = blend_weights(window)
    acc = np.zeros((hp, wp), np.float32)
    norm = np.zeros((hp, wp), np.float32)
    corners = sliding_windows(hp, wp, window, overlap)
    for start in range(0, len(corners), 16):
        batch = corners[start : start + 16]
        tiles = [normalise(image=padded[y : y + window, x : x + window])["image"] for y, x in batch]
        xb = torch.from_numpy(np.ascontiguousarray(np.stack(tiles).transpose(0, 3, 1, 2)))
        q = predict_probs(model, [{"image": xb}], torch.device("cpu"))
        for (y, x), qi in zip(batch, q, strict=True):
            acc[y : y + window, x : x + window] += weight * (qi.astype(np.float32) / 255)
            norm[y : y + window, x : x + window] += weight
    return metrics.quantise(np.clip(acc[:h, :w] / norm[:h, :w], 0.0, 1.0))


def _random_conv(seed: int) -> nn.Module:
    """A model whose maps vary from pixel to pixel and window to window."""
    torch.manual_seed(seed)
    return nn.Conv2d(3, 1, 5, padding=2).eval()


@pytest.mark.parametrize(
    ("shape", "overlap", "block"),
    [
        ((20, 45), 0.25, 64),  # padded: smaller than the window in one side
        ((32, 32), 0.25, 1 << 16),  # exactly one window
        ((70, 53), 0.25, 100),  # blocks of one row (53 px wide)
        ((97, 64), 0.5, 1000),  # blocks of 15 rows, the last one short
    ],
)
def test_predict_image_is_bit_identical_to_the_unbounded_path(monkeypatch, shape, overlap, block):
    import bldseg.predict as P

    monkeypatch.setattr(P, "QUANTISE_BLOCK_PIXELS", block)
    image = noise_image(*shape, seed=5)
    model = _random_conv(1)
    got = predict_image(model, image, window=32, overlap=overlap)
    want = _predict_image_unbounded(model, image, 32, overlap)
    assert len(np.unique(want)) > 20  # the test's premise: many levels, blended
    np.testing.assert_array_equal(got, want)


def test_predict_image_holds_little_more_than_its_blend_arrays(monkeypatch):
    # A 4000 x 4000 scene peaked at ~42 bytes per pixel: a padded copy of the scene even when
    # no padding was needed, new float32 maps for the division and the clip, and float64
    # temporaries of quantise over 16M pixels at once. What is left: the float32 sums of
    # weighted probabilities and of weights, and the uint8 map (9 bytes a pixel).
    import tracemalloc

    import bldseg.predict as P

    # blocks as small against this scene as the default's against a 4000 x 4000 one
    monkeypatch.setattr(P, "QUANTISE_BLOCK_PIXELS", 4096)
    image = noise_image(512, 512, seed=6)  # 262,144 px
    model = _random_conv(2)
    tracemalloc.start()
    try:
        predict_image(model, image, window=32)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak / image[..., 0].size < 16, peak / image[..., 0].size


# --------------------------------------------------------------------------------------------
# The ensemble rule, by hand
# --------------------------------------------------------------------------------------------


def test_fractional_weights_give_the_float64_weighted_mean():
    # Weights 1 and 2.5 are not whole numbers: positive iff (q_a + 2.5 q_b) / (255 * 3.5) >= t.
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 256, (2, 3, 16, 16), dtype=np.uint8)  # (N, H, W) each
    t = 0.5  # 2 q_a + 5 q_b = 892.5 never holds for integers: no pixel sits on the threshold
    mean = (a.astype(np.float64) + 2.5 * b) / (255 * 3.5)  # (N, H, W)
    expected = mean >= t
    # equal weights, or 2.5 rounded either way, decide some pixels otherwise
    for other in ([1, 1], [1, 2], [1, 3]):
        alt = np.average(np.stack([a, b]).astype(float), axis=0, weights=other) / 255 >= t
        assert (alt != expected).any(), other
    spec = EnsembleSpec(["a", "b"], [1.0, 2.5], threshold=t)
    np.testing.assert_array_equal(combine_members([a, b], spec), expected)
    np.testing.assert_array_equal(combine_members([a[1], b[1]], spec), expected[1])  # (H, W)
    # the order of the weights follows the order of the maps
    swapped = EnsembleSpec(["b", "a"], [2.5, 1.0], threshold=t)
    np.testing.assert_array_equal(combine_members([b, a], swapped), expected)
    np.testing.assert_array_equal(
        combine_members([a, b], EnsembleSpec(["a", "b"], [2.5, 1.0], threshold=t)),
        (2.5 * a.astype(np.float64) + b) / (255 * 3.5) >= t,
    )


def test_min_area_empties_exactly_the_images_below_it():
    maps = np.zeros((3, 8, 8), np.uint8)
    maps[0, :2] = 200  # 16 predicted pixels
    maps[1, :5] = 200  # 40 predicted pixels
    maps[2, 0, 0] = 100  # below the threshold: already empty
    above = maps >= 128
    for min_area, emptied in ((0, []), (16, []), (17, [0]), (40, [0]), (41, [0, 1])):
        spec = EnsembleSpec(["m"], threshold=0.5, min_area=min_area)
        expected = above.copy()
        expected[emptied] = False
        np.testing.assert_array_equal(combine_members([maps], spec), expected, str(min_area))
        # one (H, W) image on its own, as folder prediction passes it
        for i in range(3):
            np.testing.assert_array_equal(combine_members([maps[i]], spec), expected[i])


# --------------------------------------------------------------------------------------------
# Folders -> masks
# --------------------------------------------------------------------------------------------


def test_the_prediction_bar_moves_per_batch_not_per_chunk(tiny_ckpts, tmp_path, monkeypatch):
    # It moved once a member had predicted a whole chunk (2,048 images): at 0% for an hour
    # with InternImage-T on a CPU.
    import bldseg.predict as P

    images = tmp_path / "images"
    for i in range(5):
        write_png(images / f"t{i}.png", noise_image(32, 32, seed=i))
    cache = ensure_cache(read_folder_dataset(images), tmp_path / "cache", progress=False)
    updates: list[int] = []
    real_tqdm = P.tqdm

    def recording(*args, **kwargs):
        bar = real_tqdm(*args, **kwargs)
        if kwargs.get("desc") == "predicting":
            bar.update = updates.append
        return bar

    monkeypatch.setattr(P, "tqdm", recording)
    spec = EnsembleSpec(tiny_ckpts, threshold=0.5)
    predict_cache(spec, cache, batch_size=2, device="cpu", progress=True, chunk=4)
    # two members, chunks of 4 + 1 images, batches of 2: 2, 2 | 1 for each member
    assert updates == [2, 2, 2, 2, 1, 1]


def test_tile_sized_images_match_predict_cache(tiny_ckpts, tmp_path):
    images = tmp_path / "images"
    for i in range(3):
        write_png(images / f"t{i}.png", noise_image(32, 32, seed=i))
    cache = ensure_cache(read_folder_dataset(images), tmp_path / "cache", progress=False)
    # Each spec thresholds at the median of its own (weighted) mean map on the first image: a
    # level the random networks hit often, so a pixel on either side of the integer rule would
    # show, whatever the two random networks' offsets are.
    maps = [
        predict_image(load_checkpoint(c)[0], noise_image(32, 32, seed=0), window=32)
        for c in tiny_ckpts
    ]  # (32, 32) uint8 each

    def t(weights: list[float]) -> float:
        mean = np.average(np.stack(maps[: len(weights)]).astype(float), axis=0, weights=weights)
        return float(np.median(mean)) / 255

    specs = {
        "one": EnsembleSpec(tiny_ckpts[:1], threshold=t([1.0])),
        "pair": EnsembleSpec(tiny_ckpts, threshold=t([1.0, 1.0])),
        "weighted": EnsembleSpec(tiny_ckpts, [1.0, 2.5], threshold=t([1.0, 2.5])),
        "min_area": EnsembleSpec(tiny_ckpts, threshold=t([1.0, 1.0]), min_area=400),
        "tta": EnsembleSpec(tiny_ckpts[:1], threshold=t([1.0]), tta=True),
    }
    for name, spec in specs.items():
        ref = predict_cache(spec, cache, batch_size=1, device="cpu", progress=False)
        r = predict_folder(spec, images, tmp_path / name, device="cpu", progress=False)
        got = np.stack([read_png(p) == 255 for p in r.masks])
        assert [p.stem for p in r.masks] == cache.ids, name
        np.testing.assert_array_equal(got, ref, err_msg=name)
        assert 0 < ref.mean() < 1 or name == "min_area", name
        assert r.empty == int((ref.sum((1, 2)) == 0).sum())


def test_each_member_predicts_with_its_own_tta(tiny_ckpts, tmp_path):
    # One "tta" for the whole spec: an ensemble of a member validated with flip TTA and one
    # validated without it ran both alike, which is not the combination the search scored.
    images = tmp_path / "images"
    imgs = [noise_image(32, 32, seed=i) for i in range(2)]
    for i, img in enumerate(imgs):
        write_png(images / f"t{i}.png", img)
    cache = ensure_cache(read_folder_dataset(images), tmp_path / "cache", progress=False)
    models = [load_checkpoint(c)[0] for c in tiny_ckpts]

    def maps(flags: list[bool]) -> list[list[np.ndarray]]:
        """Per image, each member's (32, 32) map predicted with its flag."""
        return [
            [predict_image(m, img, window=32, tta=f) for m, f in zip(models, flags, strict=True)]
            for img in imgs
        ]

    own = maps([True, False])  # each as it was validated: what the search scored
    mean = (own[0][0].astype(float) + own[0][1]) / 2  # threshold at its median: both sides hit
    spec = EnsembleSpec(
        tiny_ckpts, threshold=float(np.median(mean)) / 255, member_tta=[True, False]
    )
    want = np.stack([combine_members(m, spec) for m in own])  # (2, 32, 32)
    for flag in (True, False):  # the test's premise: one flag for both gives other masks
        alike = np.stack([combine_members(m, spec) for m in maps([flag, flag])])
        assert not np.array_equal(alike, want), flag
    np.testing.assert_array_equal(predict_cache(spec, cache, device="cpu", progress=False), want)
    r = predict_folder(spec, images, tmp_path / "out", device="cpu", progress=False)
    np.testing.assert_array_equal(np.stack([read_png(p) == 255 for p in r.masks]), want)


def test_large_image_gives_full_size_png_in_mirrored_folder(tiny_ckpts, tmp_path):
    images = tmp_path / "images"
    big = noise_image(100, 75, seed=3)
    write_png(images / "area" / "north" / "scene.png", big)
    write_png(images / "tile.jpg", noise_image(32, 32, seed=4))
    spec = EnsembleSpec(tiny_ckpts, threshold=0.5)
    r = predict_folder(spec, images, tmp_path / "out", device="cpu", progress=False)
    out = tmp_path / "out"
    assert r.masks == [out / "area" / "north" / "scene.png", out / "tile.png"]
    mask = read_png(out / "area" / "north" / "scene.png")
    assert mask.shape == (100, 75) and mask.dtype == np.uint8  # single channel
    assert set(np.unique(mask)) <= {0, 255}
    # the members' blended maps, combined by the ensemble rule
    models = [load_checkpoint(c)[0] for c in tiny_ckpts]
    ref = combine_members((predict_image(m, big, window=32) for m in models), spec)
    np.testing.assert_array_equal(mask == 255, ref)
    # atomic writes leave no temporary files behind; nothing but the masks (and the record of
    # them) is written
    written = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert written == sorted([OUTPUTS_FILE, "scene.png", "tile.png"])


def test_window_from_config_and_flag(pointwise_model, tmp_path):
    ckpt = save_checkpoint(tmp_path / "pw.pt", pointwise_model, 0, **{"aug.crop_size": 48})
    _, cfg, _ = load_checkpoint(ckpt)
    assert cfg.val_tile == 0 and cfg.aug.crop_size == 48
    images = tmp_path / "images"
    img = noise_image(20, 90, seed=5)
    write_png(images / "a.png", img)
    spec = EnsembleSpec([str(ckpt)], threshold=0.5)
    for window in (None, 32, 64):
        r = predict_folder(spec, images, tmp_path / f"out{window}", window=window, progress=False)
        np.testing.assert_array_equal(read_png(r.masks[0]) == 255, img[..., 0] >= 128)


def test_geotiff_input_gives_georeferenced_mask(tiny_ckpts, tmp_path):
    rasterio = pytest.importorskip("rasterio")
    from affine import Affine

    images = tmp_path / "images"
    images.mkdir()
    rgb = noise_image(40, 48, seed=6)
    transform = Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 4649776.0)  # 0.5 m pixels, UTM 33N
    profile = dict(
        driver="GTiff",
        height=40,
        width=48,
        count=3,
        dtype="uint8",
        crs="EPSG:32633",
        transform=transform,
    )
    with rasterio.open(images / "scene.tif", "w", **profile) as dst:
        dst.write(rgb.transpose(2, 0, 1))
    write_png(images / "plain.png", noise_image(32, 32, seed=7))
    r = predict_folder(
        EnsembleSpec(tiny_ckpts[:1], threshold=0.5), images, tmp_path / "out", progress=False
    )
    assert r.geotiffs == [tmp_path / "out" / "scene.tif"]  # the PNG input gets no GeoTIFF
    with rasterio.open(r.geotiffs[0]) as src:
        assert src.crs.to_epsg() == 32633 and src.transform == transform
        assert src.count == 1 and src.dtypes == ("uint8",)
        tif_mask = src.read(1)
    np.testing.assert_array_equal(tif_mask, read_png(tmp_path / "out" / "scene.png"))


def test_geotiff_no_data_is_no_building_and_no_data_in_the_mask(pointwise_model, tmp_path):
    # A scene's no-data area (its nodata value here; a NaN area of a float scene) is predicted
    # as no building, whatever it looks like, and is no-data in the mask GeoTIFF too.
    rasterio = pytest.importorskip("rasterio")
    from affine import Affine

    ckpt = save_checkpoint(tmp_path / "pw.pt", pointwise_model, 0, **{"aug.crop_size": 32})
    images = tmp_path / "images"
    images.mkdir()
    rgb = np.full((40, 48, 3), 200, np.uint8)  # the pointwise model: red >= 128 is a building
    rgb[:, :10] = 250  # the scene's nodata value (left strip), bright as a roof
    rgb[30:, 20:] = 20  # real, dark ground
    profile = dict(driver="GTiff", height=40, width=48, count=3, dtype="uint8", nodata=250)
    profile.update(crs="EPSG:32633", transform=Affine(0.5, 0, 500000.0, 0, -0.5, 4649776.0))
    with rasterio.open(images / "scene.tif", "w", **profile) as dst:
        dst.write(rgb.transpose(2, 0, 1))
    grey = np.tile(np.linspace(0.0, 1000.0, 24, dtype=np.float32), (24, 1))  # (24, 24) ramp
    grey[:4] = np.nan  # top rows without data
    profile.update(height=24, width=24, count=1, dtype="float32", nodata=None)
    with rasterio.open(images / "float.tif", "w", **profile) as dst:
        dst.write(grey[None])
    r = predict_folder(
        EnsembleSpec([str(ckpt)], threshold=0.5), images, tmp_path / "out", progress=False
    )
    assert r.nodata_pixels == 40 * 10 + 4 * 24
    valid = rgb[..., 0] != 250
    expected = valid & (rgb[..., 0] >= 128)
    np.testing.assert_array_equal(read_png(tmp_path / "out" / "scene.png") == 255, expected)
    with rasterio.open(tmp_path / "out" / "scene.tif") as src:
        np.testing.assert_array_equal(src.read(1), np.where(expected, 255, 0))
        np.testing.assert_array_equal(src.read_masks(1), np.where(valid, 255, 0))
        assert src.mask_flag_enums[0] == [rasterio.enums.MaskFlags.per_dataset]
    assert not list((tmp_path / "out").glob("*.msk"))  # the mask is inside the file
    with rasterio.open(tmp_path / "out" / "float.tif") as src:
        assert (src.read_masks(1)[:4] == 0).all() and (src.read_masks(1)[4:] == 255).all()
        ramp = src.read(1)
    png = read_png(tmp_path / "out" / "float.png")
    assert (ramp[:4] == 0).all() and (png[:4] == 0).all()
    np.testing.assert_array_equal(ramp, png)
    assert (png[4:, -1] == 255).all() and (png[4:, 0] == 0).all()  # the ramp's bright side


def test_geotiffs_placed_by_control_points_or_rpcs_get_georeferenced_masks(
    pointwise_model, tmp_path
):
    # Raw satellite scenes are often placed by ground control points or RPCs alone (no CRS +
    # geotransform): their masks must carry the same, or a GIS cannot place them.
    rasterio = pytest.importorskip("rasterio")
    from rasterio.control import GroundControlPoint
    from rasterio.crs import CRS
    from rasterio.rpc import RPC

    ckpt = save_checkpoint(tmp_path / "pw.pt", pointwise_model, 0, **{"aug.crop_size": 32})
    images = tmp_path / "images"
    images.mkdir()
    h, w = 40, 48
    rgb = noise_image(h, w, seed=12).transpose(2, 0, 1)  # (3, H, W)
    profile = dict(driver="GTiff", height=h, width=w, count=3, dtype="uint8")
    gcps = [
        GroundControlPoint(0, 0, 2.0, 48.0),
        GroundControlPoint(h, 0, 2.0, 47.99),
        GroundControlPoint(0, w, 2.01, 48.0),
    ]
    with rasterio.open(images / "gcp.tif", "w", **profile, gcps=gcps, crs="EPSG:4326") as dst:
        dst.write(rgb)
    rpc = RPC(
        height_off=0, height_scale=100, lat_off=48.0, lat_scale=0.01, long_off=2.0,
        long_scale=0.01, line_off=h / 2, line_scale=h / 2, samp_off=w / 2, samp_scale=w / 2,
        line_num_coeff=[0, 0, -1] + [0] * 17, line_den_coeff=[1] + [0] * 19,
        samp_num_coeff=[0, 1] + [0] * 18, samp_den_coeff=[1] + [0] * 19,
    )  # fmt: skip
    with rasterio.open(images / "rpc.tif", "w", **profile, rpcs=rpc) as dst:
        dst.write(rgb)

    out = tmp_path / "out"
    r = predict_folder(EnsembleSpec([str(ckpt)]), images, out, progress=False)
    assert r.geotiffs == [out / "gcp.tif", out / "rpc.tif"]
    with rasterio.open(out / "gcp.tif") as src:
        points, crs = src.gcps
        assert crs == CRS.from_epsg(4326)
        assert [(p.row, p.col, p.x, p.y) for p in points] == [
            (p.row, p.col, p.x, p.y) for p in gcps
        ]
        np.testing.assert_array_equal(src.read(1), read_png(out / "gcp.png"))
    with rasterio.open(images / "rpc.tif") as src:
        scene_rpcs = src.rpcs.to_dict()  # as GDAL stored them (with its error fields)
    with rasterio.open(out / "rpc.tif") as src:
        assert src.rpcs is not None and src.rpcs.to_dict() == scene_rpcs
        np.testing.assert_array_equal(src.read(1), read_png(out / "rpc.png"))


def _dice(p: np.ndarray, g: np.ndarray) -> float:
    return (2 * (p & g).sum() + 1e-7) / (p.sum() + g.sum() + 1e-7)


def test_masks_are_scored_like_the_competition(pointwise_model, tmp_path):
    ckpt = save_checkpoint(tmp_path / "pw.pt", pointwise_model, 0, **{"aug.crop_size": 32})
    images, masks = tmp_path / "images", tmp_path / "masks"
    # predictions are red >= 128: a ramp, an all-empty image and an all-building image
    ramp = np.zeros((40, 60, 3), np.uint8)
    ramp[..., 0] = np.linspace(0, 255, 60).astype(np.uint8)[None, :]
    empty = np.zeros((32, 32, 3), np.uint8)
    full = np.full((50, 36, 3), 200, np.uint8)
    truth = {
        "ramp": np.zeros((40, 60), bool),
        "empty": np.zeros((32, 32), bool),  # empty/empty: left out of the official mean
        "full": np.zeros((50, 36), bool),
    }
    truth["ramp"][5:30, 20:50] = True
    truth["full"][:25] = True
    write_png(images / "ramp.png", ramp)
    write_png(images / "empty.png", empty)
    write_png(images / "sub" / "full.png", full)
    # mask names as the folder reader matches them: {stem}.png, {stem}_mask.png, mirrored
    (masks / "sub").mkdir(parents=True)
    cv2.imwrite(str(masks / "ramp.png"), truth["ramp"].astype(np.uint8) * 255)
    cv2.imwrite(str(masks / "empty_mask.png"), truth["empty"].astype(np.uint8) * 255)
    cv2.imwrite(str(masks / "sub" / "full.png"), truth["full"].astype(np.uint8))  # a 0/1 mask

    r = predict_folder(
        EnsembleSpec([str(ckpt)], threshold=0.5),
        images,
        tmp_path / "out",
        masks_dir=masks,
        progress=False,
    )
    pred = {p.stem: read_png(p) == 255 for p in r.masks}
    np.testing.assert_array_equal(pred["ramp"], ramp[..., 0] >= 128)
    assert not pred["empty"].any() and pred["full"].all()
    dice = {k: _dice(pred[k], truth[k]) for k in ("ramp", "full")}
    inter = sum(int((pred[k] & truth[k]).sum()) for k in truth)
    p_sum = sum(int(pred[k].sum()) for k in truth)
    g_sum = sum(int(truth[k].sum()) for k in truth)
    s = r.scores
    assert s["official_score"] == pytest.approx((dice["ramp"] + dice["full"]) / 2, abs=1e-12)
    assert s["pixel_iou"] == pytest.approx(inter / (p_sum + g_sum - inter), abs=1e-12)
    assert s["pixel_f1"] == pytest.approx(2 * inter / (p_sum + g_sum), abs=1e-12)
    assert s["n_images"] == 3 and s["n_scored"] == 2
    # the official score equals the metric module's on the same masks
    assert s["official_score"] == pytest.approx(
        np.nanmean([metrics.dice_per_image(pred[k][None], truth[k][None])[0] for k in truth])
    )
    saved = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert saved["official_score"] == s["official_score"]
    by_image = {row["image"]: row for row in saved["per_image"]}
    assert by_image["empty.png"]["dice"] is None
    assert by_image[str(Path("sub") / "full.png")]["dice"] == pytest.approx(dice["full"])


def test_missing_mask_names_image_and_names_tried(pointwise_model, tmp_path):
    ckpt = save_checkpoint(tmp_path / "pw.pt", pointwise_model, 0, **{"aug.crop_size": 32})
    write_png(tmp_path / "images" / "lonely.png", noise_image(32, 32, seed=8))
    (tmp_path / "masks").mkdir()
    with pytest.raises(FileNotFoundError, match=r"lonely\.png.*tried lonely\.png, lonely\.tif"):
        predict_folder(
            EnsembleSpec([str(ckpt)]),
            tmp_path / "images",
            tmp_path / "out",
            masks_dir=tmp_path / "masks",
            progress=False,
        )


def test_errors_name_the_flag_or_the_file(pointwise_model, tmp_path):
    ckpt = save_checkpoint(tmp_path / "pw.pt", pointwise_model, 0, **{"aug.crop_size": 32})
    spec = EnsembleSpec([str(ckpt)])
    images = tmp_path / "images"
    write_png(images / "good.png", noise_image(32, 32, seed=9))
    for kw, flag in (
        ({"window": 16}, "--window"),
        ({"overlap": 0.95}, "--overlap"),
        ({"overlap": -0.1}, "--overlap"),
        ({"overlap": float("nan")}, "--overlap"),
    ):
        with pytest.raises(ValueError, match=flag):
            predict_folder(spec, images, tmp_path / "out", progress=False, **kw)
    with pytest.raises(ValueError, match="--window"):
        predict_image(Pointwise(), noise_image(40, 40, 0), window=31)
    with pytest.raises(ValueError, match="inside the image folder"):
        predict_folder(spec, images, images / "masks", progress=False)
    small = save_checkpoint(tmp_path / "small.pt", pointwise_model, 0, **{"aug.crop_size": 16})
    with pytest.raises(ValueError, match=r"validation tile of .*small\.pt = 16"):
        predict_folder(EnsembleSpec([str(small)]), images, tmp_path / "out", progress=False)

    (images / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ValueError, match=r"bad\.png: cannot decode"):
        predict_folder(spec, images, tmp_path / "out", progress=False)
    (images / "bad.png").unlink()
    (tmp_path / "masks").mkdir()
    cv2.imwrite(str(tmp_path / "masks" / "good.png"), np.zeros((32, 30), np.uint8))
    with pytest.raises(ValueError, match=r"masks/good\.png is 32x30 but the image .*good\.png"):
        predict_folder(spec, images, tmp_path / "out", masks_dir=tmp_path / "masks", progress=False)


# --------------------------------------------------------------------------------------------
# The entry script
# --------------------------------------------------------------------------------------------


def run_script(monkeypatch, capsys, *argv: str) -> tuple[int, str]:
    """experiments/predict.py in this process: (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["predict.py", *argv])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(REPO / "experiments" / "predict.py"), run_name="__main__")
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--window", "16"], "--window = 16"),
        (["--overlap", "0.95"], "--overlap 0.95"),
        (["--out", "masks.csv"], "--out masks.csv: with --images, --out is a folder"),
        (["--tile-size", "64"], "--tile-size"),
        (["--truth", "t.csv"], "--truth"),
    ],
)
def test_cli_refuses_bad_flags(monkeypatch, capsys, tmp_path, flags, message):
    argv = ["--checkpoint", "x.pt", "--images", str(tmp_path), "--out", str(tmp_path / "o")]
    code, err = run_script(monkeypatch, capsys, *argv, *flags)
    assert code == 2 and message in err, err


def test_cli_folder_flags_need_images(monkeypatch, capsys):
    code, err = run_script(monkeypatch, capsys, "--checkpoint", "x.pt", "--masks", "m")
    assert code == 2 and "--masks applies to folder prediction" in err


def test_cli_predicts_a_folder(tiny_ckpts, tmp_path):
    images, masks, out = tmp_path / "images", tmp_path / "masks", tmp_path / "out"
    write_png(images / "a.png", noise_image(32, 32, seed=10))
    write_png(images / "sub" / "b.png", noise_image(45, 70, seed=11))
    (masks / "sub").mkdir(parents=True)
    cv2.imwrite(str(masks / "a_mask.png"), np.full((32, 32), 255, np.uint8))
    cv2.imwrite(str(masks / "sub" / "b_mask.png"), np.full((45, 70), 255, np.uint8))
    proc = subprocess.run(
        [
            sys.executable, str(REPO / "experiments" / "predict.py"),
            "--checkpoint", tiny_ckpts[0], "--images", str(images), "--out", str(out),
            "--masks", str(masks), "--mask-pattern", "{stem}_mask.png",
            "--overlap", "0.5", "--threshold", "0", "--device", "cpu",
        ],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "wrote 2 mask(s)" in proc.stdout
    # threshold 0: everything is a building, and every truth pixel is one
    assert "official score (mean Dice over 2 of 2 images): 1.00000" in proc.stdout
    assert read_png(out / "sub" / "b.png").shape == (45, 70)
    assert (read_png(out / "a.png") == 255).all()
    assert json.loads((out / "scores.json").read_text())["pixel_iou"] == 1.0


def test_dotted_names_keep_one_mask_each(pointwise_model, tmp_path):
    # Only the last suffix is the format: "scene.2019.png" and "scene.2020.png" are two scenes.
    ckpt = save_checkpoint(tmp_path / "pw.pt", pointwise_model, 0, **{"aug.crop_size": 32})
    images = tmp_path / "images"
    first = write_png(images / "scene.2019.png", noise_image(32, 32, seed=1))
    second = write_png(images / "scene.2020.png", noise_image(32, 32, seed=2))
    r = predict_folder(EnsembleSpec([str(ckpt)]), images, tmp_path / "out", progress=False)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.png")) == ["scene.2019.png", "scene.2020.png"]
    assert r.masks == [out / "scene.2019.png", out / "scene.2020.png"]
    for image, mask in ((first, r.masks[0]), (second, r.masks[1])):
        red = cv2.imread(str(image))[..., 2]
        np.testing.assert_array_equal(read_png(mask) == 255, red >= 128)


def test_rerun_into_the_same_folder_removes_its_own_stale_outputs(pointwise_model, tmp_path):
    ckpt = save_checkpoint(tmp_path / "pw.pt", pointwise_model, 0, **{"aug.crop_size": 32})
    spec = EnsembleSpec([str(ckpt)])
    images, masks, out = tmp_path / "images", tmp_path / "masks", tmp_path / "out"
    for name in ("a", "sub/b"):
        write_png(images / f"{name}.png", noise_image(32, 32, seed=len(name)))
        (masks / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(masks / f"{name}.png"), np.zeros((32, 32), np.uint8))
    predict_folder(spec, images, out, masks_dir=masks, progress=False)
    assert (out / "scores.json").is_file() and (out / "sub" / "b.png").is_file()
    (out / "notes.txt").write_text("the user's own file")
    # b is gone and this run is not scored: its mask and the earlier scores would tell
    # another run's story beside the new masks
    (images / "sub" / "b.png").unlink()
    r = predict_folder(spec, images, out, progress=False)
    assert r.masks == [out / "a.png"]
    left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert left == sorted([OUTPUTS_FILE, "a.png", "notes.txt"])  # the user's file is kept
    assert json.loads((out / OUTPUTS_FILE).read_text()) == {
        "runs": [
            {
                "images": str(images.resolve()),
                "recursive": True,
                "files": ["a.png"],
                "complete": True,
            }
        ]
    }


def test_parts_of_a_job_in_one_folder_keep_each_others_masks(pointwise_model, tmp_path):
    # A big job split by image folder into one --out: each part keeps the others' masks, and a
    # rerun of one part cleans up only its own stale outputs.
    ckpt = save_checkpoint(tmp_path / "pw.pt", pointwise_model, 0, **{"aug.crop_size": 32})
    spec = EnsembleSpec([str(ckpt)])
    out = tmp_path / "out"
    for name in ("cityA/a1", "cityA/sub/a2", "cityB/b1", "cityC/a1"):
        write_png(tmp_path / f"{name}.png", noise_image(32, 32, seed=len(name)))

    def outputs() -> list[str]:
        return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())

    def record() -> dict[str, list[str]]:
        runs = json.loads((out / OUTPUTS_FILE).read_text())["runs"]
        return {Path(r["images"]).name: r["files"] for r in runs}

    predict_folder(spec, tmp_path / "cityA", out, progress=False)
    predict_folder(spec, tmp_path / "cityB", out, progress=False)
    assert outputs() == [OUTPUTS_FILE, "a1.png", "b1.png", "sub/a2.png"]
    assert record() == {"cityA": ["a1.png", "sub/a2.png"], "cityB": ["b1.png"]}

    # cityA without its sub-folders: the masks below them stay (their images are not gone)
    predict_folder(spec, tmp_path / "cityA", out, recursive=False, progress=False)
    assert outputs() == [OUTPUTS_FILE, "a1.png", "b1.png", "sub/a2.png"]
    # cityA again after a2 was removed: only cityA's stale mask goes
    (tmp_path / "cityA" / "sub" / "a2.png").unlink()
    predict_folder(spec, tmp_path / "cityA", out, progress=False)
    assert outputs() == [OUTPUTS_FILE, "a1.png", "b1.png"]
    assert record() == {"cityB": ["b1.png"], "cityA": ["a1.png"]}

    # cityC's a1 would overwrite cityA's: refused, naming both, before anything is written
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"holds a1\.png, predicted from the image folder .*cityA"):
        predict_folder(spec, tmp_path / "cityC", out, progress=False)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_files_the_record_does_not_list_are_never_overwritten(pointwise_model, tmp_path, capsys):
    # Ground-truth masks copied into --out share the images' names: predicting into that folder
    # overwrote them (exit 0), although the record said such files are never touched.
    ckpt = save_checkpoint(tmp_path / "pw.pt", pointwise_model, 0, **{"aug.crop_size": 32})
    spec = EnsembleSpec([str(ckpt)])
    images, out = tmp_path / "images", tmp_path / "out"
    names = ("a", "b", "c", "d", "sub/e")
    for name in names:
        write_png(images / f"{name}.png", noise_image(32, 32, seed=len(name)))
    for name in names[:2]:  # the user's own files, named like two masks; and one of another name
        out.mkdir(exist_ok=True)
        cv2.imwrite(str(out / f"{name}.png"), np.full((32, 32), 7, np.uint8))
    (out / "README.txt").write_text("ground truth, do not edit")

    def files() -> dict[str, bytes]:
        return {
            p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()
        }

    before = files()
    with pytest.raises(ValueError) as err:
        predict_folder(spec, images, out, progress=False)
    message = str(err.value)
    assert "holds 2 file(s)" in message and "a.png, b.png." in message, message
    assert "another --out" in message and "delete those files" in message, message
    assert files() == before  # nothing written, not even the record

    # first few and a count; through the command, one error line naming the folder
    for name in ("c", "d", "sub/e"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(out / f"{name}.png"), np.full((32, 32), 7, np.uint8))
    before = files()
    argv = ["--checkpoint", str(ckpt), "--images", str(images), "--out", str(out)]
    assert predict_main(*argv) == 1
    err_text = capsys.readouterr().err
    assert f"--out {out} holds 5 file(s)" in err_text and "a.png, b.png, c.png and 2 more" in (
        err_text
    ), err_text
    assert files() == before

    # once they are gone, the folder is this tool's: predicted, the user's README kept, and a
    # rerun rewrites its own masks
    for name in names:
        (out / f"{name}.png").unlink()
    predict_folder(spec, images, out, progress=False)
    predict_folder(spec, images, out, progress=False)
    assert sorted(files()) == sorted([OUTPUTS_FILE, "README.txt", *(f"{n}.png" for n in names)])


def test_cli_reads_label_masks_with_the_mask_flags(pointwise_model, tmp_path, capsys):
    # Class-id masks (0 background, 1 road, 2 building) need --mask-values, as for training;
    # without it the run stops before writing a single file.
    ckpt = save_checkpoint(tmp_path / "pw.pt", pointwise_model, 0, **{"aug.crop_size": 32})
    images, masks, out = tmp_path / "images", tmp_path / "masks", tmp_path / "out"
    for name in ("a", "b"):
        img = np.zeros((32, 32, 3), np.uint8)
        img[:, 16:, 0] = 255  # predicted: the right half
        write_png(images / f"{name}.png", img)
        label = np.zeros((32, 32), np.uint8)
        label[:, :8] = 1
        label[:, 16:] = 2  # the buildings: exactly the prediction
        masks.mkdir(exist_ok=True)
        cv2.imwrite(str(masks / f"{name}.png"), label)
    argv = ["--checkpoint", str(ckpt), "--images", str(images), "--masks", str(masks)]

    assert predict_main(*argv, "--out", str(out)) == 1
    err = capsys.readouterr().err
    assert "a.png: this looks like a label mask" in err and "--mask-values" in err
    assert not out.exists() or not any(out.iterdir())  # neither masks nor a record

    assert predict_main(*argv, "--out", str(out), "--mask-values", "2") == 0
    assert "official score (mean Dice over 2 of 2 images): 1.00000" in capsys.readouterr().out
    assert predict_main(*argv, "--out", str(out), "--mask-nonzero") == 0  # 1 and 2 are buildings
    assert json.loads((out / "scores.json").read_text())["pixel_iou"] == pytest.approx(2 / 3)

    for flags, message in (
        (["--mask-values", "2", "--mask-nonzero"], "give --mask-values or --mask-nonzero"),
        (["--mask-threshold", "1.5"], "--mask-threshold 1.5: a fraction of the range"),
    ):
        with pytest.raises(SystemExit) as e:
            predict_main(*argv, "--out", str(out), *flags)
        assert e.value.code == 2 and message in capsys.readouterr().err, flags
    with pytest.raises(SystemExit) as e:
        predict_main("--checkpoint", str(ckpt), "--images", str(images), "--out", str(out),
                     "--mask-colors", "0,0,255")  # fmt: skip
    assert e.value.code == 2
    assert "--mask-colors says how to find or read ground-truth masks: pass --masks" in (
        capsys.readouterr().err
    )


def test_cli_scores_a_truth_csv_without_sizes(tiny_ckpts, small_world, tmp_path, capsys):
    # The competition's truth has only img_id,mask_rle: the tiles' own shape scores it.
    from bldseg.commands import predict as predict_cmd

    truth = tmp_path / "truth.csv"
    pd.read_csv(small_world.test_truth_csv)[["img_id", "mask_rle"]].to_csv(truth, index=False)
    out = tmp_path / "sub.csv"
    argv = ["--data", str(small_world.root), "--out", str(out), "--device", "cpu"]
    assert predict_cmd.main(["--checkpoint", tiny_ckpts[0], *argv, "--truth", str(truth)]) == 0
    printed = capsys.readouterr().out
    expected = metrics.score_csv(small_world.test_truth_csv, out)  # the truth with its sizes
    assert f"official score vs {truth}: {expected:.5f}" in printed, printed
    # with its interval over the test tiles' source scenes (test.csv's group), as the
    # pipeline reports its submission: it printed a bare score
    from bldseg import stats

    tiles = pd.read_csv(small_world.root / "test.csv", dtype=str)
    per_image = metrics.score_csv_per_image(small_world.test_truth_csv, out)
    scene = dict(zip(tiles["img_id"], tiles["group"], strict=True))
    iv = stats.bootstrap_mean(per_image["dice"], [scene[i] for i in per_image["img_id"]])
    assert 1 < iv.clusters < iv.n, iv  # scenes, not tiles, are resampled
    assert (
        f"{expected:.5f} {stats.format_bounds(iv)} (95% interval over {iv.clusters} source "
        f"images; {iv.n} of {len(tiles)} images scored"
    ) in printed, printed
    # one image scored (nothing predicted at threshold 1, one truth mask not empty): a single
    # scene gives no interval, and the line does not claim one
    one = pd.read_csv(small_world.test_truth_csv, dtype=str)[["img_id", "mask_rle"]]
    one.loc[one["mask_rle"] != "-1", "mask_rle"] = "-1"
    one.loc[0, "mask_rle"] = "1 5"
    one.to_csv(tmp_path / "one.csv", index=False)
    argv_one = [*argv, "--truth", str(tmp_path / "one.csv"), "--threshold", "1.0"]
    assert predict_cmd.main(["--checkpoint", tiny_ckpts[0], *argv_one]) == 0
    printed = capsys.readouterr().out
    assert (
        f"official score vs {tmp_path / 'one.csv'}: 0.00000 (one source image; 1 of "
        f"{len(tiles)} images scored, those empty in both left out)"
    ) in printed, printed
    # a truth CSV of other tiles in part fails with one line naming it, before anything is
    # predicted (it failed in the scoring, after the whole split), the submission kept
    other = tmp_path / "other.csv"
    first = pd.read_csv(small_world.test_truth_csv, dtype=str)["img_id"].iloc[0]
    other.write_text(f"img_id,mask_rle\n{first},-1\nnot_a_tile,1 2\n")
    before = out.stat().st_mtime_ns
    assert predict_cmd.main(["--checkpoint", tiny_ckpts[0], *argv, "--truth", str(other)]) == 1
    err = capsys.readouterr().err
    last = err.splitlines()[-1]
    assert last.startswith(f"error: --truth {other} does not match the test split"), err
    assert f"{len(tiles) - 1} of the {len(tiles)} test images have no row in it" in last
    assert "1 of its rows names no test image (e.g. ['not_a_tile'])" in last
    assert "predicting" not in err and "Traceback" not in err
    assert out.stat().st_mtime_ns == before
    # a truth row twice: refused before anything is predicted too
    twice = tmp_path / "twice.csv"
    rows = pd.read_csv(small_world.test_truth_csv, dtype=str)[["img_id", "mask_rle"]]
    pd.concat([rows, rows.iloc[:1]]).to_csv(twice, index=False)
    assert predict_cmd.main(["--checkpoint", tiny_ckpts[0], *argv, "--truth", str(twice)]) == 1
    err = capsys.readouterr().err
    assert f"has img_id '{first}' in more than one row" in err and "predicting" not in err


def _no_prediction(*args, **kwargs):
    raise AssertionError("the test split was predicted")


def test_cli_refuses_a_truth_it_cannot_score_before_predicting(tmp_path, capsys):
    # --truth was first read after the whole test split was predicted (and the submission
    # overwritten): a folder ended in a pandas traceback, a missing file in a late error
    folder = tmp_path / "world"
    folder.mkdir()
    (folder / "test_truth.csv").write_text("img_id,mask_rle\nA,-1\n")
    (tmp_path / "no_rle.csv").write_text("img_id,img_path\nA,a.png\n")
    (tmp_path / "empty.csv").write_text("")
    for truth, message in (
        (folder, f"--truth {folder} is a folder; pass the truth CSV (img_id,mask_rle), e.g. "
         f"{folder / 'test_truth.csv'}"),
        (tmp_path / "missing.csv", f"--truth {tmp_path / 'missing.csv'}: no such file"),
        (tmp_path / "no_rle.csv", f"--truth {tmp_path / 'no_rle.csv'} has no mask_rle column "
         "(its columns: img_id, img_path)"),
        (tmp_path / "empty.csv", f"--truth {tmp_path / 'empty.csv'}: cannot read it as a CSV"),
    ):  # fmt: skip
        with pytest.raises(SystemExit) as e:  # parsing the flags: "x.pt" is never opened
            predict_main("--checkpoint", "x.pt", "--truth", str(truth))
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and "Traceback" not in err, err


def test_cli_refuses_another_splits_truth_before_predicting(
    tiny_ckpts, tmp_path, capsys, monkeypatch
):
    # the truth of other images (train.csv) was scored after predicting, advising to "write
    # '-1' for images with no building" as if the submission had left them out
    import bldseg.commands.predict as predict_cmd

    comp = tmp_path / "comp"
    write_test_split(comp)
    train = comp / "train.csv"
    train.write_text("img_id,img_path,mask_rle\nTR0,train/a.png,1 2\nTR1,train/b.png,-1\n")
    sub = tmp_path / "sub.csv"
    sub.write_text("earlier\n")
    monkeypatch.setattr(predict_cmd, "predict_cache", _no_prediction)
    argv = ["--checkpoint", tiny_ckpts[0], "--data", str(comp / "test.csv"), "--out", str(sub)]
    code = predict_main(*argv, "--data-root", str(tmp_path / "root"), "--truth", str(train))
    err = capsys.readouterr().err
    assert code == 1, err
    assert (
        f"error: --truth {train} is the ground truth of other images: none of its 2 img_id(s) "
        f"(e.g. ['TR0', 'TR1']) is among the 3 test image(s) of {comp / 'test.csv'} (e.g. "
        "['T0', 'T1', 'T2']); is it another split's truth?"
    ) in err, err
    assert "write '-1'" not in err and sub.read_text() == "earlier\n"


def test_cli_names_a_file_that_is_no_checkpoint(tmp_path, capsys):
    # read memory-mapped, a text file or an empty one passed on torch's advice to re-save it
    # "with _use_new_zipfile_serialization=True"
    text, empty = tmp_path / "text.pt", tmp_path / "empty.pt"
    text.write_text("hello\n")
    empty.touch()
    for path, message in (
        (text, f"{text} is not a readable PyTorch checkpoint"),
        (empty, f"{empty} is not a readable PyTorch checkpoint: the file is empty"),
    ):
        assert predict_main("--checkpoint", str(path), "--out", str(tmp_path / "s.csv")) == 1
        err = capsys.readouterr().err
        assert message in err and "mmap" not in err and "zipfile" not in err, err


def test_cli_names_best_pt_for_a_last_pt(tmp_path, capsys):
    # last.pt, bldseg's resumable training state, was "not a bldseg checkpoint"
    run = tmp_path / "run"
    run.mkdir()
    last = run / "last.pt"
    torch.save({"config": RunConfig().to_flat(), "models": [{}], "optimizers": [{}]}, last)
    argv = ["--checkpoint", str(last), "--out", str(tmp_path / "s.csv")]
    assert predict_main(*argv) == 1
    err = capsys.readouterr().err
    assert f"{last} is bldseg's resumable training state (what running the same bldseg train" in (
        " ".join(err.split())
    ), err
    assert "the run's best.pt, which" in err and f"{run} does not hold" in err, err
    save_checkpoint(run / "best.pt", TINY, 0)
    assert predict_main(*argv) == 1
    assert f"not a model checkpoint; predict with {run / 'best.pt'}, the run's best epoch" in (
        capsys.readouterr().err
    )


def test_an_ensemble_output_folder_names_the_specs_in_it(tiny_ckpts, tmp_path):
    # --ensemble on bldseg ensemble's --out said "ensemble spec not found"
    out = tmp_path / "ens"
    out.mkdir()
    with pytest.raises(ValueError, match=r"holds no spec JSON; pass the spec file .*submit\.json"):
        EnsembleSpec.load(out)
    for name in ("best_single.json", "submit.json", "best_ensemble_vote.json"):
        EnsembleSpec([tiny_ckpts[0]]).save(out / name)
    (out / "summary.json").write_text('{"decision": {}}')
    with pytest.raises(ValueError) as e:
        EnsembleSpec.load(out)
    assert str(e.value) == (
        f"ensemble spec {out} is a folder; pass the spec file in it: {out / 'submit.json'} "
        "(what bldseg ensemble decided to submit); or best_single.json, best_ensemble_vote.json"
    )


def test_cli_checks_every_member_before_predicting(tiny_ckpts, small_world, tmp_path, capsys):
    from bldseg.commands import predict as predict_cmd

    out = tmp_path / "sub.csv"
    typo = tmp_path / "typo.pt"
    argv = ["--data", str(small_world.root), "--out", str(out), "--device", "cpu"]
    assert predict_cmd.main(["--checkpoint", tiny_ckpts[0], "--checkpoint", str(typo), *argv]) == 1
    captured = capsys.readouterr()
    assert captured.err == f"error: checkpoint not found: {typo}\n"
    assert "members" not in captured.err and not out.exists()  # refused before predicting
    # two members without --threshold: says whose threshold the mean uses
    assert (
        predict_cmd.main(["--checkpoint", tiny_ckpts[0], "--checkpoint", tiny_ckpts[1], *argv]) == 0
    )
    printed = capsys.readouterr().out
    assert f"threshold 0.5000 is {tiny_ckpts[0]}'s own validation threshold" in printed, printed
    assert "wrote " in printed and out.is_file()


# --------------------------------------------------------------------------------------------
# A test split -> submission CSV
# --------------------------------------------------------------------------------------------


def write_test_split(root: Path, sizes=((32, 32),) * 3) -> Path:
    """A competition test split (``test.csv`` + PNGs, no train.csv): its CSV."""
    rows = []
    for i, (h, w) in enumerate(sizes):
        write_png(root / "test" / f"t{i}.png", noise_image(h, w, seed=20 + i))
        rows.append((f"T{i}", f"test/t{i}.png"))
    pd.DataFrame(rows, columns=["img_id", "img_path"]).to_csv(root / "test.csv", index=False)
    return root / "test.csv"


def predict_main(*argv: str) -> int:
    from bldseg.commands import predict as predict_cmd

    return predict_cmd.main([*argv, "--device", "cpu"])


def test_cli_reads_only_the_test_split(tiny_ckpts, tmp_path, capsys):
    comp, cache_root = tmp_path / "comp", tmp_path / "data_root"
    test_csv = write_test_split(comp)
    base = ["--checkpoint", tiny_ckpts[0], "--data-root", str(cache_root)]
    # a folder with only test.csv, or the test CSV itself
    for data, out in ((comp, "a.csv"), (test_csv, "b.csv")):
        code = predict_main(*base, "--data", str(data), "--out", str(tmp_path / out))
        assert code == 0, capsys.readouterr().err
    a, b = (pd.read_csv(tmp_path / n, dtype=str) for n in ("a.csv", "b.csv"))
    assert list(a.img_id) == ["T0", "T1", "T2"] and a.equals(b)
    # a train.csv beside it (here with a bad RLE) is neither read nor cached
    (comp / "train.csv").write_text("img_id,img_path,mask_rle\nX,test/t0.png,3 oops\n")
    code = predict_main(*base, "--data", str(comp), "--out", str(tmp_path / "c.csv"))
    assert code == 0, capsys.readouterr().err
    assert pd.read_csv(tmp_path / "c.csv", dtype=str).equals(a)
    assert [p.parent.name for p in cache_root.rglob("manifest.json")] == ["test"]


def test_cli_refuses_test_images_it_cannot_tile(tiny_ckpts, tmp_path, capsys):
    cache_root = tmp_path / "data_root"
    base = ["--checkpoint", tiny_ckpts[0], "--data-root", str(cache_root)]
    out = str(tmp_path / "sub.csv")
    # not square: refused naming the test CSV, before any cache is built
    test_csv = write_test_split(tmp_path / "wide", sizes=[(32, 48)] * 2)
    assert predict_main(*base, "--data", str(tmp_path / "wide"), "--out", out) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {test_csv}: ") and "is 32x48" in err, err
    assert "--images DIR --out masks/" in err and not cache_root.exists()
    # mixed sizes: folder prediction is the way, not --tile-size (which cuts training data)
    mixed_csv = write_test_split(tmp_path / "mixed", sizes=[(32, 32), (48, 48)])
    assert predict_main(*base, "--data", str(tmp_path / "mixed"), "--out", out) == 1
    err = capsys.readouterr().err
    assert f"{mixed_csv} is predicted one image per tile" in err, err
    assert "--images DIR --out masks/" in err and "--tile-size" not in err
    with pytest.raises(SystemExit) as e:
        predict_main(*base, "--data", str(tmp_path / "mixed"), "--tile-size", "32", "--out", out)
    assert e.value.code == 2 and "--tile-size cuts training data" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["1.5", "50", "-0.1", "nan"])
def test_cli_refuses_a_threshold_outside_0_1(value, capsys):
    with pytest.raises(SystemExit) as e:
        predict_main("--checkpoint", "x.pt", "--threshold", value)
    assert e.value.code == 2 and f"--threshold {float(value)}: " in capsys.readouterr().err


def test_cli_refuses_an_out_it_cannot_write(tiny_ckpts, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "a_file").write_text("")
    images = tmp_path / "images"
    write_png(images / "a.png", noise_image(32, 32, seed=0))
    for argv, message in (
        (["--out", str(tmp_path / "taken")], "is a folder; name the CSV"),
        (["--out", str(tmp_path / "a_file" / "sub.csv")], "is a file, not a folder"),
        (["--images", str(images), "--out", str(tmp_path / "a_file")], "is a file; with --images"),
    ):
        with pytest.raises(SystemExit) as e:
            predict_main("--checkpoint", tiny_ckpts[0], *argv)
        assert e.value.code == 2 and message in capsys.readouterr().err, argv


def test_a_failed_write_is_one_error_line_and_leaves_no_temporary_file(
    tiny_ckpts, tmp_path, capsys, monkeypatch
):
    from bldseg.commands import predict as predict_cmd

    taken = tmp_path / "out" / "sub.csv"
    taken.mkdir(parents=True)
    (taken / "x").touch()
    with pytest.raises(OSError):
        write_submission(["a"], np.zeros((1, 4, 4), bool), taken)
    assert sorted(p.name for p in taken.parent.iterdir()) == ["sub.csv"]
    # --out is checked first, so a write can fail only if the disk or the folder changes
    # while predicting: simulated by the folder appearing then
    write_test_split(tmp_path / "comp")
    out = tmp_path / "late" / "sub.csv"

    def predict_then_take_the_name(spec, cache, **kw):
        out.mkdir(parents=True)
        (out / "x").touch()
        return np.zeros((len(cache), 32, 32), bool)

    monkeypatch.setattr(predict_cmd, "predict_cache", predict_then_take_the_name)
    argv = ["--checkpoint", tiny_ckpts[0], "--data", str(tmp_path / "comp"), "--out", str(out)]
    assert predict_main(*argv, "--data-root", str(tmp_path / "data_root")) == 1
    err = capsys.readouterr().err  # after the cache's progress bar
    assert err.splitlines()[-1].startswith(f"error: writing {out}: ") and "Traceback" not in err
    assert sorted(p.name for p in out.parent.iterdir()) == ["sub.csv"]


def test_tta_follows_how_the_members_were_validated(tiny_ckpts, tmp_path, capsys, monkeypatch):
    from bldseg.commands import predict as predict_cmd

    with_tta = str(save_checkpoint(tmp_path / "tta" / "best.pt", TINY, 0, tta=True))
    plain = tiny_ckpts[0]
    write_test_split(tmp_path / "comp", sizes=[(32, 32)])
    used = []

    def spy(spec, cache, **kw):
        used.append(spec.member_ttas())
        return np.zeros((len(cache), 32, 32), bool)

    monkeypatch.setattr(predict_cmd, "predict_cache", spy)

    def run(*argv: str) -> tuple[list[bool], list[str]]:
        """(each member's TTA, the lines of stderr that are not the cache's progress)"""
        data = ["--data", str(tmp_path / "comp"), "--data-root", str(tmp_path / "data_root")]
        assert predict_main(*argv, *data, "--out", str(tmp_path / "sub.csv")) == 0
        err = capsys.readouterr().err.splitlines()
        return used.pop(), [line for line in err if line and not line.startswith("caching")]

    # no choice given: as the threshold was chosen
    assert run("--checkpoint", with_tta) == ([True], [])
    assert run("--checkpoint", plain) == ([False], [])
    # an explicit choice against it is warned about in one line, unless the threshold is the
    # user's own
    tta, err = run("--checkpoint", with_tta, "--no-tta")
    assert tta == [False] and len(err) == 1, err
    assert err[0].startswith("warning: predicting without TTA (--no-tta)") and with_tta in err[0]
    assert run("--checkpoint", plain, "--tta", "--threshold", "0.4") == ([True], [])
    # members that disagree: each as it was validated (all without TTA, with a warning, was
    # what the search had not scored)
    assert run("--checkpoint", with_tta, "--checkpoint", plain) == ([True, False], [])
    # --tta / --no-tta set every member; the members validated otherwise are named
    tta, err = run("--checkpoint", with_tta, "--checkpoint", plain, "--tta")
    assert tta == [True, True] and len(err) == 1, err
    assert err[0].startswith("warning: predicting with TTA (--tta)") and f"({plain})" in err[0]
    # an ensemble spec's own "tta", warned about when its members were validated otherwise
    spec = tmp_path / "spec.json"
    EnsembleSpec([with_tta], threshold=0.5).save(spec)
    tta, err = run("--ensemble", str(spec))
    assert tta == [False] and 'predicting without TTA (the spec\'s "tta": false)' in err[0], err
    assert "(or pass --tta)" in err[0]
    assert run("--ensemble", str(spec), "--tta") == ([True], [])
    # a spec recording each member's flag predicts each with its own, without a word
    EnsembleSpec([with_tta, plain], threshold=0.5, member_tta=[True, False]).save(spec)
    assert run("--ensemble", str(spec)) == ([True, False], [])
    # an older spec of a mixed ensemble (one "tta" for all) names the member to set
    EnsembleSpec([with_tta, plain], threshold=0.5).save(spec)
    tta, err = run("--ensemble", str(spec))
    assert tta == [False, False] and len(err) == 1, err
    assert f'({with_tta}); set "tta": true on its member entry in {spec}' in err[0], err
    assert "--tta" not in err[0]  # it would run the other member with TTA: not what was scored


# --------------------------------------------------------------------------------------------
# Ensemble spec files
# --------------------------------------------------------------------------------------------


def _spec(tmp_path: Path, text: str | dict) -> Path:
    path = tmp_path / "spec.json"
    path.write_text(text if isinstance(text, str) else json.dumps(text))
    return path


def test_spec_errors_name_the_file_and_the_field(tiny_ckpts, tmp_path):
    ck = {"checkpoint": tiny_ckpts[0]}
    own = [{**ck, "threshold": 0.5}, {**ck, "threshold": 1.2}]  # members' own thresholds
    for text, message in (
        ('{"members": [],}', "not a valid JSON ensemble spec"),
        ({"members": [ck, {**ck, "weight": "x"}]}, "member 1's 'weight' must be a number, got 'x'"),
        ({"members": [ck], "min_area": "big"}, "'min_area' must be a whole number"),
        ({"members": own, "rule": "vote", "votes": 1.5}, "'votes' must be a whole number, got 1.5"),
        ({"members": [ck, {"checkpoint": None}]}, "member 1's 'checkpoint' must be a path"),
        ({"members": [{**ck, "weight": float("inf")}, ck]}, "weights must be positive and finite"),
        ({"members": [ck], "tta": "yes"}, "'tta' must be true or false"),
        ({"members": [ck, {**ck, "tta": 1}]}, "member 1's 'tta' must be true or false, got 1"),
        ({"members": [ck], "threshold": 1.7}, r"threshold must lie in \[0, 1\], got 1.7"),
        ({"members": [ck], "threshold": float("nan")}, r"threshold must lie in \[0, 1\]"),
        (
            {"members": own, "rule": "vote", "votes": 1},
            r"member 1's threshold must lie in \[0, 1\], got 1.2",
        ),
    ):
        path = _spec(tmp_path, text)
        with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: {message}"):
            EnsembleSpec.load(path)


def test_spec_records_each_members_tta(tiny_ckpts, tmp_path):
    # one "tta" for the whole spec ran a member validated with TTA without it (or, with --tta,
    # one validated without it with it): neither is what the search scored
    path = tmp_path / "spec.json"
    spec = EnsembleSpec(tiny_ckpts, threshold=0.4, member_tta=[True, False])
    spec.save(path)
    raw = json.loads(path.read_text())
    assert [m["tta"] for m in raw["members"]] == [True, False] and raw["tta"] is False
    loaded = EnsembleSpec.load(path)
    assert loaded.member_tta == [True, False] and loaded.tta is False
    assert loaded.decision()["tta"] == [True, False]
    # a member without its own flag takes the spec's; a spec without any, the spec's for all
    raw["members"][1].pop("tta")
    raw["tta"] = True
    path.write_text(json.dumps(raw))
    assert EnsembleSpec.load(path).member_ttas() == [True, True]
    old = {"members": [{"checkpoint": c} for c in tiny_ckpts], "tta": True}
    path.write_text(json.dumps(old))
    loaded = EnsembleSpec.load(path)
    assert loaded.member_tta == [] and loaded.member_ttas() == [True, True]
    assert loaded.decision()["tta"] is True
    with pytest.raises(ValueError, match="1 member TTA flags for 2 member"):
        EnsembleSpec(tiny_ckpts, member_tta=[True]).check()


def test_spec_members_resolve_like_checkpoint_flags(tiny_ckpts, tmp_path):
    # a run folder, as --checkpoint takes it
    run = Path(tiny_ckpts[0]).parent
    spec = EnsembleSpec.load(_spec(tmp_path, {"members": [{"checkpoint": str(run)}]}))
    assert spec.checkpoints == [str(Path(tiny_ckpts[0]).resolve())]
    # a K-fold member whose fold 1 was never trained is refused on loading, not after the
    # members before it have run over the whole test set
    kfold = tmp_path / "kfold"
    (kfold / "fold0").mkdir(parents=True)
    (kfold / "fold0" / "best.pt").touch()
    (kfold / "folds.json").write_text(json.dumps({"folds": 2, "config": RunConfig().to_flat()}))
    path = _spec(tmp_path, {"members": [{"checkpoint": tiny_ckpts[0]}, {"checkpoint": "kfold"}]})
    with pytest.raises(FileNotFoundError, match=f"^{re.escape(str(path))}: member 1: .*fold 1 "):
        EnsembleSpec.load(path)


def test_cli_refuses_an_out_that_overwrites_its_inputs(tmp_path, capsys):
    # --out on the masks scored against wrote over them and reported a perfect score; on the
    # dataset's test.csv it replaced the CSV the next run needs
    data = tmp_path / "comp"
    data.mkdir()
    for n in ("train.csv", "test.csv"):
        (data / n).write_text("img_id,img_path\n")
    (tmp_path / "truth.csv").write_text("img_id,mask_rle\n")
    images, masks = tmp_path / "images", tmp_path / "masks"
    write_png(images / "a.png", noise_image(32, 32, seed=0))
    masks.mkdir()
    for argv, message in (
        (["--images", str(images), "--masks", str(masks), "--out", str(masks)], "overlaps --masks"),
        (
            ["--images", str(images), "--masks", str(masks), "--out", str(tmp_path)],
            "overlaps --masks",
        ),
        (["--data", str(data), "--out", str(data / "test.csv")], "is --data's test.csv"),
        (
            ["--data", str(data / "test.csv"), "--out", str(data / "test.csv")],
            "is --data's test.csv",
        ),
        (
            [
                "--data",
                str(data),
                "--truth",
                str(tmp_path / "truth.csv"),
                "--out",
                str(tmp_path / "truth.csv"),
            ],
            "is --truth",
        ),
    ):
        with pytest.raises(SystemExit) as e:
            predict_main("--checkpoint", "x.pt", *argv)
        assert e.value.code == 2 and message in capsys.readouterr().err, argv


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch-size", "0"], "--batch-size 0: at least 1"),
        (["--device", "bogus"], "--device bogus: use auto, cpu, cuda or cuda:N"),
        pytest.param(
            ["--device", "cuda"],
            "--device cuda: this torch sees no CUDA GPU",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present"),
        ),
    ],
)
def test_cli_refuses_bad_batch_size_and_device(argv, message, capsys):
    from bldseg.commands import predict as predict_cmd

    with pytest.raises(SystemExit) as e:
        predict_cmd.main(["--checkpoint", "x.pt", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Checks before predicting, the recorded decision, failed writes
# --------------------------------------------------------------------------------------------


def test_a_mask_of_another_size_is_refused_before_anything_is_written(pointwise_model, tmp_path):
    # the size was compared only after the image had been predicted and its mask written, so
    # a wrong mask at the end of a long run was found at its end
    ckpt = save_checkpoint(tmp_path / "pw.pt", pointwise_model, 0, **{"aug.crop_size": 32})
    images, masks, out = tmp_path / "images", tmp_path / "masks", tmp_path / "out"
    for name in ("a", "b"):
        write_png(images / f"{name}.png", noise_image(32, 40, seed=3))
    masks.mkdir()
    cv2.imwrite(str(masks / "a.png"), np.zeros((32, 40), np.uint8))
    cv2.imwrite(str(masks / "b.png"), np.zeros((40, 32), np.uint8))  # transposed
    message = r"mask .*masks/b\.png is 40x32 but the image .*images/b\.png is 32x40"
    with pytest.raises(ValueError, match=message):
        predict_folder(EnsembleSpec([str(ckpt)]), images, out, masks_dir=masks, progress=False)
    assert not out.exists()


def _pointwise_spec(tmp_path: Path, model: str, k: int, **fields) -> EnsembleSpec:
    ckpts = [
        str(save_checkpoint(tmp_path / f"m{i}" / "best.pt", model, i, **{"aug.crop_size": 32}))
        for i in range(k)
    ]
    return EnsembleSpec(ckpts, **fields)


def test_scores_record_the_decision_of_a_vote_ensemble(pointwise_model, tmp_path):
    # scores.json said "threshold": 0.5 (the spec's unused default) for a vote ensemble,
    # whose masks its members' own thresholds decide
    images, masks = tmp_path / "images", tmp_path / "masks"
    ramp = np.zeros((32, 64, 3), np.uint8)
    ramp[..., 0] = np.arange(64, dtype=np.uint8)[None, :] * 4  # red 0..252
    write_png(images / "ramp.png", ramp)
    masks.mkdir()
    cv2.imwrite(str(masks / "ramp.png"), np.zeros((32, 64), np.uint8))
    vote = _pointwise_spec(
        tmp_path, pointwise_model, 2, rule="vote", votes=1, member_thresholds=[0.3, 0.7]
    )
    r = predict_folder(vote, images, tmp_path / "out", masks_dir=masks, progress=False)
    # one vote of two: the lower member threshold decides
    level = metrics.level_from_threshold(0.3)
    np.testing.assert_array_equal(read_png(r.masks[0]) == 255, ramp[..., 0] >= level)
    saved = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert saved["threshold"] is None
    assert saved["decision"] == {
        "rule": "vote",
        "votes": 1,
        "member_thresholds": [0.3, 0.7],
        "min_area": 0,
        "tta": False,
    }
    mean = _pointwise_spec(tmp_path, pointwise_model, 2, threshold=0.4, min_area=3)
    predict_folder(mean, images, tmp_path / "out2", masks_dir=masks, progress=False)
    saved = json.loads((tmp_path / "out2" / "scores.json").read_text())
    assert saved["threshold"] == 0.4
    assert saved["decision"] == {
        "rule": "mean",
        "threshold": 0.4,
        "weights": [1.0, 1.0],
        "min_area": 3,
        "tta": False,
    }


def test_a_negative_min_area_is_refused(tiny_ckpts, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        predict_main("--checkpoint", "x.pt", "--min-area", "-5")
    assert e.value.code == 2
    assert "--min-area -5: a number of pixels, at least 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"min_area must be at least 0 pixels \(0: off\), got -5"):
        EnsembleSpec([tiny_ckpts[0]], min_area=-5).check()
    path = _spec(tmp_path, {"members": [{"checkpoint": tiny_ckpts[0]}], "min_area": -5})
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: min_area must be at least 0"):
        EnsembleSpec.load(path)


@pytest.fixture
def full_disk(monkeypatch):
    """``full_disk(name)``: writing a file whose name holds ``name`` fails halfway, as on a
    full disk (half the text is written, then ENOSPC)."""
    import errno

    write_text = Path.write_text

    def arm(name: str) -> None:
        def half_then_full(self, data, *args, **kw):
            if name not in self.name:
                return write_text(self, data, *args, **kw)
            write_text(self, data[: len(data) // 2], *args, **kw)
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(Path, "write_text", half_then_full)

    return arm


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_a_failed_spec_write_keeps_the_old_spec(tiny_ckpts, tmp_path, full_disk):
    path = tmp_path / "spec.json"
    EnsembleSpec([tiny_ckpts[0]], threshold=0.4).save(path)
    before = path.read_text()
    full_disk("spec.json")
    with pytest.raises(OSError) as err:
        EnsembleSpec([tiny_ckpts[0]], threshold=0.6).save(path)
    assert path.read_text() == before and _files(tmp_path) == ["spec.json"]
    assert str(path) in str(err.value)


def test_a_failed_record_or_scores_write_leaves_no_temporary(pointwise_model, tmp_path, full_disk):
    ckpt = save_checkpoint(tmp_path / "pw.pt", pointwise_model, 0, **{"aug.crop_size": 32})
    spec = EnsembleSpec([str(ckpt)])
    images, masks, out = tmp_path / "images", tmp_path / "masks", tmp_path / "out"
    write_png(images / "a.png", noise_image(32, 32, seed=4))
    masks.mkdir()
    cv2.imwrite(str(masks / "a.png"), np.zeros((32, 32), np.uint8))
    predict_folder(spec, images, out, progress=False)
    record = (out / OUTPUTS_FILE).read_text()
    # the record is rewritten first, claiming this run's files: a failure keeps the old one
    full_disk(OUTPUTS_FILE)
    with pytest.raises(OSError) as err:
        predict_folder(spec, images, out, masks_dir=masks, progress=False)
    assert (out / OUTPUTS_FILE).read_text() == record
    assert _files(out) == sorted([OUTPUTS_FILE, "a.png"])
    assert str(out / OUTPUTS_FILE) in str(err.value)
    # scores.json is written last
    full_disk("scores.json")
    with pytest.raises(OSError) as err:
        predict_folder(spec, images, out, masks_dir=masks, progress=False)
    assert _files(out) == sorted([OUTPUTS_FILE, "a.png"])
    assert str(out / "scores.json") in str(err.value)


def test_mask_flags_help_says_what_training_does():
    # predict --help said --mask-values defaulted to "nonzero", while label masks are refused
    # there as in training (and its --mask-nonzero line said so)
    import argparse

    from bldseg.commands.predict import build_parser
    from bldseg.data.prepare import add_data_arguments

    def helps(parser):
        return {a.dest: a.help for a in parser._actions if a.dest.startswith("mask_")}

    train = argparse.ArgumentParser()
    add_data_arguments(train)
    predict, trained = helps(build_parser()), helps(train)
    for dest in ("mask_values", "mask_nonzero", "mask_colors"):
        assert predict[dest] == f"--masks: {trained[dest]}", dest


# --------------------------------------------------------------------------------------------
# Interrupted folder prediction
# --------------------------------------------------------------------------------------------


@pytest.fixture
def stop_after(monkeypatch):
    """``stop_after(n)``: Ctrl-C arrives as the mask after the first ``n`` is written."""
    import bldseg.predict

    write = bldseg.predict.write_mask_png

    def arm(n: int) -> None:
        written = []

        def write_then_stop(mask, path):
            if len(written) == n:
                raise KeyboardInterrupt
            written.append(path)
            return write(mask, path)

        monkeypatch.setattr(bldseg.predict, "write_mask_png", write_then_stop)

    yield arm
    monkeypatch.setattr(bldseg.predict, "write_mask_png", write)


def _record(out: Path) -> dict[str, bool]:
    runs = json.loads((out / OUTPUTS_FILE).read_text())["runs"]
    return {Path(r["images"]).name: r["complete"] for r in runs}


def test_an_interrupted_folder_prediction_is_recorded_incomplete(
    pointwise_model, tmp_path, stop_after
):
    # Re-predicting with other settings, stopped midway: new masks sat beside the earlier run's,
    # and the record claimed them all as one run's, with nothing marking it unfinished.
    from bldseg.predict import FolderPredictionInterrupted

    images, out = tmp_path / "images", tmp_path / "out"
    for i in range(4):
        write_png(images / f"{i}.png", np.full((32, 32, 3), 100, np.uint8))  # red 0.39
    everything = _pointwise_spec(tmp_path, pointwise_model, 1, threshold=0.2)
    nothing = replace(everything, threshold=0.6)
    predict_folder(everything, images, out, progress=False)
    assert _record(out) == {"images": True}

    stop_after(2)
    with pytest.raises(FolderPredictionInterrupted) as err:
        predict_folder(nothing, images, out, progress=False)
    assert isinstance(err.value, KeyboardInterrupt)
    assert (len(err.value.result.masks), err.value.total) == (2, 4)
    assert [read_png(out / f"{i}.png").max() for i in range(4)] == [0, 0, 255, 255]  # a mix
    assert _record(out) == {"images": False}

    # the next run into the folder says so; once it ends, the record is complete again
    stop_after(4)
    with pytest.warns(UserWarning, match="did not finish") as said:
        predict_folder(nothing, images, out, progress=False)
    assert len(said) == 1 and "this run writes its masks again" in str(said[0].message)
    assert f"{images.resolve()} into it did not finish ({OUTPUTS_FILE} marks" in str(
        said[0].message
    )
    assert [read_png(out / f"{i}.png").max() for i in range(4)] == [0, 0, 0, 0]
    assert _record(out) == {"images": True}


def test_another_parts_unfinished_prediction_is_warned_about(pointwise_model, tmp_path, stop_after):
    spec = _pointwise_spec(tmp_path, pointwise_model, 1)
    out = tmp_path / "out"
    for name in ("cityA/a1", "cityA/a2", "cityB/b1"):
        write_png(tmp_path / f"{name}.png", noise_image(32, 32, seed=len(name)))
    stop_after(1)
    with pytest.raises(KeyboardInterrupt):
        predict_folder(spec, tmp_path / "cityA", out, progress=False)
    stop_after(9)
    with pytest.warns(UserWarning, match="did not finish") as said:
        predict_folder(spec, tmp_path / "cityB", out, progress=False)
    message = str(said[0].message)
    assert f"a prediction of {(tmp_path / 'cityA').resolve()} into it did not finish" in message
    assert message.endswith(f"predict {(tmp_path / 'cityA').resolve()} into it again"), message
    assert _record(out) == {"cityA": False, "cityB": True}


def test_cli_ctrl_c_says_how_many_masks_this_run_wrote(
    pointwise_model, tmp_path, stop_after, capsys
):
    ckpt = save_checkpoint(tmp_path / "pw.pt", pointwise_model, 0, **{"aug.crop_size": 32})
    images, out = tmp_path / "images", tmp_path / "out"
    for i in range(3):
        write_png(images / f"{i}.png", noise_image(32, 32, seed=i))
    from bldseg.commands import predict as predict_cmd

    stop_after(2)
    argv = ["--checkpoint", str(ckpt), "--images", str(images), "--out", str(out)]
    try:
        assert predict_cmd.main([*argv, "--device", "cpu"], prog="bldseg predict") == 130
    except KeyboardInterrupt:  # would end the test session
        pytest.fail("Ctrl-C left bldseg predict as a KeyboardInterrupt traceback")
    err = capsys.readouterr().err
    assert err.endswith(
        f"\nbldseg predict: interrupted; 2 of 3 mask(s) in {out} were written by this run, the "
        f"others are missing or an earlier run's ({OUTPUTS_FILE} there marks the run "
        "incomplete); run the same command again to predict them all\n"
    ), err
    assert "Traceback" not in err


@pytest.mark.parametrize("where", ["predict_cache", "score_submission"])
def test_cli_ctrl_c_says_whether_the_submission_was_written(
    where, tiny_ckpts, tmp_path, monkeypatch, capsys
):
    import bldseg.commands.predict as predict_cmd

    comp = tmp_path / "comp"
    write_test_split(comp)
    truth = tmp_path / "truth.csv"
    pd.DataFrame({"img_id": ["T0", "T1", "T2"], "mask_rle": ["-1"] * 3}).to_csv(truth, index=False)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    if where == "predict_cache":
        monkeypatch.setattr(predict_cmd, "predict_cache", interrupted)
    else:
        monkeypatch.setattr(predict_cmd, "score_submission", interrupted)
    sub = tmp_path / "sub.csv"
    argv = ["--checkpoint", tiny_ckpts[0], "--data", str(comp), "--out", str(sub)]
    argv += ["--data-root", str(tmp_path / "root"), "--truth", str(truth)]
    try:
        code = predict_cmd.main([*argv, "--device", "cpu"], prog="bldseg predict")
    except KeyboardInterrupt:  # would end the test session
        pytest.fail("Ctrl-C left bldseg predict as a KeyboardInterrupt traceback")
    err = capsys.readouterr().err
    assert code == 130 and "Traceback" not in err, err
    said = (
        f"{sub} was not written (an earlier file of that name is as it was); run the same "
        "command again"
        if where == "predict_cache"
        else f"{sub} was written, but not scored; run the same command again to score it"
    )
    assert err.endswith(f"\nbldseg predict: interrupted; {said}\n"), err
    assert sub.is_file() == (where == "score_submission")


def test_min_area_counts_the_pixels_left_after_no_data(pointwise_model, tmp_path):
    # min-area was applied before the scene's no-data area was cleared: a bright no-data strip
    # counted towards it, and the 9 building pixels left of a 400-pixel "prediction" were kept
    rasterio = pytest.importorskip("rasterio")
    from affine import Affine

    ckpt = save_checkpoint(tmp_path / "pw.pt", pointwise_model, 0, **{"aug.crop_size": 32})
    images = tmp_path / "images"
    images.mkdir()
    rgb = np.full((40, 48, 3), 20, np.uint8)  # dark ground: no building
    rgb[:, :10] = 250  # the nodata value (left strip), bright as a roof
    rgb[20:23, 30:33] = 200  # one small roof of 9 pixels
    profile = dict(driver="GTiff", height=40, width=48, count=3, dtype="uint8", nodata=250)
    profile.update(crs="EPSG:32633", transform=Affine(0.5, 0, 500000.0, 0, -0.5, 4649776.0))
    with rasterio.open(images / "scene.tif", "w", **profile) as dst:
        dst.write(rgb.transpose(2, 0, 1))
    for min_area, kept in ((100, 0), (9, 9)):
        spec = EnsembleSpec([str(ckpt)], threshold=0.5, min_area=min_area)
        out = tmp_path / f"out{min_area}"
        r = predict_folder(spec, images, out, progress=False)
        assert (read_png(out / "scene.png") == 255).sum() == kept
        assert r.empty == int(kept == 0)

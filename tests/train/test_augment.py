"""Augmentation pipelines: structure, outputs, image/mask alignment, serialisation, validation."""

import math
import re
from dataclasses import replace

import albumentations as A
import numpy as np
import pytest

from bldseg.train.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MIN_BLUR_SIGMA,
    AugConfig,
    blur_problem,
    blur_sigma_range,
    build_eval_transform,
    build_train_transform,
    serialize,
)

DEFAULT_STEPS = ["RandomScale", "RandomCrop", "VerticalFlip", "HorizontalFlip", "Normalize"]
# Optional steps in pipeline order, with the field that turns each on.
OPTIONAL = [
    ("rotate90_p", "RandomRotate90"),
    ("transpose_p", "Transpose"),
    ("brightness_contrast_p", "RandomBrightnessContrast"),
    ("hsv_p", "HueSaturationValue"),
    ("noise_p", "GaussNoise"),
    ("blur_p", "GaussianBlur"),
]


def _names(t: A.Compose) -> list[str]:
    return [type(x).__name__ for x in t.transforms]


def _coded_image(size: int = 300) -> np.ndarray:
    """uint8 (size, size, 3) whose pixel values encode their (row, col) uniquely."""
    y, x = np.mgrid[:size, :size]
    return np.stack([y % 256, x % 256, (y // 256) * 16 + x // 256], -1).astype(np.uint8)


def _seeded(t: A.Compose, seed: int) -> A.Compose:
    t.set_random_seed(seed)
    return t


def _buildings_tile(seed: int, size: int = 64) -> np.ndarray:
    """uint8 (size, size, 3): sharp-edged rectangles of random colours ("roofs") on a flat
    ground, the edges a blur softens."""
    rng = np.random.default_rng(seed)
    image = np.full((size, size, 3), rng.integers(60, 120, 3), np.uint8)
    for _ in range(6):
        y, x = rng.integers(0, size - 8, 2)
        h, w = rng.integers(6, 20, 2)
        image[y : y + h, x : x + w] = rng.integers(0, 256, 3)
    return image


def test_default_is_reference_pipeline():
    t = build_train_transform(AugConfig())
    assert _names(t) == DEFAULT_STEPS
    scale, crop, vflip, hflip, norm = t.transforms
    assert scale.p == 0.5 and tuple(scale.scale_limit) == pytest.approx((-0.2, 0.2))
    assert (crop.height, crop.width, crop.p) == (224, 224, 1.0)
    assert vflip.p == 0.5 and hflip.p == 0.5
    assert tuple(norm.mean) == pytest.approx(IMAGENET_MEAN)
    assert tuple(norm.std) == pytest.approx(IMAGENET_STD)
    assert norm.max_pixel_value == 255.0


def test_normalize_off_and_eval_transform():
    assert _names(build_train_transform(AugConfig(), normalize=False)) == DEFAULT_STEPS[:-1]
    assert build_eval_transform(normalize=False) is None
    assert _names(build_eval_transform()) == ["Normalize"]


@pytest.mark.parametrize("field, cls", OPTIONAL)
def test_optional_step_only_when_p_positive(field, cls):
    t = build_train_transform(AugConfig(**{field: 0.3}))
    names = _names(t)
    assert names == [*DEFAULT_STEPS[:-1], cls, "Normalize"]
    assert t.transforms[names.index(cls)].p == 0.3
    assert cls not in _names(build_train_transform(AugConfig(**{field: 0.0})))


def test_all_optional_steps_in_order_with_params():
    kw = {field: 0.5 for field, _ in OPTIONAL}
    cfg = AugConfig(
        **kw,
        brightness_limit=0.1,
        contrast_limit=0.3,
        hue_shift=7,
        sat_shift=11,
        val_shift=13,
        noise_std=0.02,
        blur_sigma=2.0,
    )
    t = build_train_transform(cfg)
    assert _names(t) == DEFAULT_STEPS[:-1] + [c for _, c in OPTIONAL] + ["Normalize"]
    steps = {type(x).__name__: x for x in t.transforms}
    bc = steps["RandomBrightnessContrast"]
    assert tuple(bc.brightness_limit) == pytest.approx((-0.1, 0.1))
    assert tuple(bc.contrast_limit) == pytest.approx((-0.3, 0.3))
    hsv = steps["HueSaturationValue"]
    assert tuple(hsv.hue_shift_limit) == (-7, 7)
    assert tuple(hsv.sat_shift_limit) == (-11, 11)
    assert tuple(hsv.val_shift_limit) == (-13, 13)
    assert tuple(steps["GaussNoise"].std_range) == pytest.approx((0.0, 0.02))
    assert tuple(steps["GaussianBlur"].sigma_limit) == pytest.approx((MIN_BLUR_SIGMA, 2.0))


@pytest.mark.parametrize("kw", [dict(scale_p=0.0), dict(scale_limit=0.0)])
def test_scale_off(kw):
    assert _names(build_train_transform(AugConfig(**kw))) == DEFAULT_STEPS[1:]


@pytest.mark.parametrize("flip", ["vflip_p", "hflip_p"])
def test_flip_off(flip):
    cls = {"vflip_p": "VerticalFlip", "hflip_p": "HorizontalFlip"}[flip]
    assert cls not in _names(build_train_transform(AugConfig(**{flip: 0.0})))


@pytest.mark.parametrize("seed", range(4))
def test_output_shapes_and_types(seed):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)
    mask = (rng.random((300, 300)) > 0.5).astype(np.uint8)
    out = _seeded(build_train_transform(AugConfig()), seed)(image=image, mask=mask)
    assert out["image"].shape == (224, 224, 3) and out["image"].dtype == np.float32
    assert out["mask"].shape == (224, 224) and out["mask"].dtype == np.uint8
    assert set(np.unique(out["mask"])) <= {0, 1}
    lo = (0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    hi = (1 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    assert np.all(out["image"] >= lo - 1e-5) and np.all(out["image"] <= hi + 1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_normalised_output_is_a_crop_of_the_input(seed):
    image = _coded_image()
    t = _seeded(build_train_transform(AugConfig(scale_p=0.0, vflip_p=0.0, hflip_p=0.0)), seed)
    out = t(image=image)["image"]
    raw = np.rint((out * IMAGENET_STD + IMAGENET_MEAN) * 255).astype(np.int64)
    y0, x0 = raw[0, 0, 0] + 256 * (raw[0, 0, 2] // 16), raw[0, 0, 1] + 256 * (raw[0, 0, 2] % 16)
    assert 0 <= y0 <= 300 - 224 and 0 <= x0 <= 300 - 224
    np.testing.assert_array_equal(raw, image[y0 : y0 + 224, x0 : x0 + 224])


@pytest.mark.parametrize("seed", range(8))
def test_image_and_mask_stay_aligned(seed):
    cfg = AugConfig(
        crop_size=64, scale_p=0.0, vflip_p=0.5, hflip_p=0.5, rotate90_p=0.5, transpose_p=0.5
    )
    image = np.random.default_rng(seed).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    mask = (image[..., 0] > 127).astype(np.uint8)
    out = _seeded(build_train_transform(cfg, normalize=False), seed)(image=image, mask=mask)
    np.testing.assert_array_equal(out["mask"], (out["image"][..., 0] > 127).astype(np.uint8))


@pytest.mark.parametrize("seed", range(4))
def test_scaled_mask_stays_on_its_image(seed):
    # A rescaled building's mask must cover the same pixels as its linearly resized image:
    # blocks of 32 px, scaled by 0.8-1.2, thresholded image vs mask.
    cfg = AugConfig(crop_size=64, scale_p=1.0, scale_limit=0.2, vflip_p=0.0, hflip_p=0.0)
    y, x = np.mgrid[:160, :160]
    mask = (((y // 32) + (x // 32)) % 2).astype(np.uint8)  # (160, 160) checkerboard of 32 px
    image = np.repeat(mask[..., None] * 255, 3, axis=2)
    out = _seeded(build_train_transform(cfg, normalize=False), seed)(image=image, mask=mask)
    from_image = out["image"][..., 0] >= 128
    assert (from_image != out["mask"].astype(bool)).mean() == 0.0


def test_geometric_steps_do_change_the_tile():
    # With p = 1 the flips and rotations must move pixels (else the alignment test is vacuous).
    image = _coded_image()
    base = AugConfig(crop_size=64, scale_p=0.0, vflip_p=0.0, hflip_p=0.0)
    flipped = AugConfig(crop_size=64, scale_p=0.0, vflip_p=1.0, hflip_p=0.0)
    a = _seeded(build_train_transform(base, normalize=False), 0)(image=image)["image"]
    b = _seeded(build_train_transform(flipped, normalize=False), 0)(image=image)["image"]
    np.testing.assert_array_equal(b, a[::-1])


@pytest.mark.parametrize("kw", [{}, {field: 0.5 for field, _ in OPTIONAL}])
def test_serialize_round_trip(kw):
    t = build_train_transform(AugConfig(**kw))
    d = serialize(t)
    assert isinstance(d, dict)
    rebuilt = A.from_dict(d)
    assert _names(rebuilt) == _names(t)
    assert serialize(rebuilt) == d
    image = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    mask = (image[..., 1] > 100).astype(np.uint8)
    a = _seeded(t, 5)(image=image, mask=mask)
    b = _seeded(rebuilt, 5)(image=image, mask=mask)
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["mask"], b["mask"])


@pytest.mark.parametrize(
    "kw, named",
    [
        (dict(vflip_p=1.5), "vflip_p"),
        (dict(scale_p=-0.1), "scale_p"),
        (dict(blur_p=2.0), "blur_p"),
        (dict(crop_size=4), "crop_size"),
        (dict(scale_limit=1.0), "scale_limit"),
        (dict(brightness_limit=1.5), "brightness_limit"),
        (dict(contrast_limit=-0.1), "contrast_limit"),
        (dict(hue_shift=181), "hue_shift"),
        (dict(sat_shift=-1), "sat_shift"),
        (dict(val_shift=300), "val_shift"),
        (dict(noise_std=0.0), "noise_std"),
        (dict(blur_sigma=0.05), "blur_sigma"),
        (dict(blur_sigma=math.inf), "blur_sigma"),
        (dict(blur_sigma=math.nan), "blur_sigma"),
        (dict(noise_std=math.nan), "noise_std"),
    ],
)
def test_invalid_value_names_parameter(kw, named):
    with pytest.raises(ValueError, match=named):
        AugConfig(**kw)
    with pytest.raises(ValueError, match=named):
        AugConfig.from_dict(kw)


@pytest.mark.parametrize("blur_sigma", [MIN_BLUR_SIGMA, 0.5, 1.0, 1.5])
def test_every_applied_blur_changes_the_tile(blur_sigma):
    # sigma was drawn from [0.1, blur_sigma] and albumentations' kernel of int(3.5 sigma) * 2 + 1
    # was a single pixel below 2/7: with blur_p=1, blur_sigma=0.3 left 186 tiles of 200 as they
    # were, 1.0 45 of them
    cfg = AugConfig(
        crop_size=64, scale_p=0.0, vflip_p=0.0, hflip_p=0.0, blur_p=1.0, blur_sigma=blur_sigma
    )
    for seed in range(50):
        image = _buildings_tile(seed)
        out = _seeded(build_train_transform(cfg, normalize=False), seed)(image=image)["image"]
        assert not np.array_equal(out, image), f"seed {seed}: the blur left the tile unchanged"


def test_a_recorded_blur_below_the_minimum_keeps_the_range_it_trained_with():
    # albumentations sorts (0.4, 0.35) into [0.35, 0.4]: a resumed run recorded with 0.35
    # (drawn from [0.3, 0.35]) would have blurred more strongly than its earlier epochs
    assert blur_sigma_range(1.0) == (MIN_BLUR_SIGMA, 1.0)
    assert blur_sigma_range(0.35) == (0.3, 0.35)  # recorded while 0.3 was the minimum
    assert blur_sigma_range(0.2) == (0.1, 0.2)  # before any minimum (from 0.1)
    cfg = AugConfig(crop_size=64, scale_p=0.0, vflip_p=0.0, hflip_p=0.0, blur_p=1.0)
    blur = build_train_transform(replace(cfg, blur_sigma=0.35), normalize=False).transforms[-1]
    assert tuple(blur.sigma_limit) == pytest.approx((0.3, 0.35))


def test_the_weakest_blur_drawn_softens_edges():
    # every blur draws sigma from [MIN_BLUR_SIGMA, blur_sigma]: at the bottom of that range a
    # roof edge still softens by grey levels one can see (at 0.3: by 1 level, median of tiles)
    blur = A.GaussianBlur(blur_limit=0, sigma_limit=(MIN_BLUR_SIGMA, MIN_BLUR_SIGMA), p=1.0)
    for seed in range(20):
        image = _buildings_tile(seed)
        moved = np.abs(blur(image=image)["image"].astype(int) - image.astype(int)).max()
        assert moved >= 5, f"seed {seed}: the weakest blur moved an edge by {moved} grey levels"


def test_blur_sigma_below_the_smallest_blur_says_what_to_set():
    # a config recorded before the limit (a checkpoint to predict with, a run to resume) loads;
    # blur_problem says why a new run with it is refused (fit, and a search before it starts)
    cfg = AugConfig(blur_sigma=0.2, blur_p=0.5)
    assert re.search(r"blur_sigma=0\.2 .*set aug\.blur_sigma >= 0\.4", blur_problem(cfg))
    # 0.3 draws a 3-tap kernel whose side weights (0.004) move a roof edge by one grey level
    assert "blur_sigma=0.3 is below 0.4" in blur_problem(AugConfig(blur_sigma=0.3, blur_p=0.5))
    assert blur_problem(AugConfig(blur_sigma=0.2, blur_p=0.0)) is None  # unused without blur
    assert blur_problem(AugConfig(blur_sigma=MIN_BLUR_SIGMA, blur_p=1.0)) is None
    with pytest.raises(ValueError, match=r"blur_sigma=inf: must be a finite number"):
        AugConfig(blur_sigma=math.inf)


def test_unknown_key_named():
    with pytest.raises(ValueError, match=r"\['crop_sise'\]"):
        AugConfig.from_dict({"crop_sise": 64})


def test_dict_round_trip():
    cfg = AugConfig(crop_size=96, hsv_p=0.2, noise_std=0.1)
    assert AugConfig.from_dict(cfg.to_dict()) == cfg


def test_window():
    assert AugConfig().window == 280  # ceil(224 / 0.8)
    assert AugConfig(scale_p=0.0).window == 224
    assert AugConfig(crop_size=100, scale_limit=0.5).window == 200
    assert AugConfig(crop_size=64, scale_limit=0.3).window == 92  # ceil(91.43)
    for crop, limit in [(224, 0.2), (64, 0.3), (96, 0.25), (33, 0.1)]:
        w = AugConfig(crop_size=crop, scale_limit=limit).window
        assert w * (1 - limit) >= crop  # the smallest scale still covers the crop
        assert (w - 1) * (1 - limit) < crop  # ... and the window is no larger than needed


@pytest.mark.parametrize(
    "kw, named",
    [
        (dict(crop_size=200.5), "crop_size"),
        (dict(crop_size=True), "crop_size"),
        (dict(hflip_p="0.5"), "hflip_p"),
        (dict(crop_fit="false"), "crop_fit"),
        (dict(hue_shift=10.5), "hue_shift"),
    ],
)
def test_wrong_type_names_parameter(kw, named):
    # a search space suggesting a float crop size failed inside albumentations (naming its
    # height/width), a string probability with a TypeError naming nothing
    with pytest.raises(ValueError, match=f"{named}=.*must be of type"):
        AugConfig.from_dict(kw)


def test_numpy_numbers_accepted():
    cfg = AugConfig(crop_size=np.int64(64), hflip_p=np.float32(0.25))
    assert cfg.crop_size == 64 and build_train_transform(cfg) is not None


@pytest.mark.parametrize("scale_p", [0.0, 1.0])
def test_small_tile_padded_by_reflection(scale_p):
    # a 40-px tile (the window is clipped to it) cropped at 64: the padding mirrors the tile,
    # image and mask alike, as prediction pads a scene; zeros left black borders labelled
    # "no building"
    rng = np.random.default_rng(0)
    image = rng.integers(1, 256, (40, 40, 3), dtype=np.uint8)  # no zero pixel anywhere
    mask = np.ones((40, 40), np.uint8)
    t = _seeded(
        build_train_transform(
            AugConfig(crop_size=64, scale_limit=0.3, scale_p=scale_p), normalize=False
        ),
        0,
    )
    for _ in range(5):
        out = t(image=image, mask=mask)
        assert out["image"].shape == (64, 64, 3)
        assert out["image"].min() > 0
        assert (out["mask"] == 1).all()

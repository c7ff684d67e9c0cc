"""Wrong-ground-truth finder: the ranking and its precision, on masks corrupted by hand.

A "pointwise" model (probability of a pixel = its red value / 255) sees exactly the buildings
painted in red, so every disagreement with a mask is one the test put there.
"""

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from bldseg import metrics
from bldseg.data.cache import DatasetCache, build_cache
from bldseg.data.readers import read_folder_dataset
from bldseg.models import create_model
from bldseg.train.augment import IMAGENET_MEAN, IMAGENET_STD
from bldseg.train.config import RunConfig
from bldseg.train.engine import predict_probs
from bldseg.train.suspects import (
    _whole_images,
    precision_at_k,
    rank_suspects,
    rank_suspects_oof,
    write_suspects,
)

S = 32  # image side
ROOF, GROUND = 200, 30  # red values: 200/255 = 0.78 is a building, 30/255 = 0.12 is not


class Pointwise(nn.Module):
    """Probability of a pixel = its red value / 255 (undoing the ImageNet normalisation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        red = x[:, :1] * IMAGENET_STD[0] + IMAGENET_MEAN[0]  # (B, 1, H, W) in [0, 1]
        return torch.logit(red.double().clamp(1e-9, 1 - 1e-9)).float()


def test_precision_at_k_by_hand():
    ranked = ["a", "b", "c", "d", "e"]
    assert precision_at_k(ranked, {"b", "d"}) == 0.5  # k = 2: a, b
    assert precision_at_k(ranked, {"b", "d"}, k=1) == 0.0
    assert precision_at_k(ranked, {"b", "d"}, k=3) == pytest.approx(1 / 3)
    assert precision_at_k(ranked, {"b", "d"}, k=4) == 0.5
    assert precision_at_k(ranked, {"a", "b"}) == 1.0
    assert precision_at_k(ranked, {"e", "z"}) == 0.0  # k = 2: a, b; z was never ranked
    assert precision_at_k(iter(ranked), {"e"}, k=5) == 0.2  # any sequence, read once
    with pytest.raises(ValueError, match="no noisy images"):
        precision_at_k(ranked, set())


def _square(y: int, x: int, side: int = 16, shape: tuple[int, int] = (S, S)) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[y : y + side, x : x + side] = True
    return m


def _cache(root: Path, cases: dict[str, tuple[np.ndarray, np.ndarray]]) -> DatasetCache:
    """A cache of one image per case: its roofs painted red on grey ground, and its mask."""
    for name, (roofs, mask) in cases.items():
        rgb = np.full((*roofs.shape, 3), 90, np.uint8)
        rgb[..., 0] = np.where(roofs, ROOF, GROUND)
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(exist_ok=True)
        assert cv2.imwrite(str(root / "images" / f"{name}.png"), rgb[..., ::-1])
        assert cv2.imwrite(str(root / "masks" / f"{name}.png"), mask.astype(np.uint8) * 255)
    records = read_folder_dataset(root / "images", root / "masks")
    return build_cache(records, root / "cache", progress=False)


@pytest.fixture
def corrupted(tmp_path: Path):
    """A cache of 7 images: (cache, {img_id: (roofs painted, mask given)})."""
    none = np.zeros((S, S), bool)
    two = _square(0, 0, 8) | _square(20, 20, 12)
    half = _square(4, 4)
    half[:, 12:] = False  # the left half of the square at (4, 4): 16 x 8 px
    cases = {
        "clean_square": (_square(4, 4), _square(4, 4)),
        "clean_two": (two, two),
        "clean_empty": (none, none),
        "missing": (_square(4, 4), none),  # a building left out of the mask
        "phantom": (none, _square(4, 4)),  # a building in the mask that is not there
        "shifted": (_square(4, 4), _square(4, 12)),  # the mask 8 px to the right
        "partial": (_square(4, 4), half),  # half the building traced
    }
    return _cache(tmp_path, cases), cases


def test_masks_corrupted_by_hand_rank_first(corrupted):
    cache, cases = corrupted
    df = rank_suspects(Pointwise(), cache, range(len(cache)), batch_size=3)
    assert sorted(df["img_id"]) == sorted(cases) and len(df) == len(cache)
    # Dice 0 for the missing and the phantom building (the phantom's BCE is the higher: a
    # 0.12 probability where the mask says 1), then 2*128/(256+256) for the shifted mask,
    # 2*128/(256+128) for the half-traced one; the clean masks agree with the model (1.0)
    assert df["img_id"].tolist()[:4] == ["phantom", "missing", "shifted", "partial"]
    dice = dict(zip(df["img_id"], df["dice_vs_model"], strict=True))
    assert dice["phantom"] == pytest.approx(0.0, abs=1e-6)
    assert dice["missing"] == pytest.approx(0.0, abs=1e-6)
    assert dice["shifted"] == pytest.approx(0.5)
    assert dice["partial"] == pytest.approx(2 / 3)
    assert all(dice[k] == 1.0 for k in ("clean_square", "clean_two", "clean_empty"))
    # ranked by the Dice with 64 px added to both sides: (0 + 64) / (256 + 64) for the missing
    # and the phantom building, (256 + 64) / (512 + 64), (256 + 64) / (384 + 64)
    ranked = dict(zip(df["img_id"], df["smoothed_dice"], strict=True))
    assert ranked["phantom"] == ranked["missing"] == pytest.approx(0.2)
    assert ranked["shifted"] == pytest.approx(320 / 576)
    assert ranked["partial"] == pytest.approx(320 / 448)
    assert all(ranked[k] == 1.0 for k in ("clean_square", "clean_two", "clean_empty"))
    assert df["smoothed_dice"].is_monotonic_increasing
    assert precision_at_k(df["img_id"], {"missing", "phantom", "shifted", "partial"}) == 1.0
    # the model's prediction is exactly the painted roofs, the mask pixels the given mask
    for row in df.itertuples():
        roofs, mask = cases[row.img_id]
        assert (row.pred_pixels, row.mask_pixels) == (roofs.sum(), mask.sum()), row.img_id
        assert cache.ids[row.index] == row.img_id
    phantom, missing = (df.loc[df["img_id"] == k, "bce"].item() for k in ("phantom", "missing"))
    area = 16 * 16 / S**2  # the square's share of the image; elsewhere the model is right
    p_roof, p_ground = ROOF / 255, GROUND / 255
    right = -(1 - area) * np.log(1 - p_ground)  # ground predicted 0.12 where the mask says 0
    assert phantom == pytest.approx(right - area * np.log(p_ground), rel=1e-4)
    assert missing == pytest.approx(right - area * np.log(1 - p_roof), rel=1e-4)


def test_ranking_uses_the_threshold_and_only_the_indices_given(corrupted):
    cache, cases = corrupted
    # above 200/255 the model predicts no building: every image with a mask disagrees fully
    df = rank_suspects(Pointwise(), cache, range(len(cache)), threshold=0.8)
    assert (df["pred_pixels"] == 0).all()
    empty_masks = {k for k, (_, mask) in cases.items() if not mask.any()}
    assert set(df["img_id"].tolist()[-2:]) == empty_masks == {"clean_empty", "missing"}
    some = [cache.ids.index(k) for k in ("clean_square", "shifted")]
    assert rank_suspects(Pointwise(), cache, some)["img_id"].tolist() == ["shifted", "clean_square"]


def test_a_stray_pixel_on_an_empty_mask_is_no_top_suspect(tmp_path):
    # A right, empty mask where the model predicts one stray pixel had Dice 1e-7 / 1: ranked
    # above every genuinely wrong mask. A disagreement of a few pixels barely counts now.
    speck = np.zeros((S, S), bool)
    speck[5, 5] = True
    half = _square(4, 4)
    half[:, 12:] = False
    cases = {
        "clean_square": (_square(4, 4), _square(4, 4)),
        "empty_1px_stray": (speck, np.zeros((S, S), bool)),
        "missing": (_square(4, 4), np.zeros((S, S), bool)),
        "shifted": (_square(4, 4), _square(4, 12)),
        "partial": (_square(4, 4), half),
    }
    cache = _cache(tmp_path, cases)
    df = rank_suspects(Pointwise(), cache, range(len(cases)))
    assert df["img_id"].tolist() == [
        "missing", "shifted", "partial", "empty_1px_stray", "clean_square"
    ]  # fmt: skip
    row = df.set_index("img_id").loc["empty_1px_stray"]
    assert (row.pred_pixels, row.mask_pixels, row.dice_vs_model) == (1, 0, 0.0)
    assert row.smoothed_dice == pytest.approx(64 / 65)
    # smooth=0 is the plain Dice: the stray pixel ties with the missing building
    plain = rank_suspects(Pointwise(), cache, range(len(cases)), smooth=0)
    assert set(plain["img_id"][:2]) == {"missing", "empty_1px_stray"}
    with pytest.raises(ValueError, match="smooth=-1"):
        rank_suspects(Pointwise(), cache, [0], smooth=-1)


@pytest.mark.parametrize("shape", [(32, 48), (48, 32)])
def test_non_square_images_are_scored_whole(tmp_path, shape):
    # 32x48 was cut into two 32-px tiles (two rows per image, then "pred has shape (4,32,32)
    # but truth (2,32,48)"); 48x32 was refused ("tile_size 48 is larger than the images")
    wide = shape[1] > shape[0]
    far = (8, 28) if wide else (28, 8)  # a building in the part the first tile did not see
    cases = {
        "clean": (_square(4, 4, 12, shape), _square(4, 4, 12, shape)),
        "missing_far": (_square(*far, 12, shape), np.zeros(shape, bool)),
    }
    cache = _cache(tmp_path, cases)
    assert cache.image_size == shape
    df = rank_suspects(Pointwise(), cache, range(2), batch_size=2)
    assert df["img_id"].tolist() == ["missing_far", "clean"]  # one row per image
    assert df["pred_pixels"].tolist() == [144, 144] and df["mask_pixels"].tolist() == [0, 144]
    csv, png = write_suspects(df, cache, Pointwise(), tmp_path / "out", top=2)
    assert pd.read_csv(csv)["img_id"].tolist() == ["missing_far", "clean"]
    assert png.stat().st_size > 0
    # our models pad a side that is not a multiple of 32 themselves: whole images go in as such
    model = create_model("upernet_internimage_tiny", impl="reference")
    df = rank_suspects(model, cache, range(2))
    assert len(df) == 2 and df["pred_pixels"].le(shape[0] * shape[1]).all()


def test_a_failed_contact_sheet_leaves_no_csv(corrupted, tmp_path):
    cache, _ = corrupted
    df = rank_suspects(Pointwise(), cache, range(len(cache)))

    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        write_suspects(df, cache, Broken(), tmp_path / "out")
    assert not (tmp_path / "out" / "suspects.csv").exists()


def test_a_failed_csv_write_leaves_the_earlier_pair(corrupted, tmp_path, monkeypatch):
    # The contact sheet was renamed into place before the CSV was written: a CSV write that
    # failed (or was stopped) left a new suspects.png beside the earlier run's suspects.csv.
    import errno

    cache, _ = corrupted
    out = tmp_path / "out"
    df = rank_suspects(Pointwise(), cache, range(len(cache)))
    write_suspects(df, cache, Pointwise(), out, top=4)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == ["suspects.csv", "suspects.png"]

    def full_disk(self, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_suspects(df, cache, Pointwise(), out, top=2)  # another contact sheet
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temporary left


class Ramp(nn.Module):
    """:class:`Pointwise` plus a left-to-right ramp of the logit: a horizontal flip predicts
    otherwise, so flip TTA changes its masks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return Pointwise()(x) + torch.linspace(-3.0, 3.0, x.shape[-1])  # (B, 1, H, W)


def _validated_masks(model, cache, threshold, amp, tta) -> np.ndarray:
    """(N, H, W) bool: what validation makes of the whole images (engine.predict_probs, then
    the level machinery's >=), the maps a run's threshold is chosen on."""
    x, _ = _whole_images(cache, range(len(cache)))
    probs = predict_probs(model, [{"image": x}], torch.device("cpu"), amp, tta)  # (N, H, W)
    return metrics.binarise(probs, threshold)


def _pixels(masks: np.ndarray) -> list[int]:
    return masks.reshape(len(masks), -1).sum(1).tolist()


@pytest.mark.parametrize("tta", [False, True])
def test_suspects_predict_with_the_runs_tta(corrupted, tta):
    # The threshold is chosen on validation maps made with the run's flip TTA; suspects
    # predicted without it, so its masks were not the ones the threshold was chosen on.
    cache, _ = corrupted
    want = _validated_masks(Ramp(), cache, 0.5, None, tta)
    assert (want != _validated_masks(Ramp(), cache, 0.5, None, not tta)).any()  # it tells
    df = rank_suspects(Ramp(), cache, range(len(cache)), threshold=0.5, tta=tta)
    assert df.sort_values("index")["pred_pixels"].tolist() == _pixels(want)


def test_suspects_predict_under_the_runs_autocast(corrupted):
    # bf16 runs validate under CPU autocast; fp32 predictions move about a tenth of the
    # quantised levels by one, which flips the pixels on the threshold's level.
    cache, _ = corrupted
    torch.manual_seed(0)
    model = create_model("upernet_internimage_tiny", impl="reference").eval()
    x, _ = _whole_images(cache, range(len(cache)))
    probs = predict_probs(model, [{"image": x}], torch.device("cpu"), torch.bfloat16)
    thr = float(np.median(probs)) / 255  # a level many pixels sit on
    want = metrics.binarise(probs, thr)
    assert (want != _validated_masks(model, cache, thr, None, False)).any()  # it tells
    df = rank_suspects(model, cache, range(len(cache)), threshold=thr, amp=torch.bfloat16)
    assert df.sort_values("index")["pred_pixels"].tolist() == _pixels(want)


def test_out_of_fold_suspects_predict_as_each_fold_validated(corrupted, tmp_path):
    cache, _ = corrupted
    held_out = np.arange(len(cache)) % 2
    folds = [(Ramp(), RunConfig(folds=2, fold=f, tta=True, precision="fp32"), 0.5) for f in (0, 1)]
    df = rank_suspects_oof(folds, cache, held_out)
    want = _validated_masks(Ramp(), cache, 0.5, None, True)
    assert df.sort_values("index")["pred_pixels"].tolist() == _pixels(want)
    # the contact sheet draws each image with its own fold's settings: written, in order
    csv, png = write_suspects(df, cache, folds, tmp_path / "out", top=3)
    assert pd.read_csv(csv)["img_id"].tolist() == df["img_id"].tolist()
    assert png.stat().st_size > 0

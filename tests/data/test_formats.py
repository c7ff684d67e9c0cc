"""Real-world image and mask formats: exact decoding, loud errors, set-wide checks."""

import warnings

import cv2
import numpy as np
import pytest
from PIL import Image

from bldseg.data.cache import DatasetCache, ensure_cache
from bldseg.data.readers import (
    ReadOptions,
    read_folder_dataset,
    read_image,
    read_mask_image,
)
from tests.data.formats import scene, write_cases, write_image_cases


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return write_cases(tmp_path_factory.mktemp("formats"))


EXACT = ["gray01", "gray255", "rgb255", "uint16_01", "uint16_65535", "palette", "palette_grey"]
EXACT += ["rgba_opaque"]


@pytest.mark.parametrize("name", EXACT)
def test_binary_masks_decode_exactly(cases, name):
    c = cases[name]
    read = read_mask_image(c.mask)
    assert read.binary
    assert read.mask.dtype == np.uint8
    np.testing.assert_array_equal(read.mask, c.truth)


def test_palette_index_is_the_label_not_the_colour(cases):
    # Index 0 is drawn white: decoding colours would give an inverted mask.
    c = cases["palette"]
    as_colour = cv2.imread(str(c.mask), cv2.IMREAD_GRAYSCALE)
    assert (as_colour[c.truth == 0] == 255).all()
    np.testing.assert_array_equal(read_mask_image(c.mask).mask, c.truth)


def test_grey_palette_is_read_by_its_grey_values(cases, tmp_path):
    # quantize() put white at index 0: reading the index as the label would invert the mask.
    c = cases["palette_grey"]
    with Image.open(c.mask) as im:
        assert im.mode == "P" and im.getpalette()[:3] == [255, 255, 255]
        indices = np.asarray(im)  # (H, W)
    assert (indices[c.truth == 0] == 1).all() and (indices[c.truth == 1] == 0).all()
    read = read_mask_image(c.mask)
    assert read.binary
    np.testing.assert_array_equal(read.mask, c.truth)
    # An ADAPTIVE palette of greys is read the same way.
    path = tmp_path / "adaptive.png"
    Image.fromarray(c.truth * 255).convert("P", palette=Image.Palette.ADAPTIVE, colors=2).save(path)
    np.testing.assert_array_equal(read_mask_image(path).mask, c.truth)


def test_palette_building_indices(cases):
    # Black background, grey roads (index 1), red buildings (index 2): read as index > 0 the
    # roads were buildings; a class palette is refused until the building class is named.
    c = cases["palette_classes"]
    with pytest.raises(ValueError, match="class palette") as e:
        read_mask_image(c.mask)
    msg = str(e.value)
    assert str(c.mask) in msg and "index 2 RGB 255,0,0" in msg and "--mask-values" in msg
    named = read_mask_image(c.mask, ReadOptions(mask_values=(2,)))
    np.testing.assert_array_equal(named.mask, c.truth)
    by_colour = read_mask_image(c.mask, ReadOptions(mask_colors=((255, 0, 0),)))
    np.testing.assert_array_equal(by_colour.mask, c.truth)


def _red_on_black(size: int = 32) -> np.ndarray:
    """(size, size) 0/1 truth of a red-on-black building mask: one rectangle."""
    truth = np.zeros((size, size), np.uint8)
    truth[5:15, 5:20] = 1
    return truth


def test_building_colour_on_black_is_read_whatever_its_index(tmp_path):
    # quantize() and ADAPTIVE palettes put red at index 0 and black at index 1: read as
    # index > 0 the mask came out inverted, as a binary mask, without a word.
    truth = _red_on_black()
    rgb = np.zeros((*truth.shape, 3), np.uint8)
    rgb[truth > 0] = (255, 0, 0)
    quantized = tmp_path / "quantized.png"
    Image.fromarray(rgb).quantize(2).save(quantized)
    adaptive = tmp_path / "adaptive.png"
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=2).save(adaptive)
    with Image.open(quantized) as im:
        assert im.getpalette()[:6] == [255, 0, 0, 0, 0, 0]  # red is index 0
    for path in (quantized, adaptive):
        read = read_mask_image(path)
        assert read.binary
        np.testing.assert_array_equal(read.mask, truth, err_msg=path.name)
    # Colours are counted, not indices: red drawn through two entries is still one colour.
    indices = np.where(truth > 0, 0, 1).astype(np.uint8)
    indices[5:15, 12:20] = np.where(truth[5:15, 12:20] > 0, 2, 1)
    im = Image.fromarray(indices, "P")
    im.putpalette([255, 0, 0, 0, 0, 0, 255, 0, 0])
    im.save(tmp_path / "two_reds.png")
    np.testing.assert_array_equal(read_mask_image(tmp_path / "two_reds.png").mask, truth)


def test_one_or_two_colours_without_black_keep_the_index_rule(tmp_path):
    # Without black nothing says which colour is background: index > 0 is a building, as before.
    truth = _red_on_black()
    cases = {
        "blue_and_red": truth,  # blue background (0), red buildings (1)
        "red_everywhere_at_1": np.ones_like(truth),
        "red_everywhere_at_0": np.zeros_like(truth),
    }
    for name, indices in cases.items():
        im = Image.fromarray(indices, "P")
        im.putpalette([0, 0, 255, 255, 0, 0] if name == "blue_and_red" else [255, 0, 0] * 2)
        im.save(tmp_path / f"{name}.png")
        read = read_mask_image(tmp_path / f"{name}.png")
        np.testing.assert_array_equal(read.mask, indices, err_msg=name)


def test_class_palette_with_an_ignore_border_is_refused_like_a_grey_label_mask(tmp_path):
    # Classes 0/1/2 and a 255 "ignore" border: as a grey mask it was refused, as a palette the
    # roads and the border read as buildings.
    labels = np.zeros((32, 32), np.uint8)
    labels[4:14, 4:14] = 1  # building
    labels[20:28] = 2  # road
    labels[3, 3:15] = 255  # ignore border
    grey = tmp_path / "grey.png"
    Image.fromarray(labels, "L").save(grey)
    with pytest.raises(ValueError, match="label mask"):
        read_mask_image(grey)
    path = tmp_path / "classes.png"
    im = Image.fromarray(labels, "P")
    im.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0, 0, 0] * 252 + [224, 224, 192])
    im.save(path)
    with pytest.raises(ValueError, match="class palette") as e:
        read_mask_image(path)
    msg = str(e.value)
    assert str(path) in msg and "4 colours" in msg
    assert "index 1 RGB 128,0,0: 100 px" in msg and "index 255 RGB 224,224,192: 12 px" in msg
    assert "--mask-values 1" in msg and "--mask-colors 128,0,0" in msg
    building = (labels == 1).astype(np.uint8)
    np.testing.assert_array_equal(
        read_mask_image(path, ReadOptions(mask_values=(1,))).mask, building
    )
    colours = ReadOptions(mask_colors=((128, 0, 0),))
    np.testing.assert_array_equal(read_mask_image(path, colours).mask, building)
    # Instance ids in a palette (each building its own index) are read with --mask-nonzero.
    nonzero = read_mask_image(path, ReadOptions(mask_nonzero=True)).mask
    np.testing.assert_array_equal(nonzero, (labels > 0).astype(np.uint8))


def test_antialiased_mask_is_binarised_at_the_midpoint(cases):
    c = cases["antialiased"]
    read = read_mask_image(c.mask)
    assert not read.binary
    np.testing.assert_array_equal(read.mask, c.truth)
    # A lower threshold keeps more of the soft edge.
    low = read_mask_image(c.mask, ReadOptions(mask_threshold=0.1)).mask
    assert low.sum() > read.mask.sum()


def test_jpeg_mask_is_binarised_and_close_to_the_truth(cases):
    c = cases["jpeg"]
    _, m = scene()
    read = read_mask_image(c.mask)
    assert not read.binary
    stored = cv2.imread(str(c.mask), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(read.mask, (stored > 127.5).astype(np.uint8))
    assert (read.mask != m).mean() < 0.01


@pytest.mark.parametrize("name", ["colour", "alpha_only"])
def test_ambiguous_masks_are_errors_naming_the_file(cases, name):
    c = cases[name]
    with pytest.raises(ValueError, match=c.error) as e:
        read_mask_image(c.mask)
    assert str(c.mask) in str(e.value)


def test_image_formats(tmp_path):
    for name, (path, exp) in write_image_cases(tmp_path).items():
        if "error" in exp:
            with pytest.raises(ValueError, match=exp["error"]) as e:
                read_image(path)
            assert "--alpha fill" in str(e.value) and str(path) in str(e.value)
            got = read_image(path, ReadOptions(alpha="fill"))
        else:
            got = read_image(path)
        assert got.dtype == np.uint8 and got.shape == exp["rgb"].shape, name
        np.testing.assert_array_equal(got, exp["rgb"], err_msg=name)


def test_band_selection_on_plain_images(tmp_path):
    path, exp = write_image_cases(tmp_path)["rgb_png"]
    rgb = exp["rgb"]
    np.testing.assert_array_equal(read_image(path, ReadOptions(bands=(3, 2, 1))), rgb[..., ::-1])
    np.testing.assert_array_equal(
        read_image(path, ReadOptions(bands=(2,))), np.repeat(rgb[..., 1:2], 3, 2)
    )
    with pytest.raises(ValueError, match="has 3 bands"):
        read_image(path, ReadOptions(bands=(4, 2, 1)))
    with pytest.raises(ValueError, match="1 \\(grey\\) or 3"):
        ReadOptions(bands=(1, 2))


def _folder(tmp_path, names, size=32, seed=0, mask_name="{stem}.png", sub=""):
    for i, n in enumerate(names):
        rgb, m = scene(size, seed + i)
        img = tmp_path / "images" / sub / f"{n}.png"
        img.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(img), rgb[..., ::-1])
        mp = tmp_path / "masks" / sub / mask_name.format(stem=n)
        mp.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(mp), m * 255)
    return tmp_path / "images", tmp_path / "masks"


@pytest.mark.parametrize("pattern", ["{stem}.png", "{stem}_mask.png", "{stem}.mask.tif"])
def test_default_mask_patterns(tmp_path, pattern):
    images, masks = _folder(tmp_path, ["a", "b"], mask_name=pattern)
    records = read_folder_dataset(images, masks)
    assert [r.mask_path.name for r in records] == [pattern.format(stem=s) for s in "ab"]


def test_user_patterns_and_regex(tmp_path):
    images, masks = _folder(tmp_path, ["1_img", "2_img"], mask_name="{stem}_label.png")
    (r,) = read_folder_dataset(images, masks, mask_pattern="{stem}_label.png")[:1]
    assert r.mask_path.name == "1_img_label.png"
    for p in list(masks.iterdir()):  # CrowdAI: image N_img.png <-> mask NN.png
        n = p.name.split("_")[0]
        p.rename(masks / f"{n}{n}.png")
    records = read_folder_dataset(images, masks, mask_pattern=r"(\d+)_img=>\1\1.png")
    assert [r.mask_path.name for r in records] == ["11.png", "22.png"]


def test_unmatched_image_lists_what_was_tried(tmp_path):
    images, masks = _folder(tmp_path, ["a", "b"])
    (masks / "b.png").rename(masks / "b_other.png")
    with pytest.raises(FileNotFoundError) as e:
        read_folder_dataset(images, masks)
    msg = str(e.value)
    assert "b.png: no mask found" in msg and "1 of 2 images unmatched" in msg
    assert "b_mask.png" in msg and "b.mask.tif" in msg and "--mask-pattern" in msg


def test_two_candidate_masks_are_an_error(tmp_path):
    images, masks = _folder(tmp_path, ["a"])
    cv2.imwrite(str(masks / "a.tif"), np.zeros((32, 32), np.uint8))
    with pytest.raises(ValueError, match=r"a\.png: two candidate masks .*a\.png.*a\.tif"):
        read_folder_dataset(images, masks)


def test_recursive_folders_mirror_sub_folders(tmp_path):
    _folder(tmp_path, ["a"], sub="austin")
    images, masks = _folder(tmp_path, ["a"], seed=5, sub="chicago")
    records = read_folder_dataset(images, masks)
    assert [r.img_id for r in records] == ["austin__a", "chicago__a"]
    assert [r.mask_path.parent.name for r in records] == ["austin", "chicago"]
    with pytest.raises(ValueError, match="no images"):
        read_folder_dataset(images, masks, recursive=False)


def test_masks_beside_images(tmp_path):
    images, _ = _folder(tmp_path, ["a", "b"])
    for n in "ab":
        _, m = scene(32, ord(n))
        cv2.imwrite(str(images / f"{n}_mask.png"), m * 255)
    records = read_folder_dataset(images, images, mask_pattern="{stem}_mask.png")
    assert [r.img_id for r in records] == ["a", "b"]


def test_non_binary_masks_warn_with_a_count(tmp_path):
    images, masks = _folder(tmp_path, ["a", "b", "c"])
    m = cv2.imread(str(masks / "b.png"), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(masks / "b.png"), cv2.GaussianBlur(m, (5, 5), 1.0))
    records = read_folder_dataset(images, masks)
    with pytest.warns(UserWarning, match=r"1 of 3 mask files were not binary.*b\.png"):
        cache = ensure_cache(records, tmp_path / "cache", progress=False)
    assert cache.manifest["masks_not_binary"] == [str(masks / "b.png")]


def test_all_empty_mask_set_is_an_error_and_keeps_the_old_cache(tmp_path):
    images, masks = _folder(tmp_path, ["a", "b"])
    good = ensure_cache(read_folder_dataset(images, masks), tmp_path / "cache", progress=False)
    before = np.array(good.masks)
    for p in masks.iterdir():
        cv2.imwrite(str(p), np.zeros((32, 32), np.uint8))
    with pytest.raises(ValueError, match=r"every one of the 2 masks is empty \(first: .*a\.png"):
        ensure_cache(read_folder_dataset(images, masks), tmp_path / "cache", progress=False)
    # Nothing already cached is lost.
    np.testing.assert_array_equal(DatasetCache(tmp_path / "cache").masks, before)


def test_bad_mask_in_a_folder_names_the_file(tmp_path):
    images, masks = _folder(tmp_path, ["a", "b"])
    (masks / "b.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"b \(.*b\.png\): .*b\.png: cannot decode the mask"):
        ensure_cache(read_folder_dataset(images, masks), tmp_path / "cache", progress=False)
    # An undecodable PNG is not silently skipped, and no cache appears.
    assert not (tmp_path / "cache").exists()


def test_option_change_rebuilds_the_cache(tmp_path):
    images, masks = _folder(tmp_path, ["a", "b"])
    m = cv2.imread(str(masks / "a.png"), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(masks / "a.png"), cv2.GaussianBlur(m, (5, 5), 1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c1 = ensure_cache(read_folder_dataset(images, masks), tmp_path / "c", progress=False)
        n1 = int(np.asarray(c1.masks[0]).sum())
        opts = ReadOptions(mask_threshold=0.1)
        c2 = ensure_cache(
            read_folder_dataset(images, masks, options=opts), tmp_path / "c", progress=False
        )
    assert c1.fingerprint != c2.fingerprint
    assert int(np.asarray(c2.masks[0]).sum()) > n1


def test_colour_coded_class_masks(tmp_path):
    # ISPRS style: building blue, road white, trees green.
    _, m = scene()
    rgb = np.zeros((*m.shape, 3), np.uint8)
    rgb[:] = (255, 255, 255)
    rgb[::3] = (0, 255, 0)
    rgb[m > 0] = (0, 0, 255)
    path = tmp_path / "isprs.png"
    cv2.imwrite(str(path), rgb[..., ::-1])
    with pytest.raises(ValueError, match=r"--mask-colors R,G,B .*") as e:
        read_mask_image(path)
    assert "[0, 0, 255]" in str(e.value)  # the colours found are listed
    read = read_mask_image(path, ReadOptions(mask_colors=((0, 0, 255),)))
    np.testing.assert_array_equal(read.mask, m)
    two = read_mask_image(path, ReadOptions(mask_colors=((0, 0, 255), (0, 255, 0))))
    assert two.mask.sum() > m.sum()


def _class_colours(size: int = 128, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """ISPRS-style (size, size, 3) RGB class-colour mask and its building truth (bool).

    Roads white, low vegetation cyan, trees green, buildings blue, clutter red, and cars as
    yellow 2x3 specks (a class too small to fill a 3x3 area, as in coarse ISPRS tiles).
    """
    rng = np.random.default_rng(seed)
    rgb = np.full((size, size, 3), 255, np.uint8)
    colours = [(0, 255, 255), (0, 255, 0), (0, 0, 255), (255, 0, 0), (0, 0, 255)]
    for k in range(24):
        y, x = rng.integers(0, size - 20, 2)
        h, w = rng.integers(8, 20, 2)
        rgb[y : y + h, x : x + w] = colours[k % len(colours)]
    for _ in range(6):
        y, x = rng.integers(0, size - 3, 2)
        rgb[y : y + 2, x : x + 3] = (255, 255, 0)
    return rgb, (rgb == (0, 0, 255)).all(axis=2)


def test_soft_edged_colour_masks_are_read_by_nearest_colour_and_reported(tmp_path):
    # A class-colour mask resampled (bilinear) or saved as JPEG has few pixels left exactly
    # (0, 0, 255): read by exact colour it silently lost half its buildings (bilinear) or all
    # of them (JPEG) and said it was binary. It is read by the nearest class colour instead,
    # and reported as not binary, so the cache build warns.
    rgb, truth = _class_colours()
    options = ReadOptions(mask_colors=((0, 0, 255),))
    clean = tmp_path / "clean.png"
    cv2.imwrite(str(clean), rgb[..., ::-1])
    read = read_mask_image(clean, options)
    assert read.binary  # a clean class mask (yellow specks too) is read exactly
    np.testing.assert_array_equal(read.mask, truth)
    small = cv2.resize(rgb, (64, 64), interpolation=cv2.INTER_LINEAR)
    soft = {
        "bilinear.png": cv2.resize(small, (128, 128), interpolation=cv2.INTER_LINEAR),
        "q95.jpg": rgb,
        "q75.jpg": rgb,
    }
    for name, array in soft.items():
        path = tmp_path / name
        if name.endswith(".jpg"):
            Image.fromarray(array).save(path, quality=int(name[1:3]))
        else:
            cv2.imwrite(str(path), array[..., ::-1])
        read = read_mask_image(path, options)
        assert not read.binary, name
        # the truth's building share, and no more than its edges wrong
        assert abs(read.mask.mean() - truth.mean()) < 0.02, (name, read.mask.mean(), truth.mean())
        assert (read.mask.astype(bool) != truth).mean() < 0.05, name


def test_soft_edged_colour_masks_warn_at_the_cache_build(tmp_path):
    images, masks = _folder(tmp_path, ["a", "b"], size=128)
    rgb, _ = _class_colours(seed=1)
    for p in masks.iterdir():
        p.unlink()
    cv2.imwrite(str(masks / "a.png"), rgb[..., ::-1])
    Image.fromarray(rgb).save(masks / "b.jpg", quality=95)
    records = read_folder_dataset(images, masks, options=ReadOptions(mask_colors=((0, 0, 255),)))
    with pytest.warns(UserWarning, match=r"1 of 2 mask files were not binary.*b\.jpg.*nearest"):
        cache = ensure_cache(records, tmp_path / "cache", progress=False)
    assert cache.manifest["masks_not_binary"] == [str(masks / "b.jpg")]
    assert np.asarray(cache.masks[1]).mean() > 0.05  # the JPEG's buildings are kept


def test_one_channel_masks_read_as_grey_colours_under_mask_colors(tmp_path):
    # --mask-colors was ignored for a one-channel mask: 0/255 grey read white as building
    # whatever colour was named, while the same mask saved as RGB read the named colour.
    _, m = scene(48, 3)
    grey, rgb = tmp_path / "grey.png", tmp_path / "rgb.png"
    cv2.imwrite(str(grey), m * 255)
    cv2.imwrite(str(rgb), np.repeat(m[..., None] * 255, 3, axis=2))
    for path in (grey, rgb):
        black = read_mask_image(path, ReadOptions(mask_colors=((0, 0, 0),)))
        np.testing.assert_array_equal(black.mask, 1 - m)
        assert black.binary
        white = read_mask_image(path, ReadOptions(mask_colors=((255, 255, 255),)))
        np.testing.assert_array_equal(white.mask, m)
    # a colour that is not grey: not in the RGB one, refused for the one-channel one (which
    # cannot hold it: test_one_channel_mask_under_a_colour_is_refused_naming_the_file)
    assert not read_mask_image(rgb, ReadOptions(mask_colors=((255, 0, 0),))).mask.any()
    with pytest.raises(ValueError, match="one-channel"):
        read_mask_image(grey, ReadOptions(mask_colors=((255, 0, 0),)))


def test_all_empty_under_mask_colors_names_the_colours_found(tmp_path):
    # With --mask-colors the all-empty error pointed to --mask-values, which cannot read a
    # colour; it names the colours asked for and those the masks draw.
    images, masks = _folder(tmp_path, ["a", "b"], size=128)
    rgb, _ = _class_colours(seed=2)
    for p in masks.iterdir():
        cv2.imwrite(str(p), rgb[..., ::-1])
    records = read_folder_dataset(images, masks, options=ReadOptions(mask_colors=((255, 0, 255),)))
    with pytest.raises(
        ValueError,
        match=r"no pixel of the 2 masks has the colour\(s\) "
        r"--mask-colors '255,0,255' \(first: .*a\.png",
    ) as e:
        ensure_cache(records, tmp_path / "cache", progress=False)
    assert "--mask-values" not in str(e.value)
    # RGB, not the BGR OpenCV decodes to: blue (0, 0, 255) is drawn more than red (255, 0, 0)
    top = "[[255, 255, 255], [0, 0, 255], [0, 255, 0], [255, 0, 0]]"
    assert f"its most frequent colours, RGB: {top})" in str(e.value)


def test_clean_class_colour_masks_with_thin_classes_are_read_exactly(tmp_path):
    # A class drawn only in 1-px lines or specks (never filling a 3x3 area) made a clean
    # class-colour PNG look soft: the thin class was taken for a building and the mask said
    # not binary; a grey class-id mask (0 background, 1 building, 2 road, 2 px of id 3) under
    # --mask-colors 1,1,1 read every pixel as a building.
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[:, :32] = (70, 70, 70)  # Cityscapes building
    rgb[:, 32:] = (0, 0, 142)  # car
    rgb[20, :] = (0, 80, 100)  # a 1-px line of train
    rgb[40, 5] = rgb[41, 40] = (220, 20, 60)  # person specks
    path = tmp_path / "cityscapes.png"
    cv2.imwrite(str(path), rgb[..., ::-1])
    read = read_mask_image(path, ReadOptions(mask_colors=((70, 70, 70),)))
    assert read.binary
    np.testing.assert_array_equal(read.mask, (rgb == (70, 70, 70)).all(axis=2))
    ids = np.zeros((64, 64), np.uint8)
    ids[10:30, 10:40] = 1
    ids[40:50] = 2
    ids[5, 50] = ids[6, 51] = 3
    for name, array in (("ids.png", ids), ("ids_rgb.png", np.repeat(ids[..., None], 3, 2))):
        cv2.imwrite(str(tmp_path / name), array)
        read = read_mask_image(tmp_path / name, ReadOptions(mask_colors=((1, 1, 1),)))
        assert read.binary, name
        np.testing.assert_array_equal(read.mask, ids == 1, err_msg=name)


@pytest.mark.parametrize("edge", [240, 228])
def test_soft_class_colour_masks_of_few_colours_take_no_far_colour_for_a_building(tmp_path, edge):
    # A mask of at most 256 colours is soft only by a colour near a named one; read softly,
    # its distinct colours farther from every named colour stay what they are (a thin class),
    # not merged into the building by its nearest-class reading. An edge 27 from the building
    # colour (228) is near it too: JPEG moves flat colours by up to ~20, quantising further.
    rgb = np.full((64, 64, 3), 255, np.uint8)  # roads white
    rgb[8:40, 8:40] = (0, 0, 255)  # a building
    rgb[8:40, 40] = (0, 0, edge)  # its edge, off the class colour (a blended/quantised one)
    rgb[50, :] = (60, 60, 200)  # a 1-px line of a class 83 from the building colour
    path = tmp_path / "few.png"
    cv2.imwrite(str(path), rgb[..., ::-1])
    read = read_mask_image(path, ReadOptions(mask_colors=((0, 0, 255),)))
    assert not read.binary
    truth = (rgb[..., 0] == 0) & (rgb[..., 2] >= edge)
    np.testing.assert_array_equal(read.mask, truth)


def test_one_channel_mask_under_a_colour_is_refused_naming_the_file(tmp_path):
    # A grey 0/255 mask (ISPRS ground truth as some ship it) under --mask-colors 0,0,255 read
    # as empty, silently: a folder mixing grey and colour masks lost the grey ones' buildings.
    _, m = scene(48, 3)
    path = tmp_path / "grey.png"
    cv2.imwrite(str(path), m * 255)
    with pytest.raises(ValueError, match=r"one-channel") as e:
        read_mask_image(path, ReadOptions(mask_colors=((255, 255, 255), (0, 0, 255))))
    msg = str(e.value)
    assert str(path) in msg and "0,0,255" in msg and "--mask-values" in msg
    # grey colours keep reading it
    white = read_mask_image(path, ReadOptions(mask_colors=((255, 255, 255),)))
    np.testing.assert_array_equal(white.mask, m)
    # the same grey mask saved as a palette PNG (PIL's convert("P")) read as empty
    Image.fromarray(m * 255).convert("P").save(tmp_path / "grey_p.png")
    with pytest.raises(ValueError, match=r"grey_p\.png: a one-channel"):
        read_mask_image(tmp_path / "grey_p.png", ReadOptions(mask_colors=((0, 0, 255),)))


@pytest.mark.parametrize("background", [(255, 255, 255), (40, 200, 60)])
@pytest.mark.parametrize(
    "resample", [(cv2.INTER_LINEAR, 2.0), (cv2.INTER_LINEAR, 1.5), (cv2.INTER_AREA, 0.5)]
)
def test_resampled_class_colour_masks_of_few_colours_read_their_blends(
    tmp_path, resample, background
):
    # Blue on white resampled leaves a few blends (a 2x bilinear upsample: 10 colours); the
    # blends nearest the blue lie ~64 from it, beyond the tolerance, so they were taken for a
    # clean mask (AREA: read exactly, "binary") or left out: 17% of the buildings lost. On a
    # colour background (vegetation green) the blends, rounded to whole values, lie up to ~1
    # off the line from the blue (not 0, as on white).
    how, scale = resample
    _, m = scene(64, 5)
    rgb = np.where(m[..., None] > 0, np.uint8([0, 0, 255]), np.uint8(background))  # (H, W, 3)
    big = cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=how)
    share = cv2.resize(m.astype(np.float32), None, fx=scale, fy=scale, interpolation=how)
    cv2.imwrite(str(tmp_path / "m.png"), big[..., ::-1])  # BGR
    read = read_mask_image(tmp_path / "m.png", ReadOptions(mask_colors=((0, 0, 255),)))
    assert not read.binary
    # nearest class colour: a pixel is building where the blend holds more blue than the
    # background (a half-and-half blend, rounded, may go either way)
    wrong = (read.mask.astype(bool) != (share > 0.5)) & (np.abs(share - 0.5) > 1e-3)
    assert not wrong.any(), int(wrong.sum())


def test_palette_class_colour_masks_read_as_their_colours(tmp_path):
    # A JPEG'd class-colour mask quantised to a palette (PIL's quantize) draws no exact class
    # colour: read by palette entry it had no building and said it was binary. It is read as
    # the same pixels saved as RGB are.
    rgb, truth = _class_colours()
    jpeg = tmp_path / "q75.jpg"
    Image.fromarray(rgb).save(jpeg, quality=75)
    quantised = Image.open(jpeg).convert("RGB").quantize(64, method=Image.Quantize.MEDIANCUT)
    quantised.save(tmp_path / "palette.png")
    quantised.convert("RGB").save(tmp_path / "rgb.png")
    options = ReadOptions(mask_colors=((0, 0, 255),))
    palette = read_mask_image(tmp_path / "palette.png", options)
    as_rgb = read_mask_image(tmp_path / "rgb.png", options)
    np.testing.assert_array_equal(palette.mask, as_rgb.mask)
    assert palette.binary == as_rgb.binary is False
    assert (palette.mask.astype(bool) != truth).mean() < 0.05


def test_palette_class_colour_masks_read_transparent_pixels_as_no_building(tmp_path):
    # Read by its colours under --mask-colors, a palette PNG's fully transparent entries
    # (tRNS 0: no data) must still be background, as they are when read by index: an entry
    # drawing the building colour but transparent read as building, without a word.
    indices = np.zeros((32, 32), np.uint8)
    indices[4:12, 4:12] = 1  # a building
    indices[20:28, 20:28] = 2  # no data, drawn in the building colour
    im = Image.fromarray(indices, "P")
    im.putpalette([255, 255, 255, 0, 0, 255, 0, 0, 255])
    im.save(tmp_path / "mask.png", transparency=bytes([255, 255, 0]))
    with pytest.warns(UserWarning, match=r"mask\.png: 64 of 1024 mask pixels are no data"):
        read = read_mask_image(tmp_path / "mask.png", ReadOptions(mask_colors=((0, 0, 255),)))
    np.testing.assert_array_equal(read.mask, (indices == 1).astype(np.uint8))
    assert read.binary


def test_antialiased_grey_mask_under_grey_mask_colors_is_soft(tmp_path):
    # A 0/255 mask with a 1-px antialiased rim of 128 (three values) under --mask-colors
    # 255,255,255 is a soft binary mask, not a clean one: read as without the flag (binarised
    # at the midpoint) and reported as not binary, not by exact colour (its rim dropped).
    _, m = scene(64, 3)
    rim = (cv2.dilate(m, np.ones((3, 3), np.uint8)) > 0) & (m == 0)
    grey = np.where(rim, 128, m * 255).astype(np.uint8)
    for name, array in (("grey.png", grey), ("rgb.png", np.repeat(grey[..., None], 3, axis=2))):
        cv2.imwrite(str(tmp_path / name), array)
        read = read_mask_image(tmp_path / name, ReadOptions(mask_colors=((255, 255, 255),)))
        assert not read.binary, name
        np.testing.assert_array_equal(read.mask, (m > 0) | rim, err_msg=name)
    assert not read_mask_image(tmp_path / "grey.png").binary  # as without --mask-colors


def test_all_empty_under_several_mask_colors_names_them_as_the_flag_takes_them(tmp_path):
    # The colours were printed "--mask-colors 255,0,255 1,2,3", which the flag does not take.
    images, masks = _folder(tmp_path, ["a"], size=128)
    rgb, _ = _class_colours(seed=2)
    cv2.imwrite(str(masks / "a.png"), rgb[..., ::-1])
    colours = ((255, 0, 255), (1, 2, 3))
    records = read_folder_dataset(images, masks, options=ReadOptions(mask_colors=colours))
    with pytest.raises(ValueError, match=r"--mask-colors '255,0,255;1,2,3' \(first: "):
        ensure_cache(records, tmp_path / "cache", progress=False)


def _instances(dtype=np.uint8, n: int = 200) -> np.ndarray:
    """(160, 160) instance-id mask: ``n`` buildings of 4x4 pixels numbered 1..n."""
    m = np.zeros((160, 160), dtype)
    for k in range(n):
        y, x = divmod(k, 20)
        m[y * 8 : y * 8 + 4, x * 8 : x * 8 + 4] = k + 1
    return m


@pytest.mark.parametrize(
    ("name", "labels"),
    [
        ("instances_u8", _instances()),  # a cut at 127.5 would keep ids 128..200 only
        ("instances_u16", _instances(np.uint16)),  # a cut at 32767.5 would keep nothing
        ("classes", (_instances() % 3).astype(np.uint8)),  # 0 background, 1 road, 2 building
    ],
)
def test_label_masks_are_refused_with_the_options_to_read_them(tmp_path, name, labels):
    path = tmp_path / f"{name}.png"
    assert cv2.imwrite(str(path), labels)
    with pytest.raises(ValueError, match="label mask") as e:
        read_mask_image(path)
    msg = str(e.value)
    assert str(path) in msg and "--mask-values" in msg and "--mask-nonzero" in msg
    assert "(0, 1, 2" in msg  # the values found
    read = read_mask_image(path, ReadOptions(mask_nonzero=True))
    assert read.binary
    np.testing.assert_array_equal(read.mask, (labels > 0).astype(np.uint8))
    classes = read_mask_image(path, ReadOptions(mask_values=(2,))).mask
    np.testing.assert_array_equal(classes, (labels == 2).astype(np.uint8))


def _ignore_masks(m: np.ndarray) -> dict[str, np.ndarray]:
    """0/1/255 masks of the 0/1 mask ``m``: 1 building, 255 ignored (border ring, no-data strip)."""
    ring = cv2.dilate(m, np.ones((3, 3), np.uint8)) - cv2.erode(m, np.ones((3, 3), np.uint8))
    strip = m.copy()
    strip[:, : m.shape[1] // 4] = 255
    return {"ring": np.where(ring > 0, 255, m).astype(np.uint8), "nodata_strip": strip}


@pytest.mark.parametrize("kind", ["ring", "nodata_strip"])
def test_building_value_below_an_ignore_value_is_refused_not_dropped(tmp_path, kind):
    # Binarised at 127.5 such a mask keeps only the ignored pixels: its buildings (1) would
    # train as background without a word.
    _, m = scene(96, seed=7)
    labels = _ignore_masks(m)[kind]
    assert (labels == 1).sum() > 100
    path = tmp_path / f"{kind}.png"
    assert cv2.imwrite(str(path), labels)
    with pytest.raises(ValueError, match="label mask") as e:
        read_mask_image(path)
    msg = str(e.value)
    assert str(path) in msg and "of value 1," in msg and "--mask-values 1" in msg
    read = read_mask_image(path, ReadOptions(mask_values=(1,)))
    np.testing.assert_array_equal(read.mask, (labels == 1).astype(np.uint8))


def test_mask_values_and_mask_nonzero_exclude_each_other():
    with pytest.raises(ValueError, match="mask_values or mask_nonzero"):
        ReadOptions(mask_values=(1,), mask_nonzero=True)
    assert ReadOptions(mask_nonzero=True).key() != ReadOptions().key()


def test_label_mask_in_a_folder_names_the_file(tmp_path):
    images, masks = _folder(tmp_path, ["a", "b"])
    cv2.imwrite(str(masks / "b.png"), _instances()[:32, :32])
    with pytest.raises(ValueError, match=r"b \(.*b\.png\): .*b\.png: this looks like a label"):
        ensure_cache(read_folder_dataset(images, masks), tmp_path / "cache", progress=False)


def _soft_masks(m: np.ndarray) -> dict[str, np.ndarray]:
    """A 0/255 mask as tools soften it: blurred, resampled, drawn antialiased, JPEG-compressed."""
    m255 = (m * 255).astype(np.uint8)
    h, w = m.shape
    out = {f"blur{k}": cv2.GaussianBlur(m255, (k, k), k / 4) for k in (3, 5, 9, 15)}
    small = cv2.resize(m255, (w // 3, h // 3), interpolation=cv2.INTER_AREA)
    out["resampled"] = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    poly = np.zeros((h, w), np.uint8)
    corners = np.array([[3, 2], [w - 5, 7], [w - 9, h - 3], [6, h - 8]])
    out["drawn_aa"] = cv2.fillPoly(poly, [corners], 255, lineType=cv2.LINE_AA)
    for q in (10, 30, 75):
        _, data = cv2.imencode(".jpg", m255, [cv2.IMWRITE_JPEG_QUALITY, q])
        out[f"jpeg{q}"] = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    out["antialiased_u16"] = cv2.GaussianBlur(m.astype(np.uint16) * 65535, (5, 5), 1.0)
    return out


@pytest.mark.parametrize("size", [32, 48, 256])
def test_soft_binary_masks_are_still_binarised(tmp_path, size):
    _, m = scene(size, seed=size)
    for name, soft in _soft_masks(m).items():
        path = tmp_path / f"{name}.png"
        assert cv2.imwrite(str(path), soft)
        read = read_mask_image(path)
        assert not read.binary, name
        top = np.iinfo(soft.dtype).max
        np.testing.assert_array_equal(read.mask, (soft > 0.5 * top).astype(np.uint8), name)


def _jpeg(path, size=64):
    rgb, m = scene(size, seed=3)
    assert cv2.imwrite(str(path), rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
    return path, m


@pytest.mark.parametrize("suffix", [".jpg", ".jpeg"])
def test_truncated_jpeg_is_refused_naming_the_file(tmp_path, suffix):
    path, _ = _jpeg(tmp_path / f"tile{suffix}")
    whole = read_image(path)
    data = path.read_bytes()
    path.write_bytes(data + b"\0" * 16)  # a few bytes after the end marker are allowed
    np.testing.assert_array_equal(read_image(path), whole)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    for read in (read_image, read_mask_image):
        with pytest.raises(ValueError, match="truncated JPEG") as e:
            read(cut)
        assert str(cut) in str(e.value)


def test_truncated_jpeg_mask_is_refused(tmp_path):
    _, m = scene(64, seed=4)
    path = tmp_path / "mask.jpg"
    assert cv2.imwrite(str(path), m * 255, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert read_mask_image(path).mask.sum() > 0
    path.write_bytes(path.read_bytes()[:-300])
    with pytest.raises(ValueError, match=r"mask\.jpg: truncated JPEG"):
        read_mask_image(path)


def test_one_mask_for_two_images_is_an_error(tmp_path):
    # images/austin/1.png and images/chicago/1.png both fall back to masks/1.png.
    for city in ("austin", "chicago"):
        _folder(tmp_path, ["1"], sub=city)
    masks = tmp_path / "masks"
    for city in ("austin", "chicago"):
        (masks / city / "1.png").unlink()
        (masks / city).rmdir()
    cv2.imwrite(str(masks / "1.png"), np.zeros((32, 32), np.uint8))
    with pytest.raises(ValueError, match="one mask matched to 2 images") as e:
        read_folder_dataset(tmp_path / "images", masks)
    msg = str(e.value)
    assert str(masks / "1.png") in msg
    assert str(tmp_path / "images" / "austin" / "1.png") in msg
    assert str(tmp_path / "images" / "chicago" / "1.png") in msg


def test_sub_folders_reached_through_symbolic_links_are_searched(tmp_path):
    # images/city -> a folder elsewhere, as datasets assembled from several disks are.
    images, masks = _folder(tmp_path, ["top"])
    _folder(tmp_path / "elsewhere", ["a", "b"], seed=3)
    (images / "city").symlink_to(tmp_path / "elsewhere" / "images", target_is_directory=True)
    (masks / "city").symlink_to(tmp_path / "elsewhere" / "masks", target_is_directory=True)
    records = read_folder_dataset(images, masks)
    assert [r.img_id for r in records] == ["city__a", "city__b", "top"]
    assert records[0].mask_path == masks / "city" / "a.png"
    # A link to a parent folder is walked once, not forever, and said so.
    (images / "loop").symlink_to(images, target_is_directory=True)
    with pytest.warns(UserWarning, match=r"loop: the same folder as .*images"):
        records = read_folder_dataset(images, masks)
    assert [r.img_id for r in records] == ["city__a", "city__b", "top"]


def test_masks_beside_images_with_the_same_stem_are_refused_not_dropped(tmp_path):
    # a.jpg takes a.png as its mask and a.png takes a.jpg: both used to be dropped as masks.
    d = tmp_path / "tiles"
    d.mkdir()
    for i, n in enumerate("ab"):
        rgb, m = scene(32, i)
        cv2.imwrite(str(d / f"{n}.jpg"), rgb[..., ::-1])
        cv2.imwrite(str(d / f"{n}.png"), m * 255)
    with pytest.raises(ValueError) as e:
        read_folder_dataset(d, d)
    msg = str(e.value)
    assert f"{d / 'a.jpg'} and {d / 'a.png'} each match the other as its mask" in msg
    assert "2 such pair(s)" in msg and "--mask-pattern '{stem}.png'" in msg
    records = read_folder_dataset(d, d, mask_pattern="{stem}.png")
    assert [(r.image_path.name, r.mask_path.name) for r in records] == [
        ("a.jpg", "a.png"),
        ("b.jpg", "b.png"),
    ]


def test_mask_in_the_mirrored_sub_folder_wins_over_the_top_one(tmp_path):
    # images/a.png <-> masks/a.png and images/x/a.png <-> masks/x/a.png: the top mask is only a
    # fallback for sub-folders without their own.
    _folder(tmp_path, ["a"])
    images, masks = _folder(tmp_path, ["a"], seed=4, sub="x")
    records = read_folder_dataset(images, masks)
    assert [(r.img_id, r.mask_path) for r in records] == [
        ("a", masks / "a.png"),
        ("x__a", masks / "x" / "a.png"),
    ]


def test_upper_case_mask_suffixes_are_matched(tmp_path):
    images, masks = _folder(tmp_path, ["a", "b"])
    (images / "b.png").rename(images / "b.PNG")
    for n in "ab":
        (masks / f"{n}.png").rename(masks / f"{n}.PNG")
    records = read_folder_dataset(images, masks)
    assert [r.mask_path for r in records] == [masks / "a.PNG", masks / "b.PNG"]
    # Two files that differ only in the suffix's case are two candidates.
    cv2.imwrite(str(masks / "a.png"), np.zeros((32, 32), np.uint8))
    with pytest.raises(ValueError, match="two candidate masks"):
        read_folder_dataset(images, masks)


def test_float_mask_no_data_reads_as_no_building(tmp_path):
    # NaN made the maximum NaN, so the cut was NaN and every pixel read as background.
    truth = np.zeros((32, 32), np.uint8)
    truth[4:12, 6:20] = 1
    m = truth.astype(np.float32)
    m[:, 28:] = np.nan  # a no-data strip
    path = tmp_path / "mask.tif"
    assert cv2.imwrite(str(path), m)
    with pytest.warns(UserWarning, match=r"mask\.tif: 128 of 1024 mask pixels are NaN/inf"):
        read = read_mask_image(path)
    np.testing.assert_array_equal(read.mask, truth)


def test_grey_palette_with_a_repeated_grey_is_read_by_its_colours(tmp_path):
    # Indices 0 and 1 are both black, 2 white: read by index, index 1 would be a building.
    indices = np.zeros((32, 32), np.uint8)
    indices[:10, :10] = 1  # 100 black pixels
    indices[20:, 12:32] = 2  # 240 white pixels
    im = Image.fromarray(indices, "P")
    im.putpalette([0, 0, 0, 0, 0, 0, 255, 255, 255])
    im.save(tmp_path / "mask.png")
    read = read_mask_image(tmp_path / "mask.png")
    assert read.binary
    np.testing.assert_array_equal(read.mask, (indices == 2).astype(np.uint8))

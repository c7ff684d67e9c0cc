import re
import shutil
import warnings
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from bldseg.data.readers import (
    ReadOptions,
    load_record,
    read_competition_csv,
    read_folder_dataset,
    read_image,
    read_mask_image,
    tile_windows,
)
from bldseg.data.rle import rle_encode
from tests.data.formats import (
    scene,
    write_geotiff_nodata_cases,
    write_palette_geotiff_nodata,
    write_transparent_palette_cases,
)


def write_png(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    bgr = rgb[..., ::-1] if rgb.ndim == 3 else rgb
    assert cv2.imwrite(str(path), np.ascontiguousarray(bgr))


def make_competition(tmp_path: Path, n: int = 3, size: int = 32) -> tuple[Path, list]:
    rng = np.random.default_rng(0)
    rows, masks = [], []
    for i in range(n):
        img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        mask = (rng.random((size, size)) > 0.7).astype(np.uint8)
        write_png(tmp_path / "train_img" / f"TRAIN_{i:04d}.png", img)
        rows.append((f"TRAIN_{i:04d}", f"./train_img/TRAIN_{i:04d}.png", rle_encode(mask)))
        masks.append((img, mask))
    pd.DataFrame(rows, columns=["img_id", "img_path", "mask_rle"]).to_csv(
        tmp_path / "train.csv", index=False
    )
    return tmp_path / "train.csv", masks


def test_competition_csv_round_trip(tmp_path):
    csv, truth = make_competition(tmp_path)
    records = read_competition_csv(csv)
    assert [r.img_id for r in records] == ["TRAIN_0000", "TRAIN_0001", "TRAIN_0002"]
    assert all(r.image_path.is_absolute() for r in records)
    for r, (img, mask) in zip(records, truth, strict=True):
        got_img, got_mask = load_record(r)
        np.testing.assert_array_equal(got_img, img)  # RGB order preserved
        np.testing.assert_array_equal(got_mask, mask)


def test_missing_column_names_file_and_columns(tmp_path):
    csv, _ = make_competition(tmp_path)
    df = pd.read_csv(csv).drop(columns=["mask_rle"])
    df.to_csv(csv, index=False)
    with pytest.raises(ValueError, match=r"train\.csv: missing column\(s\) \['mask_rle'\]"):
        read_competition_csv(csv, with_masks=True)
    # test.csv style: masks not required
    assert len(read_competition_csv(csv, with_masks=False)) == 3


def test_missing_image_names_row(tmp_path):
    csv, _ = make_competition(tmp_path)
    (tmp_path / "train_img" / "TRAIN_0001.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"row 2 \(TRAIN_0001\): image not found"):
        read_competition_csv(csv)


def test_corrupt_image_names_row_and_id(tmp_path):
    # a missing image was named by its CSV row and id, a corrupt one by its path alone
    csv, _ = make_competition(tmp_path)
    (tmp_path / "train_img" / "TRAIN_0001.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    (r,) = read_competition_csv(csv)[1:2]
    with pytest.raises(
        ValueError, match=r"^TRAIN_0001 \(CSV row 2\): .*TRAIN_0001\.png: cannot decode the image"
    ):
        load_record(r)


def test_path_escaping_csv_folder_is_rejected(tmp_path):
    sub = tmp_path / "ds"
    csv, _ = make_competition(sub)
    write_png(tmp_path / "outside.png", np.zeros((32, 32, 3), np.uint8))
    df = pd.read_csv(csv)
    df.loc[0, "img_path"] = "../outside.png"
    df.to_csv(csv, index=False)
    with pytest.raises(ValueError, match="outside the CSV's folder"):
        read_competition_csv(csv)


def test_image_folder_linked_beside_the_csv_is_inside_it(tmp_path):
    # ds/train_img -> a folder on another disk: the path does not climb out of ds.
    _, truth = make_competition(tmp_path / "disk")
    csv, _ = make_competition(tmp_path / "ds")
    shutil.rmtree(tmp_path / "ds" / "train_img")
    (tmp_path / "ds" / "train_img").symlink_to(tmp_path / "disk" / "train_img")
    records = read_competition_csv(csv)
    assert records[0].image_path == tmp_path / "ds" / "train_img" / "TRAIN_0000.png"
    np.testing.assert_array_equal(load_record(records[0])[0], truth[0][0])


def test_trailing_commas_are_dropped_and_extra_values_refused(tmp_path):
    # A trailing comma on every data row made pandas take img_id for the index and shift
    # every column by one.
    csv, truth = make_competition(tmp_path)
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join([lines[0]] + [line + "," for line in lines[1:]]) + "\n")
    records = read_competition_csv(csv)
    assert [r.img_id for r in records] == ["TRAIN_0000", "TRAIN_0001", "TRAIN_0002"]
    for r, (img, mask) in zip(records, truth, strict=True):
        got_img, got_mask = load_record(r)
        np.testing.assert_array_equal(got_img, img)
        np.testing.assert_array_equal(got_mask, mask)
    # A value past the header's columns belongs to no column.
    rows = [lines[0], lines[1] + ",", lines[2] + ",oops", lines[3] + ","]
    csv.write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=r"train\.csv, row 2: 1 value\(s\) past the header's 3"):
        read_competition_csv(csv)


def test_duplicate_and_empty_rle(tmp_path):
    csv, _ = make_competition(tmp_path)
    df = pd.read_csv(csv, dtype=str)
    df.loc[2, "img_id"] = "TRAIN_0000"
    df.to_csv(csv, index=False)
    with pytest.raises(ValueError, match=r"row 3: duplicate img_id 'TRAIN_0000' \(first at row 1"):
        read_competition_csv(csv)
    df.loc[2, "img_id"] = "TRAIN_0002"
    df.loc[1, "mask_rle"] = ""
    df.to_csv(csv, index=False)
    with pytest.raises(ValueError, match="empty mask_rle; an empty mask is written -1"):
        read_competition_csv(csv)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"img_id,img_path\nTEST_0,a.png\nTEST_1,b.png,extra\n", "Expected 2 fields in line 3"),
        (b"", "No columns to parse"),
        (b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "can't decode byte"),
    ],
    ids=["extra-field", "empty", "binary"],
)
def test_unparsable_csv_names_the_file(tmp_path, content, reason):
    # pandas' own errors name no file: a user with train.csv and test.csv could not tell which.
    csv = tmp_path / "test.csv"
    csv.write_bytes(content)
    with pytest.raises(ValueError, match=rf"test\.csv: not a readable CSV \(.*{reason}"):
        read_competition_csv(csv, with_masks=False)


def test_malformed_rle_names_image_and_row(tmp_path):
    csv, _ = make_competition(tmp_path)
    df = pd.read_csv(csv, dtype=str)
    df.loc[1, "mask_rle"] = "5 3 7"  # odd token count
    df.to_csv(csv, index=False)
    records = read_competition_csv(csv)
    with pytest.raises(ValueError, match=r"TRAIN_0001 .*CSV row 2\)"):
        load_record(records[1])


def test_rle_past_image_end(tmp_path):
    csv, _ = make_competition(tmp_path, size=8)
    df = pd.read_csv(csv, dtype=str)
    df.loc[0, "mask_rle"] = "60 10"  # 8x8 image has 64 pixels
    df.to_csv(csv, index=False)
    with pytest.raises(ValueError, match="TRAIN_0000"):
        load_record(read_competition_csv(csv)[0])


def test_corrupt_png(tmp_path):
    p = tmp_path / "bad.png"
    write_png(p, np.zeros((16, 16, 3), np.uint8))
    p.write_bytes(p.read_bytes()[:20])  # truncated
    with pytest.raises(ValueError, match=r"bad\.png: cannot decode"):
        read_image(p)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="cannot decode"):
        read_image(tmp_path / "text.png")


def test_grey_16bit_and_alpha_images(tmp_path):
    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    write_png(tmp_path / "gray.png", grey)
    np.testing.assert_array_equal(read_image(tmp_path / "gray.png"), np.dstack([grey] * 3))
    # A 16-bit image is stretched per band between the 2nd and 98th percentiles (rasterio).
    pytest.importorskip("rasterio")
    deep = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 200)[..., None].repeat(3, 2)
    cv2.imwrite(str(tmp_path / "deep.png"), deep)
    got = read_image(tmp_path / "deep.png")
    assert got.dtype == np.uint8 and got.shape == (16, 16, 3)
    assert got[0, 0, 0] == 0 and got[-1, -1, 0] == 255 and got[8, 0, 0] in range(120, 136)
    rgba = np.full((16, 16, 4), 255, np.uint8)
    cv2.imwrite(str(tmp_path / "opaque.png"), rgba)
    assert read_image(tmp_path / "opaque.png").shape == (16, 16, 3)
    rgba[0, 0, 3] = 0
    cv2.imwrite(str(tmp_path / "transparent.png"), rgba)
    with pytest.raises(ValueError, match="transparent"):
        read_image(tmp_path / "transparent.png")


def test_tiff_alpha_is_filled_once_as_in_a_png(tmp_path):
    # OpenCV returns a TIFF's colour premultiplied by its alpha: --alpha fill must give the
    # same pixels as the same RGBA saved as PNG, not the colour multiplied twice.
    from PIL import Image

    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[..., 3] = 255
    rgba[:4, :, 3] = 128
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.tif")  # unassociated alpha
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    fill = ReadOptions(alpha="fill")
    png = read_image(tmp_path / "a.png", fill)
    np.testing.assert_array_equal(read_image(tmp_path / "a.tif", fill), png)
    assert tuple(png[0, 0]) == (100, 50, 25) and tuple(png[7, 0]) == (200, 100, 50)
    with pytest.raises(ValueError, match="transparent"):
        read_image(tmp_path / "a.tif")


def test_tile_windows_cover_without_padding():
    wins = tile_windows(100, 70, 32)
    ys = sorted({w[0] for w in wins})
    xs = sorted({w[1] for w in wins})
    assert ys == [0, 32, 64, 68] and xs == [0, 32, 38]
    covered = np.zeros((100, 70), bool)
    for y, x, h, w in wins:
        assert (h, w) == (32, 32) and y + h <= 100 and x + w <= 70
        covered[y : y + h, x : x + w] = True
    assert covered.all()
    assert tile_windows(20, 20, 32) == [(0, 0, 20, 20)]


def test_folder_dataset_tiles_large_scenes(tmp_path):
    rng = np.random.default_rng(1)
    scene = rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)
    mask = (rng.random((80, 96)) > 0.5).astype(np.uint8) * 255
    write_png(tmp_path / "images" / "austin1.png", scene)
    write_png(tmp_path / "masks" / "austin1.png", mask)
    records = read_folder_dataset(tmp_path / "images", tmp_path / "masks", tile_size=32)
    assert len(records) == 3 * 3
    r = next(r for r in records if r.window == (48, 64, 32, 32))
    assert r.img_id == "austin1_y48_x64"
    img, m = load_record(r)
    np.testing.assert_array_equal(img, scene[48:80, 64:96])
    np.testing.assert_array_equal(m, (mask[48:80, 64:96] > 0).astype(np.uint8))


def test_images_smaller_than_the_tile_size_are_refused_naming_the_largest_that_fits(tmp_path):
    # An image smaller than --tile-size gave one smaller tile; the cache build then failed on
    # the mixed sizes and advised passing --tile-size, which had been passed.
    rng = np.random.default_rng(3)
    for name, (h, w) in {"a_big": (64, 64), "b_small": (48, 64), "c_smaller": (64, 40)}.items():
        write_png(tmp_path / "images" / f"{name}.png", rng.integers(0, 256, (h, w, 3), np.uint8))
        write_png(tmp_path / "masks" / f"{name}.png", np.zeros((h, w), np.uint8))
    with pytest.raises(ValueError) as e:
        read_folder_dataset(tmp_path / "images", tmp_path / "masks", tile_size=64)
    msg = str(e.value)
    assert str(tmp_path / "images" / "b_small.png") in msg and "is 48x64" in msg
    assert "2 of 3 images" in msg and "c_smaller.png (64x40)" in msg
    assert "--tile-size 40 or less" in msg
    records = read_folder_dataset(tmp_path / "images", tmp_path / "masks", tile_size=40)
    assert {r.window[2:] for r in records} == {(40, 40)}


def test_folder_dataset_errors(tmp_path):
    write_png(tmp_path / "images" / "a.png", np.zeros((16, 16, 3), np.uint8))
    (tmp_path / "masks").mkdir()
    with pytest.raises(FileNotFoundError, match=r"a\.png: no mask found .*tried a\.png"):
        read_folder_dataset(tmp_path / "images", tmp_path / "masks")
    write_png(tmp_path / "masks" / "a.png", np.zeros((8, 16), np.uint8))
    (r,) = read_folder_dataset(tmp_path / "images", tmp_path / "masks")
    with pytest.raises(ValueError, match="is 8x16 but the image is 16x16"):
        load_record(r)
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        read_folder_dataset(tmp_path / "nope")


def test_raster_files_folders_do_not_list_are_counted_not_skipped_silently(tmp_path):
    # An orthophoto folder of JPEG 2000 tiles: listing only the suffixes bldseg reads gave a
    # smaller dataset (or "no images") without saying why. Sidecars are not counted.
    images = tmp_path / "images"
    write_png(images / "a.png", np.zeros((16, 16, 3), np.uint8))
    for name in ("b.jp2", "c.JP2", "d.gif", "b.tfw", "a.aux.xml"):
        (images / name).write_bytes(b"x")
    with pytest.warns(
        UserWarning,
        match=r"3 files under .* raster format image folders do not list \(2 \.jp2, 1 \.gif;.*skip",
    ):
        (r,) = read_folder_dataset(images)
    assert r.image_path.name == "a.png"
    (images / "a.png").unlink()
    with pytest.raises(ValueError, match=r"no images with suffix .*; 3 files .*gdal_translate"):
        read_folder_dataset(images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_png(tmp_path / "plain" / "a.png", np.zeros((16, 16, 3), np.uint8))
        (tmp_path / "plain" / "a.tfw").write_bytes(b"x")
        read_folder_dataset(tmp_path / "plain")


@pytest.mark.parametrize(
    ("pattern", "match"),
    [
        (r"(\d+=>x", r"--mask-pattern '\(\\d\+=>x': not a valid REGEX=>REPLACEMENT: missing \)"),
        (r"(\d+)=>\2.png", "invalid group reference 2"),
        ("{stem}_{n}.png", r"--mask-pattern '\{stem\}_\{n\}\.png': \{stem\} is the only field"),
        ("{stem.png", r"--mask-pattern '\{stem\.png' has no \{stem\}"),
        ("{stem}}.png", "the only field"),
    ],
)
def test_bad_mask_pattern_is_refused_up_front(tmp_path, pattern, match):
    write_png(tmp_path / "images" / "t0.png", np.zeros((32, 32, 3), np.uint8))
    write_png(tmp_path / "masks" / "t0.png", np.zeros((32, 32), np.uint8))
    with pytest.raises(ValueError, match=match):
        read_folder_dataset(tmp_path / "images", tmp_path / "masks", mask_pattern=pattern)


def test_mask_pattern_mismatch_says_why(tmp_path):
    write_png(tmp_path / "images" / "t0.png", np.zeros((32, 32, 3), np.uint8))
    write_png(tmp_path / "masks" / "t0.png", np.zeros((32, 32), np.uint8))
    # The user's one regex gives no name for t0: the reason, not "(no pattern applies)".
    with pytest.raises(
        FileNotFoundError, match=r"no pattern applies \(.*'x\(\\d\)' does not match 't0'\)"
    ):
        read_folder_dataset(tmp_path / "images", tmp_path / "masks", mask_pattern=r"x(\d)=>\1.png")


def _plain_tiff(path: Path, bands: np.ndarray, **creation) -> Path:
    """Writes (C, H, W) uint8 bands as a TIFF without georeference, with rasterio."""
    rasterio = pytest.importorskip("rasterio")
    count, h, w = bands.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(
            path, "w", driver="GTiff", width=w, height=h, count=count, dtype="uint8", **creation
        ) as dst:
            dst.write(bands)
    return path


def _distinct_bands(count: int, size: int = 16) -> np.ndarray:
    """(count, size, size) uint8 bands that differ from each other, none of them opaque."""
    rng = np.random.default_rng(count)
    return rng.integers(0, 250, (count, size, size), dtype=np.uint8)


def test_grey_multiband_tiff_reads_its_bands(tmp_path):
    # OpenCV flattens a 3-band MINISBLACK TIFF to one grey band.
    bands = _distinct_bands(3)
    path = _plain_tiff(tmp_path / "grey3.tif", bands, photometric="MINISBLACK")
    np.testing.assert_array_equal(read_image(path), bands.transpose(1, 2, 0))
    np.testing.assert_array_equal(
        read_image(path, ReadOptions(bands=(3, 2, 1))), bands[::-1].transpose(1, 2, 0)
    )


def test_rgb_plus_unspecified_band_keeps_rgb(tmp_path):
    # The 4th band (near-infrared, say) is not declared alpha: OpenCV would take it for alpha
    # and refuse its "transparent" pixels, or composite the RGB with it.
    bands = _distinct_bands(4)
    path = _plain_tiff(tmp_path / "rgbn.tif", bands, photometric="RGB", alpha="UNSPECIFIED")
    rgb = bands[:3].transpose(1, 2, 0)
    np.testing.assert_array_equal(read_image(path), rgb)
    np.testing.assert_array_equal(read_image(path, ReadOptions(alpha="fill")), rgb)
    np.testing.assert_array_equal(
        read_image(path, ReadOptions(bands=(4, 1, 2))), bands[[3, 0, 1]].transpose(1, 2, 0)
    )


def test_declared_alpha_band_is_still_alpha(tmp_path):
    bands = _distinct_bands(4)
    path = _plain_tiff(tmp_path / "rgba.tif", bands, photometric="RGB", alpha="YES")
    with pytest.raises(ValueError, match="transparent pixel"):
        read_image(path)
    # Bands asked for by number are read as they are, alpha included.
    np.testing.assert_array_equal(
        read_image(path, ReadOptions(bands=(4,))), np.repeat(bands[3][..., None], 3, 2)
    )


TRANSPARENT = ["colour_trns", "grey_keyed", "clear_background", "pa_tiff"]


@pytest.mark.parametrize("name", TRANSPARENT)
def test_transparent_palette_entries_are_no_data(tmp_path, name):
    # A fully transparent palette entry is drawn as nothing: like NaN in a float mask it is
    # no data, read as background and counted, whatever colour or index it was given.
    c = write_transparent_palette_cases(tmp_path)[name]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read = read_mask_image(c.mask)
    assert read.binary
    np.testing.assert_array_equal(read.mask, c.truth)
    messages = [str(w.message) for w in caught]
    if c.warning is None:
        assert messages == []
    else:
        assert len(messages) == 1 and re.search(c.warning, messages[0]), messages
        assert messages[0].endswith("read as no building")


def test_transparent_palette_pixels_stay_out_of_named_values(tmp_path):
    # --mask-values names building indices; an index drawn transparent still holds no data.
    c = write_transparent_palette_cases(tmp_path)["colour_trns"]
    with pytest.warns(UserWarning, match=c.warning):
        read = read_mask_image(c.mask, ReadOptions(mask_values=(1, 2)))
    np.testing.assert_array_equal(read.mask, c.truth)


def test_palette_geotiff_nodata_index_is_no_data(tmp_path):
    pytest.importorskip("rasterio")
    c = write_palette_geotiff_nodata(tmp_path)
    with pytest.warns(UserWarning, match=c.warning):
        read = read_mask_image(c.mask)
    np.testing.assert_array_equal(read.mask, c.truth)
    # The whole path, as the cache decodes it.
    (r,) = read_folder_dataset(c.image.parent, c.mask.parent)
    with pytest.warns(UserWarning, match=c.warning):
        np.testing.assert_array_equal(load_record(r)[1], c.truth)


GEOTIFF_NODATA = [
    "u8_01_nd255",
    "u8_01_nd255_bigtiff",
    "u8_0255_nd0",
    "u16_01_nd65535",
    "f32_01_nd-9999",
    "f64_01_nd-9999",
    "f32_01_nd3.4e38",
    "rgb_01_nd255",
]


def _read_recording(path: Path, options: ReadOptions | None = None):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read = read_mask_image(path, options or ReadOptions())
    return read, [str(w.message) for w in caught]


@pytest.mark.parametrize("name", GEOTIFF_NODATA)
def test_geotiff_nodata_value_is_no_data(tmp_path, name):
    # Pixels holding a TIFF's GDAL nodata value are no data, as GDAL and rasterio mask them:
    # background, and out of the binary/threshold/label checks (0/1 + nodata 255 was refused
    # as a label mask, float nodata 3.4e38 moved the threshold past every building).
    pytest.importorskip("rasterio")
    c = write_geotiff_nodata_cases(tmp_path)[name]
    read, messages = _read_recording(c.mask)
    assert read.binary
    np.testing.assert_array_equal(read.mask, c.truth)
    if c.warning is None:
        assert messages == []
    else:
        assert len(messages) == 1 and re.search(c.warning, messages[0]), messages
        assert messages[0].endswith("read as no building")


def test_geotiff_nodata_with_named_values(tmp_path):
    # A nodata value the options do not read as building changes nothing: no warning; one
    # they do (every nonzero value, or a named value) is still no data.
    rasterio = pytest.importorskip("rasterio")
    c = write_geotiff_nodata_cases(tmp_path)["u8_01_nd255"]
    with rasterio.open(c.mask) as src:
        band = src.read(1)  # (H, W) 0/1, 255 in the strip
        profile = src.profile
    classes = np.where(band == 1, 2, band).astype(np.uint8)  # buildings 2, background 0
    classes[-4:] = 1  # a road class along the bottom
    with rasterio.open(tmp_path / "classes.tif", "w", **profile) as dst:
        dst.write(classes, 1)
    read, messages = _read_recording(tmp_path / "classes.tif", ReadOptions(mask_values=(2,)))
    np.testing.assert_array_equal(read.mask, (classes == 2).astype(np.uint8))
    assert messages == []
    read, messages = _read_recording(tmp_path / "classes.tif", ReadOptions(mask_values=(2, 255)))
    np.testing.assert_array_equal(read.mask, (classes == 2).astype(np.uint8))
    assert len(messages) == 1 and re.search(r"classes\.tif: 576 of 2304 .*nodata", messages[0])
    read, messages = _read_recording(c.mask, ReadOptions(mask_nonzero=True))
    np.testing.assert_array_equal(read.mask, c.truth)
    assert len(messages) == 1 and re.search(c.warning, messages[0]), messages
    # The whole path, as the cache decodes it.
    (r,) = read_folder_dataset(c.image.parent, c.mask.parent)
    with pytest.warns(UserWarning, match=c.warning):
        np.testing.assert_array_equal(load_record(r)[1], c.truth)


def test_geotiff_nodata_in_a_colour_mask_needs_every_band(tmp_path):
    # ISPRS-style colour classes (buildings blue, background white) with nodata 0: a pixel is
    # no data only where all its bands are 0, so the blue (0, 0, 255) buildings stay.
    _, m = scene(48, 0)
    rgb = np.where(m[None] > 0, np.array([0, 0, 255])[:, None, None], 255).astype(np.uint8)
    rgb[:, :12] = 0  # (3, H, W) the no-data strip, black
    path = _plain_tiff(tmp_path / "colour.tif", rgb, photometric="RGB", nodata=0)
    truth = ((rgb == np.array([0, 0, 255])[:, None, None]).all(axis=0)).astype(np.uint8)
    assert truth[12:].sum() > 0
    read, messages = _read_recording(path, ReadOptions(mask_colors=((0, 0, 255),)))
    np.testing.assert_array_equal(read.mask, truth)
    assert messages == []
    # Black named as a building colour: the no-data strip is still no building.
    read, messages = _read_recording(path, ReadOptions(mask_colors=((0, 0, 255), (0, 0, 0))))
    np.testing.assert_array_equal(read.mask, truth)
    assert len(messages) == 1 and "nodata value 0" in messages[0], messages

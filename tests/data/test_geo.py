"""Tests of bldseg.data.geo on tiny GeoTIFFs and footprint files made in tmp_path."""

import ast
import json
import re
import warnings
from pathlib import Path

import pytest

rasterio = pytest.importorskip("rasterio")
gpd = pytest.importorskip("geopandas")
pyproj = pytest.importorskip("pyproj")
shapely_geometry = pytest.importorskip("shapely.geometry")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from rasterio.transform import Affine  # noqa: E402

from bldseg.data import geo  # noqa: E402
from bldseg.data.readers import (  # noqa: E402
    check_mask_grid,
    decode_record,
    read_folder_dataset,
    read_image,
    read_mask_image,
)

UTM = "EPSG:32616"
# 1 m pixels; the upper-left corner sits on whole metres so pixel edges are whole UTM metres.
X0, Y0 = 733600.0, 3725200.0
TRANSFORM = Affine(1.0, 0.0, X0, 0.0, -1.0, Y0)
H, W = 40, 50
# Buildings as pixel rectangles (row0, col0, row1, col1), end-exclusive.
RECTS = [(5, 5, 15, 20), (20, 25, 35, 45)]
GEO_PACKAGES = ("rasterio", "geopandas", "pyogrio", "shapely", "pyproj")


def write_tif(
    path: Path,
    data: np.ndarray,
    *,
    crs: str | None = UTM,
    transform: Affine | None = TRANSFORM,
    nodata: float | None = None,
    **kw,
) -> Path:
    """Writes ``data`` (C, H, W) as a GeoTIFF; ``crs=None, transform=None`` gives a plain TIFF."""
    count, h, w = data.shape
    profile = dict(driver="GTiff", height=h, width=w, count=count, dtype=data.dtype.name)
    if crs is not None:
        profile.update(crs=crs, transform=transform)
    if nodata is not None:
        profile["nodata"] = nodata
    with warnings.catch_warnings():
        # Plain TIFFs are wanted here; rasterio warns that they have no geotransform.
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path, "w", **profile, **kw) as dst:
            dst.write(data)
    return path


def rect_mask(rects=RECTS, shape=(H, W)) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    for r0, c0, r1, c1 in rects:
        mask[r0:r1, c0:c1] = 1
    return mask


def utm_polygon(rect, dx: float = 0.0):
    """The UTM polygon of a pixel rectangle, optionally shifted east by ``dx`` metres."""
    r0, c0, r1, c1 = rect
    x0, x1 = X0 + c0 + dx, X0 + c1 + dx
    y0, y1 = Y0 - r1, Y0 - r0
    return shapely_geometry.box(x0, y0, x1, y1)


def to_wgs84(polys):
    """UTM polygons reprojected vertex by vertex to EPSG:4326 (lon, lat) with pyproj."""
    t = pyproj.Transformer.from_crs(UTM, "EPSG:4326", always_xy=True)
    out = []
    for p in polys:
        xs, ys = p.exterior.coords.xy
        lon, lat = t.transform(np.asarray(xs), np.asarray(ys))
        out.append(shapely_geometry.Polygon(zip(lon, lat, strict=True)))
    return out


@pytest.fixture
def scene(tmp_path) -> Path:
    """A 16-bit 3-band 40x50 GeoTIFF in EPSG:32616, 1 m pixels."""
    data = np.random.default_rng(0).integers(100, 3000, (3, H, W), dtype=np.uint16)
    return write_tif(tmp_path / "scene.tif", data)


@pytest.fixture
def footprints(tmp_path) -> Path:
    """The RECTS buildings as a GeoJSON in EPSG:4326."""
    polys = to_wgs84([utm_polygon(r) for r in RECTS])
    gdf = gpd.GeoDataFrame({"building": ["yes"] * len(polys)}, geometry=polys, crs="EPSG:4326")
    path = tmp_path / "buildings.geojson"
    gdf.to_file(path, driver="GeoJSON")
    return path


def assert_close_mask(ours: np.ndarray, expected: np.ndarray) -> None:
    """At most a 1-pixel boundary difference, IoU > 0.97, interiors exactly equal."""
    assert ours.shape == expected.shape and ours.dtype == np.uint8
    assert set(np.unique(ours)) <= {0, 1}
    inter = np.logical_and(ours, expected).sum()
    union = np.logical_or(ours, expected).sum()
    assert inter / union > 0.97
    kernel = np.ones((3, 3), np.uint8)
    inner = cv2.erode(expected, kernel, borderValue=0)
    outer = cv2.dilate(expected, kernel)
    assert np.all(ours[inner > 0] == 1), "a building interior pixel is missing"
    assert np.all(ours[outer == 0] == 0), "a pixel more than 1 px from any building is set"


# ---- read_raster_rgb: stretch, bands, window ------------------------------------------------


def test_stretch_hand_computed(tmp_path):
    # Band 1: 0..19 with 0 as nodata, so the valid values are 1..19 (19 of them). With
    # stretch (5, 80), numpy's linear percentiles sit at positions 0.05 * 18 = 0.9 and
    # 0.8 * 18 = 14.4 of the sorted values: lo = 1.9, hi = 15.4, so v -> (v - 1.9) * 255 / 13.5,
    # e.g. 3 -> 20.78 -> 21, 10 -> 153, 15 -> 247.44 -> 247, 16 -> 266 -> 255; nodata -> 0.
    # Had nodata been counted, lo would be 0.95 and every value would move.
    band1 = np.arange(20, dtype=np.uint16).reshape(4, 5)
    band2 = np.full((4, 5), 7, np.uint16)  # constant over its valid pixels -> 0
    band2[0, 0] = 0
    band3 = band1[::-1, ::-1].copy()  # 19..0: nodata at the bottom right
    path = write_tif(tmp_path / "s.tif", np.stack([band1, band2, band3]), nodata=0)
    rgb = geo.read_raster_rgb(path, stretch=(5.0, 80.0))
    expected = np.array(
        [
            [0, 0, 2, 21, 40],
            [59, 77, 96, 115, 134],
            [153, 172, 191, 210, 229],
            [247, 255, 255, 255, 255],
        ],
        np.uint8,
    )
    assert rgb.shape == (4, 5, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[..., 0], expected)
    np.testing.assert_array_equal(rgb[..., 1], 0)
    np.testing.assert_array_equal(rgb[..., 2], expected[::-1, ::-1])


def test_stretch_float_ignores_nan_and_replicates_grey(tmp_path):
    data = np.array([[[np.nan, 0.0, 1.0], [2.0, 3.0, 5.0]]], np.float32)  # (1, 2, 3)
    path = write_tif(tmp_path / "f.tif", data)
    rgb = geo.read_raster_rgb(path, stretch=(0.0, 100.0))  # lo 0, hi 5: v -> 51 v
    grey = np.array([[0, 0, 51], [102, 153, 255]], np.uint8)
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], grey)


def test_stretch_uses_the_whole_raster_not_the_window(tmp_path):
    data = np.random.default_rng(1).integers(0, 4000, (3, 30, 40), dtype=np.uint16)
    path = write_tif(tmp_path / "w.tif", data, nodata=0)
    full = geo.read_raster_rgb(path)
    tile = geo.read_raster_rgb(path, window=(5, 10, 12, 20))
    assert tile.shape == (12, 20, 3)
    np.testing.assert_array_equal(tile, full[5:17, 10:30])


def test_window_outside_the_raster(scene):
    with pytest.raises(ValueError, match=r"scene\.tif.*not inside the raster of 40x50"):
        geo.read_raster_rgb(scene, window=(30, 0, 20, 10))


def test_uint8_passes_through_unstretched(tmp_path):
    data = np.random.default_rng(2).integers(0, 256, (3, 6, 7), dtype=np.uint8)
    data[:, 0, 0] = 0
    path = write_tif(tmp_path / "u8.tif", data, nodata=0)
    rgb = geo.read_raster_rgb(path, stretch=(40.0, 60.0))
    np.testing.assert_array_equal(rgb, data.transpose(1, 2, 0))


def test_band_selection(tmp_path):
    data = np.stack([np.full((4, 5), 10 * (b + 1), np.uint8) for b in range(4)])  # 10..40
    path = write_tif(tmp_path / "four.tif", data)
    assert geo.read_raster_rgb(path)[0, 0].tolist() == [10, 20, 30]  # default: bands 1, 2, 3
    assert geo.read_raster_rgb(path, bands=(4, 3, 2))[0, 0].tolist() == [40, 30, 20]
    assert geo.read_raster_rgb(path, bands=(4,))[0, 0].tolist() == [40, 40, 40]


def _declared_bands_tif(path, colours: list[str]):
    """A 4-band uint8 GeoTIFF, band b holding 10 * b everywhere, whose bands declare
    ``colours`` (rasterio ColorInterp names); returns its path and the (4, 4, 5) data."""
    data = np.stack([np.full((4, 5), 10 * (b + 1), np.uint8) for b in range(4)])  # 10..40
    write_tif(path, data, photometric="MINISBLACK")
    with rasterio.open(path, "r+") as dst:
        dst.colorinterp = [rasterio.enums.ColorInterp[c] for c in colours]
    return path, data


def test_declared_colour_bands_are_the_default(tmp_path):
    # A BGR+NIR GeoTIFF declaring its bands (blue, green, red, undefined), as some sensors'
    # products are written: read without --bands it is RGB by its declarations, not bands
    # 1, 2, 3 (which would swap red and blue silently); --bands still wins.
    color = rasterio.enums.ColorInterp
    path, data = _declared_bands_tif(tmp_path / "bgrn.tif", ["blue", "green", "red", "undefined"])
    assert geo.read_raster_rgb(path)[0, 0].tolist() == [30, 20, 10]
    assert read_image(path)[0, 0].tolist() == [30, 20, 10]
    assert geo.read_raster_rgb(path, bands=(1, 2, 3))[0, 0].tolist() == [10, 20, 30]
    # NIR first (undefined, blue, green, red), 16-bit, nodata 0 in the NIR band only:
    # valid_pixels looks at the bands read, so the NIR gap is no gap in the image
    nbgr = np.random.default_rng(4).integers(1, 5000, (4, 4, 5), dtype=np.uint16)
    nbgr[0, 1, 1] = 0
    wide = write_tif(tmp_path / "nbgr16.tif", nbgr, nodata=0, photometric="MINISBLACK")
    with rasterio.open(wide, "r+") as dst:
        dst.colorinterp = [color.undefined, color.blue, color.green, color.red]
    np.testing.assert_array_equal(
        geo.read_raster_rgb(wide), geo.read_raster_rgb(wide, bands=(4, 3, 2))
    )
    assert geo.valid_pixels(wide) is None
    assert not geo.valid_pixels(wide, bands=(1, 2, 3))[1, 1]
    # undeclared (grey, undefined) bands keep the 1, 2, 3 default
    plain = write_tif(tmp_path / "plain.tif", data, photometric="MINISBLACK")
    assert geo.read_raster_rgb(plain)[0, 0].tolist() == [10, 20, 30]


def test_a_colour_declared_twice_is_no_rgb_declaration(tmp_path):
    # (red, red, green, blue) holds red, green and blue, but not each once: which red is red
    # is unknown, so the bands are read as undeclared ones (1, 2, 3), not as bands 1, 3, 4
    path, _ = _declared_bands_tif(tmp_path / "rrgb.tif", ["red", "red", "green", "blue"])
    assert geo.read_raster_rgb(path)[0, 0].tolist() == [10, 20, 30]


def test_four_band_16bit_default_bands(tmp_path):
    rng = np.random.default_rng(3)
    data = rng.integers(1, 5000, (4, 8, 9), dtype=np.uint16)
    four = write_tif(tmp_path / "four16.tif", data)
    three = write_tif(tmp_path / "three16.tif", data[:3])
    np.testing.assert_array_equal(geo.read_raster_rgb(four), geo.read_raster_rgb(three))
    nir = geo.read_raster_rgb(four, bands=(4,))
    np.testing.assert_array_equal(nir, geo.read_raster_rgb(four, bands=(4, 4, 4)))


@pytest.mark.parametrize(
    ("bands", "message"),
    [
        ((5,), r"band\(s\) \[5\] out of range: the raster has 4 band\(s\).*--bands"),
        ((0, 1, 2), r"band\(s\) \[0\] out of range.*--bands"),
        ((1, 2), r"--bands takes 1 \(grey\) or 3 \(RGB\)"),
    ],
)
def test_band_errors(tmp_path, bands, message):
    path = write_tif(tmp_path / "four.tif", np.zeros((4, 4, 5), np.uint16))
    with pytest.raises(ValueError, match=r"four\.tif: " + message):
        geo.read_raster_rgb(path, bands=bands)


def test_two_bands_need_a_choice(tmp_path):
    path = write_tif(tmp_path / "two.tif", np.ones((2, 4, 5), np.uint16))
    with pytest.raises(ValueError, match=r"two\.tif: the raster has 2 bands.*--bands"):
        geo.read_raster_rgb(path)
    assert geo.read_raster_rgb(path, bands=(2,)).shape == (4, 5, 3)


def test_unreadable_and_missing_files(tmp_path):
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"not a tiff")
    with pytest.raises(ValueError, match=r"bad\.tif: cannot read this file as a raster"):
        geo.read_raster_rgb(bad)
    with pytest.raises(FileNotFoundError, match=r"gone\.tif"):
        geo.read_raster_rgb(tmp_path / "gone.tif")


@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
def test_truncated_geotiff_names_the_file(tmp_path, dtype):
    # The header survives, so the file opens; the pixels fail to read (uint16: while the
    # stretch limits are computed, uint8: in the read itself).
    data = np.random.default_rng(0).integers(0, 250, (3, H, W)).astype(dtype)
    path = write_tif(tmp_path / "cut.tif", data)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(
        ValueError, match=r"cut\.tif: cannot read the pixels .*truncated or corrupt"
    ):
        geo.read_raster_rgb(path)
    with pytest.raises(ValueError, match=r"cut\.tif: cannot read the pixels"):
        read_image(path)


PALETTE = {
    0: (200, 30, 30, 255),
    1: (30, 200, 30, 255),
    2: (30, 30, 200, 255),
    3: (250, 250, 250, 255),
}


def write_palette_tif(path: Path, indices: np.ndarray) -> Path:
    """(H, W) uint8 indices as a one-band GeoTIFF with the PALETTE colour table."""
    h, w = indices.shape
    profile = dict(driver="GTiff", width=w, height=h, count=1, dtype="uint8", crs=UTM)
    with rasterio.open(path, "w", photometric="palette", transform=TRANSFORM, **profile) as dst:
        dst.write(indices, 1)
        dst.write_colormap(1, PALETTE)
    return path


def test_palette_geotiff_image_is_read_as_its_colours(tmp_path):
    indices = np.random.default_rng(0).integers(0, 4, (H, W)).astype(np.uint8)
    path = write_palette_tif(tmp_path / "classes.tif", indices)
    lut = np.array([PALETTE[i][:3] for i in range(4)], np.uint8)  # (4, 3)
    np.testing.assert_array_equal(read_image(path), lut[indices])
    window = geo.read_raster_rgb(path, window=(3, 4, 10, 12))
    np.testing.assert_array_equal(window, lut[indices[3:13, 4:16]])


def test_palette_geotiff_mask_reads_like_the_same_palette_png(tmp_path):
    from PIL import Image

    truth = rect_mask()
    path = write_palette_tif(tmp_path / "mask.tif", truth)
    png = Image.fromarray(truth, "P")
    png.putpalette([v for i in range(4) for v in PALETTE[i][:3]])
    png.save(tmp_path / "mask.png")
    read = read_mask_image(path)
    np.testing.assert_array_equal(read.mask, read_mask_image(tmp_path / "mask.png").mask)
    np.testing.assert_array_equal(read.mask, truth)  # a colour palette: the index is the label


def test_raster_size_and_georeference(scene, tmp_path):
    assert geo.raster_size(scene) == (H, W)
    assert geo.has_georeference(scene)
    plain = write_tif(tmp_path / "plain.tif", np.zeros((3, 4, 5), np.uint8), crs=None)
    assert not geo.has_georeference(plain)
    assert not geo.has_georeference(tmp_path / "x.png")  # not a TIFF: no file needed


# ---- a mask GeoTIFF on its image's grid ----------------------------------------------------------


def _image_and_mask(tmp_path: Path, **mask_geo) -> tuple[Path, Path]:
    """images/a.tif (uint8 RGB on TRANSFORM) + masks/a.tif (0/255) georeferenced by ``mask_geo``."""
    (tmp_path / "images").mkdir(parents=True, exist_ok=True)
    (tmp_path / "masks").mkdir(exist_ok=True)
    rgb = np.random.default_rng(1).integers(0, 255, (3, H, W), dtype=np.uint8)
    image = write_tif(tmp_path / "images" / "a.tif", rgb)
    mask = write_tif(tmp_path / "masks" / "a.tif", rect_mask()[None] * np.uint8(255), **mask_geo)
    return image, mask


@pytest.mark.parametrize(
    "mask_geo, match",
    [
        # a tile cut 100 px east of the image
        (
            dict(transform=Affine(1.0, 0.0, X0 + 100, 0.0, -1.0, Y0)),
            r"pixel \(0, 0\) lies at column 100, row 0 of the image",
        ),
        # the same numbers in another CRS (the next UTM zone)
        (dict(crs="EPSG:32617"), r"it is in another CRS.*EPSG:32616.*EPSG:32617"),
        # half-metre pixels: the origin agrees, the far corner lies 25 px off
        (dict(transform=Affine(0.5, 0.0, X0, 0.0, -0.5, Y0)), "pixel size or rotation differs"),
    ],
)
def test_a_mask_georeferenced_elsewhere_is_refused_naming_both_grids(tmp_path, mask_geo, match):
    image, mask = _image_and_mask(tmp_path, **mask_geo)
    with pytest.raises(ValueError, match=match) as e:
        geo.check_mask_grid(image, mask)
    msg = str(e.value)
    assert f"mask {mask} " in msg and f"its image {image} " in msg
    assert f"origin ({X0:.12g}, {Y0:.12g}), pixel size 1 x 1, CRS EPSG:32616" in msg
    assert "gdalwarp -t_srs EPSG:32616" in msg and f"-ts {W} {H}" in msg
    assert f"gdal_edit.py -unsetgt -unsetsrs {mask}" in msg
    # the cache build (and so training) refuses it, naming the sample
    records = read_folder_dataset(tmp_path / "images", tmp_path / "masks")
    with pytest.raises(ValueError, match=rf"^a \({re.escape(str(image))}\): mask .*{match}"):
        decode_record(records[0])
    # the check predict --masks calls, and predict's own (before predicting, and when scoring)
    with pytest.raises(ValueError, match=match):
        check_mask_grid(image, mask)
    from bldseg.predict import _check_mask_size

    with pytest.raises(ValueError, match=match):
        _check_mask_size(mask, (H, W), image, (H, W))


def test_a_cache_built_before_the_grid_check_is_checked_when_it_gains_its_record(
    tmp_path, monkeypatch
):
    # A cache an older bldseg built from a mask georeferenced elsewhere stays current (same
    # sources): it is checked, headers only, when it gains its read-options record.
    import bldseg.data.readers as readers
    from bldseg.data.cache import READ_OPTIONS_KEY, ensure_cache

    _image_and_mask(tmp_path, transform=Affine(1.0, 0.0, X0 + 100, 0.0, -1.0, Y0))
    records = read_folder_dataset(tmp_path / "images", tmp_path / "masks")
    with monkeypatch.context() as m:  # built as an older bldseg did: no grid check
        m.setattr(readers, "check_mask_grid", lambda *a: None)
        cache = ensure_cache(records, tmp_path / "cache", progress=False)
    manifest_path = cache.root / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest[READ_OPTIONS_KEY]  # and without the record
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"^a \(.*a\.tif\): mask .* lies at column 100"):
        ensure_cache(records, tmp_path / "cache", progress=False)
    assert READ_OPTIONS_KEY not in json.loads(manifest_path.read_text())


@pytest.mark.parametrize(
    "mask_geo",
    [
        {},  # the image's own grid
        # rounded in the last digits, as GeoTIFF writers do
        dict(transform=Affine(1.0 + 1e-12, 0.0, X0 + 1e-6, 0.0, -1.0, Y0 - 1e-6)),
        dict(crs=None),  # no georeference: used pixel for pixel, as before
    ],
)
def test_a_mask_on_its_image_grid_or_without_georeference_is_read(tmp_path, mask_geo):
    image, mask = _image_and_mask(tmp_path, **mask_geo)
    geo.check_mask_grid(image, mask)
    check_mask_grid(image, mask)
    records = read_folder_dataset(tmp_path / "images", tmp_path / "masks")
    np.testing.assert_array_equal(decode_record(records[0]).mask, rect_mask())


def test_a_georeferenced_mask_of_a_plain_image_is_read(tmp_path):
    # nothing says where the image lies: the mask is used pixel for pixel, as before
    (tmp_path / "images").mkdir()
    cv2.imwrite(str(tmp_path / "images" / "a.png"), np.zeros((H, W, 3), np.uint8))
    _, mask = _image_and_mask(tmp_path / "x", transform=Affine(1.0, 0.0, X0 + 100, 0.0, -1.0, Y0))
    (tmp_path / "masks").mkdir()
    mask.rename(tmp_path / "masks" / "a.tif")
    records = read_folder_dataset(tmp_path / "images", tmp_path / "masks")
    np.testing.assert_array_equal(decode_record(records[0]).mask, rect_mask())


def test_reading_a_georeferenced_uint8_mask_prints_no_libtiff_warnings(tmp_path, capfd):
    _, mask = _image_and_mask(tmp_path)
    before = cv2.utils.logging.getLogLevel()
    capfd.readouterr()
    np.testing.assert_array_equal(read_mask_image(mask).mask, rect_mask())
    err = capfd.readouterr().err
    assert "TIFF_Warning" not in err and "Unknown field" not in err, err
    # the user's OpenCV log level is back
    assert cv2.utils.logging.getLogLevel() == before


# ---- needs_raster_reader ------------------------------------------------------------------------


@pytest.fixture
def tiffs(tmp_path) -> dict[str, Path]:
    z = np.zeros
    return {
        "rgb8": write_tif(tmp_path / "rgb8.tif", z((3, 4, 5), np.uint8), crs=None),
        "grey8": write_tif(tmp_path / "grey8.tif", z((1, 4, 5), np.uint8), crs=None),
        "rgba8": write_tif(tmp_path / "rgba8.tif", z((4, 4, 5), np.uint8), crs=None),
        "geo8": write_tif(tmp_path / "geo8.tif", z((3, 4, 5), np.uint8)),
        "two8": write_tif(tmp_path / "two8.tif", z((2, 4, 5), np.uint8), crs=None),
        "five8": write_tif(tmp_path / "five8.tif", z((5, 4, 5), np.uint8), crs=None),
        "u16": write_tif(tmp_path / "u16.tif", z((3, 4, 5), np.uint16), crs=None),
        "f32": write_tif(tmp_path / "f32.tif", z((1, 4, 5), np.float32), crs=None),
        "big16": write_tif(
            tmp_path / "big16.tif", z((3, 4, 5), np.uint16), crs=None, BIGTIFF="YES"
        ),
        "big8": write_tif(tmp_path / "big8.tif", z((3, 4, 5), np.uint8), crs=None, BIGTIFF="YES"),
        # Bands OpenCV misreads: a grey (MINISBLACK) 3-band TIFF, RGB + a band not alpha.
        "grey3": write_tif(
            tmp_path / "grey3.tif", z((3, 4, 5), np.uint8), crs=None, photometric="MINISBLACK"
        ),
        "rgbn8": write_tif(
            tmp_path / "rgbn8.tif",
            z((4, 4, 5), np.uint8),
            crs=None,
            photometric="RGB",
            alpha="UNSPECIFIED",
        ),
    }


NEEDS = {"rgb8": False, "grey8": False, "rgba8": False, "two8": True, "five8": True}
NEEDS |= {"u16": True, "f32": True, "big16": True, "big8": False}
# Without rasterio OpenCV's reading of these is kept; with it they need the raster reader.
MISREAD = ("grey3", "rgbn8")


def test_needs_raster_reader(tiffs, tmp_path):
    for name, expected in {**NEEDS, "geo8": True, **dict.fromkeys(MISREAD, True)}.items():
        assert geo.needs_raster_reader(tiffs[name]) is expected, name
        # Bands asked for are always read with rasterio.
        assert geo.needs_raster_reader(tiffs[name], bands=(1,)) is True, name
    assert geo.needs_raster_reader(tmp_path / "photo.png") is False


def without(monkeypatch, *missing: str) -> None:
    """Makes geo's import helper fail for ``missing`` packages (and their submodules)."""
    real = geo._import_optional

    def fake(name: str):
        if name.split(".")[0] in missing:
            raise ImportError(f"No module named {name!r}")
        return real(name)

    monkeypatch.setattr(geo, "_import_optional", fake)


def test_needs_raster_reader_without_rasterio(tiffs, tmp_path, monkeypatch):
    without(monkeypatch, "rasterio")
    # The header alone decides; georeference cannot matter without rasterio.
    for name, expected in {**NEEDS, "geo8": False, **dict.fromkeys(MISREAD, False)}.items():
        assert geo.needs_raster_reader(tiffs[name]) is expected, name
        # With bands, only files OpenCV misreads (or cannot read) need rasterio.
        misread = expected or name in MISREAD
        assert geo.needs_raster_reader(tiffs[name], bands=(1, 2, 3)) is misread, name
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"junk")
    assert geo.needs_raster_reader(junk) is False  # left to the plain decoder to report


def test_bands_of_a_misread_tiff_without_rasterio_ask_for_the_extra(tiffs, monkeypatch):
    from bldseg.data.readers import ReadOptions, read_image

    without(monkeypatch, "rasterio")
    for name in MISREAD:
        with pytest.raises(ImportError, match=re.escape(geo._PIP_HINT)) as e:
            read_image(tiffs[name], ReadOptions(bands=(1, 2, 3)))
        assert str(tiffs[name]) in str(e.value) and "--bands 1,2,3" in str(e.value)
    # A plain RGB TIFF still reads its bands with OpenCV.
    assert read_image(tiffs["rgb8"], ReadOptions(bands=(3, 2, 1))).shape == (4, 5, 3)


# ---- rasterize_footprints -----------------------------------------------------------------------


def test_footprints_reprojected_from_wgs84(scene, footprints):
    ours = geo.rasterize_footprints(scene, footprints)
    assert_close_mask(ours, rect_mask())


def test_footprints_shapefile_and_geopackage_agree(scene, footprints, tmp_path):
    reference = geo.rasterize_footprints(scene, footprints)
    gdf = gpd.read_file(footprints)
    for name in ("b.shp", "b.gpkg"):
        gdf.to_file(tmp_path / name)
        np.testing.assert_array_equal(geo.rasterize_footprints(scene, tmp_path / name), reference)


def test_footprints_ignore_points_and_split_multipolygons(scene, tmp_path):
    multi = shapely_geometry.MultiPolygon([utm_polygon(r) for r in RECTS])
    point = shapely_geometry.Point(X0 + 2, Y0 - 2)
    gdf = gpd.GeoDataFrame(geometry=[multi, point], crs=UTM)
    gdf.to_file(tmp_path / "mixed.gpkg")
    assert_close_mask(geo.rasterize_footprints(scene, tmp_path / "mixed.gpkg"), rect_mask())


def test_footprints_keep_holes(scene, tmp_path):
    outer = utm_polygon((5, 5, 25, 25)).exterior.coords
    hole = utm_polygon((10, 10, 20, 20)).exterior.coords
    gdf = gpd.GeoDataFrame(geometry=[shapely_geometry.Polygon(outer, [hole])], crs=UTM)
    gdf.to_file(tmp_path / "courtyard.gpkg")
    ours = geo.rasterize_footprints(scene, tmp_path / "courtyard.gpkg")
    expected = rect_mask([(5, 5, 25, 25)])
    expected[10:20, 10:20] = 0
    assert_close_mask(ours, expected)


def test_footprints_all_touched_covers_more(scene, tmp_path):
    # A 0.5 m box inside one pixel misses its centre: only all_touched burns it.
    box = shapely_geometry.box(X0 + 3.1, Y0 - 2.9, X0 + 3.4, Y0 - 2.6)
    gpd.GeoDataFrame(geometry=[box], crs=UTM).to_file(tmp_path / "tiny.gpkg")
    assert geo.rasterize_footprints(scene, tmp_path / "tiny.gpkg").sum() == 0
    touched = geo.rasterize_footprints(scene, tmp_path / "tiny.gpkg", all_touched=True)
    assert touched.sum() == 1 and touched[2, 3] == 1


def test_empty_footprint_file_gives_zeros(scene, tmp_path):
    empty = tmp_path / "empty.geojson"
    empty.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    mask = geo.rasterize_footprints(scene, empty)
    assert mask.shape == (H, W) and mask.dtype == np.uint8 and not mask.any()


def test_footprints_elsewhere_name_both_files(scene, tmp_path):
    far = to_wgs84([utm_polygon(r, dx=10_000.0) for r in RECTS])  # 10 km east
    gpd.GeoDataFrame(geometry=far, crs="EPSG:4326").to_file(tmp_path / "far.geojson")
    with pytest.raises(
        ValueError, match=r"far\.geojson.*scene\.tif.*outside the extent of the 2.*check the CRS"
    ):
        geo.rasterize_footprints(scene, tmp_path / "far.geojson")


def test_scene_without_buildings_inside_the_footprints_extent_gives_zeros(scene, tmp_path):
    # One footprint file for a whole city: buildings west and east of the scene, none on it.
    # The scene lies inside the file's extent, so it is a scene without buildings, not a
    # wrong CRS.
    around = [utm_polygon((5, 5, 15, 20), dx=-1_000.0), utm_polygon((5, 5, 15, 20), dx=1_000.0)]
    gpd.GeoDataFrame(geometry=around, crs=UTM).to_file(tmp_path / "city.geojson")
    mask = geo.rasterize_footprints(scene, tmp_path / "city.geojson")
    assert mask.shape == (H, W) and mask.dtype == np.uint8 and not mask.any()


@pytest.mark.filterwarnings("ignore:'crs' was not provided:UserWarning")
def test_footprints_without_crs(scene, tmp_path):
    polys = [utm_polygon(r) for r in RECTS]
    gpd.GeoDataFrame(geometry=polys).to_file(tmp_path / "nocrs.shp")  # no .prj
    assert gpd.read_file(tmp_path / "nocrs.shp").crs is None
    assert_close_mask(geo.rasterize_footprints(scene, tmp_path / "nocrs.shp"), rect_mask())
    # The same shapes in lon/lat without a CRS cannot lie on the image: an error, not zeros.
    gpd.GeoDataFrame(geometry=to_wgs84(polys)).to_file(tmp_path / "lonlat.shp")
    with pytest.raises(ValueError, match=r"lonlat\.shp.*scene\.tif.*has no CRS.*do not overlap"):
        geo.rasterize_footprints(scene, tmp_path / "lonlat.shp")


def test_footprints_only_points_is_an_error(scene, tmp_path):
    points = [shapely_geometry.Point(X0 + 5, Y0 - 5), shapely_geometry.Point(X0 + 9, Y0 - 9)]
    gpd.GeoDataFrame(geometry=points, crs=UTM).to_file(tmp_path / "points.gpkg")
    with pytest.raises(ValueError, match=r"points\.gpkg.*scene\.tif.*no polygons.*Point"):
        geo.rasterize_footprints(scene, tmp_path / "points.gpkg")


def test_footprints_need_a_georeferenced_image(footprints, tmp_path):
    plain = write_tif(tmp_path / "plain.tif", np.zeros((3, H, W), np.uint8), crs=None)
    with pytest.raises(ValueError, match=r"buildings\.geojson.*plain\.tif.*no CRS/geotransform"):
        geo.rasterize_footprints(plain, footprints)


# ---- write_geotiff_mask -------------------------------------------------------------------------


def test_write_geotiff_mask_round_trip(scene, tmp_path):
    out_dir = tmp_path / "pred"
    out = out_dir / "scene_mask.tif"
    geo.write_geotiff_mask(rect_mask(), out, like=scene)
    geo.write_geotiff_mask(rect_mask() == 1, out, like=scene)  # replaces; bool is accepted
    assert [p.name for p in out_dir.iterdir()] == ["scene_mask.tif"]  # no temporary left
    with rasterio.open(out) as dst, rasterio.open(scene) as src:
        assert dst.count == 1 and dst.dtypes == ("uint8",)
        assert dst.crs == src.crs and dst.transform == src.transform
        np.testing.assert_array_equal(dst.read(1), rect_mask() * 255)


def test_valid_pixels_none_without_nodata_else_where_the_read_bands_have_data(scene, tmp_path):
    assert geo.valid_pixels(scene) is None  # no nodata, mask or alpha: nothing read
    data = np.full((3, 8, 10), 50, np.uint16)
    data[0, 0, :3] = 9  # nodata in band 1 only
    data[2, 5, 5] = 9  # and in band 3
    path = tmp_path / "nd.tif"
    with rasterio.open(
        path, "w", driver="GTiff", height=8, width=10, count=3, dtype="uint16", nodata=9
    ) as dst:
        dst.write(data)
    valid = geo.valid_pixels(path)
    assert valid.shape == (8, 10) and (~valid).sum() == 4 and not valid[5, 5]
    assert geo.valid_pixels(path, bands=(2,)) is None  # band 2 has no nodata pixel
    assert (~geo.valid_pixels(path, bands=(1,))).sum() == 3


def test_write_geotiff_mask_rejects_bad_masks(scene, tmp_path):
    out = tmp_path / "m.tif"
    with pytest.raises(ValueError, match=r"m\.tif: the mask is 10x10 but .*scene\.tif is 40x50"):
        geo.write_geotiff_mask(np.zeros((10, 10), np.uint8), out, like=scene)
    with pytest.raises(ValueError, match=r"0/1 or 0/255, got values in \[0, 2\]"):
        geo.write_geotiff_mask(rect_mask() * 2, out, like=scene)
    assert list(tmp_path.glob("*m.tif*")) == []


# ---- without the geo extra ----------------------------------------------------------------------


def test_module_imports_no_geo_package_at_top_level():
    tree = ast.parse(Path(geo.__file__).read_text())
    top = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            top.add(node.module.split(".")[0])
    assert not top & set(GEO_PACKAGES)


def test_missing_extra_raises_with_the_pip_hint(scene, footprints, monkeypatch):
    hint = re.escape("needs the optional geo extra: pip install 'bldseg[geo]'")
    without(monkeypatch, "geopandas")
    assert geo.geo_available()  # rasterio alone is enough for rasters
    with pytest.raises(ImportError, match=rf"buildings\.geojson: reading footprints {hint}"):
        geo.rasterize_footprints(scene, footprints)

    without(monkeypatch, "rasterio")
    assert not geo.geo_available()
    with pytest.raises(ImportError, match=rf"^x\.tif: reading GeoTIFF {hint}"):
        geo.require_geo("x.tif: reading GeoTIFF")
    calls = [
        lambda: geo.read_raster_rgb(scene),
        lambda: geo.raster_size(scene),
        lambda: geo.has_georeference(scene),
        lambda: geo.write_geotiff_mask(rect_mask(), scene.with_name("m.tif"), like=scene),
        lambda: geo.rasterize_footprints(scene, footprints),
    ]
    for call in calls:
        with pytest.raises(ImportError, match=rf"\.(tif|geojson): .*{hint}"):
            call()

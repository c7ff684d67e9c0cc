"""A folder of GeoTIFF scenes + footprint polygons, end to end into the cache (bldseg[geo])."""

import json
import os
import time

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
gpd = pytest.importorskip("geopandas")

from rasterio.transform import Affine  # noqa: E402

from bldseg.data import cache as cache_module  # noqa: E402
from bldseg.data import geo  # noqa: E402
from bldseg.data.prepare import DataOptions, prepare_data  # noqa: E402
from bldseg.data.readers import ReadOptions  # noqa: E402
from tests.data.test_geo import (  # noqa: E402
    RECTS,
    H,
    W,
    assert_close_mask,
    rect_mask,
    to_wgs84,
    utm_polygon,
    write_tif,
)


def _geo_dataset(root):
    """images/scene{0,1}.tif (uint16, 4 bands, UTM) + footprints/scene{0,1}.geojson (WGS84)."""
    rng = np.random.default_rng(3)
    (root / "images").mkdir(parents=True)
    (root / "footprints").mkdir()
    for i in range(2):
        data = rng.integers(200, 4000, (4, H, W), dtype=np.uint16)
        write_tif(root / "images" / f"scene{i}.tif", data)
        polys = to_wgs84([utm_polygon(r) for r in RECTS[i:]])
        gdf = gpd.GeoDataFrame(geometry=polys, crs="EPSG:4326")
        gdf.to_file(root / "footprints" / f"scene{i}.geojson", driver="GeoJSON")
    return root


def test_geotiff_scenes_with_footprints(tmp_path, capsys):
    root = _geo_dataset(tmp_path / "ds")
    data = prepare_data(
        root,
        options=DataOptions(tile_size=20, read=ReadOptions(bands=(3, 2, 1))),
        data_root=tmp_path / "w",
        progress=False,
        verbose=True,
    )
    assert "footprints" in capsys.readouterr().out
    cache = data.train
    # 40x50 scenes in 20-px tiles: rows 0, 20; columns 0, 20, 30.
    assert len(cache) == 2 * 6 and cache.image_size == (20, 20)
    assert len(set(cache.groups)) == 2
    # Reassemble scene 0's mask and image from its tiles.
    mask = np.zeros((H, W), np.uint8)
    image = np.zeros((H, W, 3), np.uint8)
    for k, src in enumerate(cache.sources[:6]):
        y, x, h, w = src["window"]
        mask[y : y + h, x : x + w] = cache.masks[k]
        image[y : y + h, x : x + w] = cache.images[k]
    assert_close_mask(mask, rect_mask(RECTS))
    expected = geo.read_raster_rgb(root / "images" / "scene0.tif", bands=(3, 2, 1))
    np.testing.assert_array_equal(image, expected)


def test_one_vector_file_for_every_scene(tmp_path):
    root = _geo_dataset(tmp_path / "ds")
    everything = gpd.GeoDataFrame(
        geometry=to_wgs84([utm_polygon(r) for r in RECTS]), crs="EPSG:4326"
    )
    everything.to_file(tmp_path / "all.gpkg", driver="GPKG")
    opts = DataOptions(images=str(root / "images"), footprints=str(tmp_path / "all.gpkg"))
    cache = prepare_data(None, options=opts, data_root=tmp_path / "w", progress=False).train
    assert len(cache) == 2 and cache.image_size == (H, W)
    for k in range(2):  # both scenes share one footprint: the file covers both
        assert_close_mask(np.asarray(cache.masks[k]), rect_mask(RECTS))


def test_missing_footprint_file_names_the_image(tmp_path):
    root = _geo_dataset(tmp_path / "ds")
    (root / "footprints" / "scene1.geojson").unlink()
    with pytest.raises(FileNotFoundError, match=r"scene1\.tif: no footprint file .*scene1\.gpkg"):
        prepare_data(root, data_root=tmp_path / "w", progress=False)


def test_mask_flags_with_footprints_are_refused(tmp_path):
    # footprints are rasterised to 0/1: --mask-threshold/--mask-values were ignored unsaid
    root = _geo_dataset(tmp_path / "ds")
    for read, said in (
        (ReadOptions(mask_threshold=0.9), r"^--mask-threshold: the labels are vector footprints"),
        (
            ReadOptions(mask_values=(2,), mask_colors=((255, 0, 0),)),
            r"^--mask-values, --mask-colors: ",
        ),
    ):
        with pytest.raises(ValueError, match=said):
            prepare_data(root, options=DataOptions(read=read), data_root=tmp_path / "w")
    assert not (tmp_path / "w" / "cache").exists()


def test_an_edited_georeference_sidecar_rebuilds_the_masks(tmp_path, monkeypatch):
    # A PNG's georeference lives in a.png.aux.xml: editing it moves the burnt footprints, and
    # the cache, which checked only the image and the polygons, served the old masks unsaid.
    (tmp_path / "images").mkdir()
    image = tmp_path / "images" / "a.png"
    pixels = np.random.default_rng(0).integers(0, 255, (3, 64, 64), dtype=np.uint8)
    profile = dict(driver="PNG", width=64, height=64, count=3, dtype="uint8")
    origin = Affine(0.5, 0, 500000, 0, -0.5, 4000000)  # 0.5 m pixels, UTM 16N
    with rasterio.open(image, "w", **profile, crs="EPSG:32616", transform=origin) as dst:
        dst.write(pixels)
    aux = tmp_path / "images" / "a.png.aux.xml"
    assert aux.is_file()
    square = [[500005, 3999995], [500015, 3999995], [500015, 3999985], [500005, 3999985]]
    (tmp_path / "fp.geojson").write_text(
        json.dumps(
            {
                "type": "FeatureCollection",
                "crs": {"type": "name", "properties": {"name": "EPSG:32616"}},
                "features": [
                    {
                        "type": "Feature",
                        "properties": {},
                        "geometry": {"type": "Polygon", "coordinates": [[*square, square[0]]]},
                    }
                ],
            }
        )
    )
    opts = DataOptions(images=str(tmp_path / "images"), footprints=str(tmp_path / "fp.geojson"))

    def columns() -> tuple[int, int]:
        data = prepare_data(None, options=opts, data_root=tmp_path / "w", progress=False)
        xs = np.nonzero(np.asarray(data.train.masks[0]))[1]
        return int(xs.min()), int(xs.max())

    assert columns() == (10, 29)  # 5 m east of the origin at 0.5 m/px, 10 m wide
    with monkeypatch.context() as m:  # reading the scene writes no sidecar of its own
        m.setattr(cache_module, "build_cache", lambda *a, **k: pytest.fail("rebuilt"))
        assert columns() == (10, 29)
    # the origin moved 5 m west (same file size): the building is 10 px further east
    text = aux.read_text()
    assert "5.0000000000000000e+05," in text
    aux.write_text(text.replace("5.0000000000000000e+05,", "4.9999500000000000e+05,"))
    later = time.time_ns() + 10**9
    os.utime(aux, ns=(later, later))
    assert columns() == (20, 39)

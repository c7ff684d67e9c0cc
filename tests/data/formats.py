"""Fixture generator: one synthetic scene written in every image/mask format users bring.

Each :class:`FormatCase` is an image file and a mask file as a real dataset ships them
(palette PNG, antialiased edges, JPEG mask, 16-bit, alpha-only, ...), with the decoding bldseg
must produce (or the error it must raise). The pixels come from
:func:`bldseg.data.synthetic.generate_scene`, so nothing is copied from real datasets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from bldseg.data.synthetic import generate_scene


@dataclass
class FormatCase:
    """An image + mask pair on disk and what decoding them must give.

    Attributes:
        image: Image file.
        mask: Mask file.
        rgb: Expected decoded image (H, W, 3) uint8, or None when only the mask is checked.
        truth: Expected decoded mask (H, W) 0/1, or None when decoding must fail.
        binary: Whether the mask counts as binary as stored (False: binarised, warned about).
        error: Regex of the expected error, or None.
        warning: Regex of the warning decoding must give, or None (no warning at all).
    """

    image: Path
    mask: Path
    rgb: np.ndarray | None
    truth: np.ndarray | None
    binary: bool = True
    error: str | None = None
    warning: str | None = None


def scene(size: int = 48, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic scene: RGB (size, size, 3) uint8 and a 0/1 mask with buildings."""
    s = generate_scene(seed, size, size, min_buildings=2)
    return s.image, s.mask


def _png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def _cv2(path: Path, array: np.ndarray, params: list[int] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array, params or [])
    return path


def write_cases(root: Path, size: int = 48, seed: int = 0) -> dict[str, FormatCase]:
    """Writes every format under ``root/<case>/{images,masks}/`` and returns the cases."""
    rgb, m = scene(size, seed)
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    cases: dict[str, FormatCase] = {}

    def case(name: str, mask_file: str, write_mask, **kw) -> None:
        img = _cv2(root / name / "images" / "tile.png", bgr)
        mask = write_mask(root / name / "masks" / mask_file)
        kw.setdefault("rgb", rgb)
        kw.setdefault("truth", m)
        cases[name] = FormatCase(img, mask, **kw)

    case("gray01", "tile.png", lambda p: _png(p, m))
    case("gray255", "tile.png", lambda p: _png(p, m * 255))
    case("rgb255", "tile.png", lambda p: _png(p, np.repeat(m[..., None] * 255, 3, axis=2)))
    case("uint16_01", "tile.png", lambda p: _cv2(p, m.astype(np.uint16)))
    case("uint16_65535", "tile.png", lambda p: _cv2(p, m.astype(np.uint16) * 65535))

    # Class palette PNG whose index 0 is drawn white and index 1 red: decoding the colours as
    # grey (OpenCV) would invert the mask; in a colour palette the index is the label.
    def palette(p: Path) -> Path:
        im = Image.fromarray(m, "P")
        im.putpalette([255, 255, 255, 255, 0, 0] + [0] * (256 - 2) * 3)
        p.parent.mkdir(parents=True, exist_ok=True)
        im.save(p)
        return p

    case("palette", "tile.png", palette)

    # A 0/255 mask saved through PIL's quantize: a grey palette with white at index 0, so the
    # indices are inverted; the grey values are the mask.
    def palette_grey(p: Path) -> Path:
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(m * 255).convert("RGB").quantize(2).save(p)
        return p

    case("palette_grey", "tile.png", palette_grey)

    # Palette with classes: 1 = road, 2 = building; --mask-values 2 selects buildings.
    classes = m * 2 + ((1 - m) * (np.arange(size)[None, :] % 7 == 0)).astype(np.uint8)

    def palette_classes(p: Path) -> Path:
        im = Image.fromarray(classes.astype(np.uint8), "P")
        im.putpalette([0, 0, 0, 128, 128, 128, 255, 0, 0] + [0] * (256 - 3) * 3)
        p.parent.mkdir(parents=True, exist_ok=True)
        im.save(p)
        return p

    case("palette_classes", "tile.png", palette_classes)

    # Antialiased edges: a blurred 0/255 mask, binarised at 127.5 gives the blur's midline.
    soft = cv2.GaussianBlur((m * 255).astype(np.uint8), (5, 5), 1.0)
    case(
        "antialiased",
        "tile.png",
        lambda p: _png(p, soft),
        truth=(soft > 127.5).astype(np.uint8),
        binary=False,
    )

    # A JPEG mask: compression noise around 0 and 255.
    def jpeg(p: Path) -> Path:
        return _cv2(p, (m * 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 75])

    case("jpeg", "tile.jpg", jpeg, truth=None, binary=False)  # truth: decoded from the file

    # Colour masks that cannot be read as one channel.
    def colour(p: Path) -> Path:
        a = np.zeros((size, size, 3), np.uint8)
        a[m > 0] = (255, 0, 0)
        return _png(p, a)

    case("colour", "tile.png", colour, truth=None, error="colour mask with differing channels")

    def alpha_only(p: Path) -> Path:
        a = np.zeros((size, size, 4), np.uint8)
        a[..., 3] = m * 255
        return _png(p, a, "RGBA")

    case("alpha_only", "tile.png", alpha_only, truth=None, error="stored only in the alpha")
    case(
        "rgba_opaque",
        "tile.png",
        lambda p: _png(p, np.dstack([np.repeat(m[..., None] * 255, 3, 2), np.full_like(m, 255)])),
    )
    return cases


def write_image_cases(root: Path, size: int = 48, seed: int = 1) -> dict[str, tuple[Path, dict]]:
    """Image formats: path -> expected RGB and the options that read it (or an error)."""
    rgb, _ = scene(size, seed)
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    alpha = np.full((size, size), 255, np.uint8)
    out: dict[str, tuple[Path, dict]] = {}
    out["rgb_png"] = (_cv2(root / "rgb.png", bgr), {"rgb": rgb})
    out["rgb_webp"] = (_cv2(root / "rgb.webp", bgr, [cv2.IMWRITE_WEBP_QUALITY, 101]), {"rgb": rgb})
    out["rgb_tif"] = (_cv2(root / "rgb.tif", bgr), {"rgb": rgb})
    out["grey"] = (_cv2(root / "grey.png", grey), {"rgb": np.repeat(grey[..., None], 3, 2)})
    out["rgba_opaque"] = (_cv2(root / "opaque.png", np.dstack([bgr, alpha])), {"rgb": rgb})
    holes = alpha.copy()
    holes[: size // 4] = 0
    holes[size // 4 : size // 2] = 128
    filled = np.rint(rgb.astype(np.float32) * (holes[..., None] / 255.0)).astype(np.uint8)
    out["rgba_transparent"] = (
        _cv2(root / "holes.png", np.dstack([bgr, holes])),
        {"rgb": filled, "error": "transparent pixel"},
    )
    return out


def _palette(entries: list[tuple[int, int, int]]) -> list[int]:
    """A 256-entry flat RGB palette starting with ``entries``, black after them."""
    flat = [v for rgb in entries for v in rgb]
    return flat + [0] * (768 - len(flat))


def _scene_with_gap(size: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A scene, its mask, a no-data strip (the top quarter, (H, W) bool) and the mask a reader
    must return: the scene's with the strip as background."""
    rgb, m = scene(size, seed)
    gap = np.zeros((size, size), bool)
    gap[: size // 4] = True
    return rgb, m, gap, np.where(gap, 0, m).astype(np.uint8)


def write_transparent_palette_cases(
    root: Path, size: int = 48, seed: int = 0
) -> dict[str, FormatCase]:
    """Palette masks with fully transparent entries: those pixels are no data (background).

    Every case but ``clear_background`` paints a no-data strip (the top quarter of the scene,
    buildings included) with an entry a GIS or image viewer shows transparent, and whose
    colour or index would otherwise read as building. The PNGs mark transparency with a tRNS
    chunk (PIL's ``info["transparency"]``); the TIFF with a PA (palette + alpha) image.
    """
    rgb, m, gap, truth = _scene_with_gap(size, seed)
    n = int(gap.sum())
    cases: dict[str, FormatCase] = {}

    def case(name: str, mask_file: str, im: Image.Image, **kw) -> None:
        img = _cv2(root / name / "images" / "tile.png", np.ascontiguousarray(rgb[..., ::-1]))
        mask = root / name / "masks" / mask_file
        mask.parent.mkdir(parents=True, exist_ok=True)
        im.save(mask, **kw.pop("save", {}))
        kw.setdefault("truth", truth)
        cases[name] = FormatCase(img, mask, rgb, **kw)

    def p_image(indices: np.ndarray, entries: list[tuple[int, int, int]]) -> Image.Image:
        im = Image.fromarray(indices.astype(np.uint8), "P")
        im.putpalette(_palette(entries))
        return im

    # Overlay-style class palette: buildings red at half opacity (still drawn, so a building),
    # index 2 white and fully transparent; as a colour palette index 2 > 0 would be a building.
    colour = p_image(np.where(gap, 2, m), [(0, 0, 0), (255, 0, 0), (255, 255, 255)])
    case(
        "colour_trns",
        "tile.png",
        colour,
        save={"transparency": bytes([255, 128, 0])},
        warning=rf"tile\.png: {n} of {size * size} mask pixels .*palette index 2",
    )

    # A grey 0/255 mask (white at index 1, quantize-style inverted indices) with a magenta
    # colour key at index 0 for no data: the key's colour is never drawn, so the palette is
    # grey; taking it for a class palette would read the black background (index 2) as building.
    # The key is no grey either, so it would read as nothing: no warning (one per tile, saying
    # its no-data pixels would have been buildings, was wrong).
    keyed = p_image(
        np.where(gap, 0, np.where(m > 0, 1, 2)), [(255, 0, 255), (255, 255, 255), (0, 0, 0)]
    )
    case("grey_keyed", "tile.png", keyed, save={"transparency": 0})

    # The common export: background index 0 transparent, so the mask overlays the image. The
    # transparent pixels are background anyway: decoded as before, and nothing to warn about.
    clear = p_image(m, [(0, 0, 0), (255, 255, 255)])
    case("clear_background", "tile.png", clear, save={"transparency": 0}, truth=m)

    # Palette + alpha TIFF: the strip is drawn as a building (index 1) under alpha 0.
    pa = Image.merge(
        "PA",
        [
            Image.fromarray(np.where(gap, 1, m).astype(np.uint8), "L"),
            Image.fromarray(np.where(gap, 0, 255).astype(np.uint8), "L"),
        ],
    )
    pa.putpalette(_palette([(0, 0, 0), (255, 0, 0)]))
    case("pa_tiff", "tile.tif", pa, warning=rf"tile\.tif: {n} of {size * size} .*alpha 0")
    return cases


def write_palette_geotiff_nodata(root: Path, size: int = 48, seed: int = 0) -> FormatCase:
    """A palette GeoTIFF mask whose nodata index (shown transparent by GDAL) fills a strip.

    TIFF colour maps hold no alpha: GDAL reports the nodata index's entry as transparent
    (alpha 0), which is how a GeoTIFF palette says "no data". Needs rasterio.
    """
    import rasterio
    from rasterio.transform import Affine

    rgb, m = scene(size, seed)
    gap = np.zeros((size, size), bool)
    gap[: size // 4] = True
    img = _cv2(root / "images" / "tile.png", np.ascontiguousarray(rgb[..., ::-1]))
    mask = root / "masks" / "tile.tif"
    mask.parent.mkdir(parents=True, exist_ok=True)
    profile = dict(driver="GTiff", width=size, height=size, count=1, dtype="uint8", nodata=2)
    with rasterio.open(
        mask,
        "w",
        photometric="palette",
        crs="EPSG:32615",
        transform=Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 4000000.0),
        **profile,
    ) as dst:
        dst.write(np.where(gap, 2, m).astype(np.uint8), 1)
        dst.write_colormap(1, {0: (0, 0, 0, 255), 1: (255, 0, 0, 255), 2: (255, 255, 255, 255)})
    n = int(gap.sum())
    return FormatCase(
        img,
        mask,
        rgb,
        np.where(gap, 0, m).astype(np.uint8),
        warning=rf"tile\.tif: {n} of {size * size} mask pixels .*palette index 2: GDAL nodata",
    )


def write_geotiff_nodata_cases(root: Path, size: int = 48, seed: int = 0) -> dict[str, FormatCase]:
    """Non-palette GeoTIFF masks with a GDAL nodata value (TIFF tag 42113), written by rasterio.

    Every case fills a no-data strip (the top quarter of the scene, buildings included) with
    its nodata value, as a scene's border or a gap between flight lines ships. Where that value
    is not 0 the strip must read as background with a warning; nodata 0 (the profile copied
    from the imagery) reads as before, without one. Needs rasterio.
    """
    import rasterio
    from rasterio.transform import Affine

    rgb, m, gap, truth = _scene_with_gap(size, seed)
    n = int(gap.sum())
    cases: dict[str, FormatCase] = {}

    def case(name: str, bands: np.ndarray, nodata: float, *, warns: bool = True, **kw) -> None:
        img = _cv2(root / name / "images" / "tile.png", np.ascontiguousarray(rgb[..., ::-1]))
        mask = root / name / "masks" / "tile.tif"
        mask.parent.mkdir(parents=True, exist_ok=True)
        count, dtype = bands.shape[0], bands.dtype.name
        with rasterio.open(
            mask,
            "w",
            driver="GTiff",
            width=size,
            height=size,
            count=count,
            dtype=dtype,
            nodata=nodata,
            crs="EPSG:32615",
            transform=Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 4000000.0),
            **kw.pop("creation", {}),
        ) as dst:
            dst.write(bands)
        kw.setdefault("truth", truth)
        if warns:
            kw["warning"] = (
                rf"tile\.tif: {n} of {size * size} mask pixels are no data \(GDAL nodata"
            )
        cases[name] = FormatCase(img, mask, rgb, **kw)

    def strip(values: np.ndarray, nodata: float, dtype: str) -> np.ndarray:
        """(1, H, W) band of ``values`` with the no-data strip set to ``nodata``."""
        return np.where(gap, nodata, values.astype(dtype)).astype(dtype)[None]

    # 0/1 with nodata 255: the three values {0, 1, 255} were refused as a label mask.
    case("u8_01_nd255", strip(m, 255, "uint8"), 255)
    case("u8_01_nd255_bigtiff", strip(m, 255, "uint8"), 255, creation={"BIGTIFF": "YES"})
    # nodata equal to the background: the strip is background anyway, nothing to warn about.
    case("u8_0255_nd0", strip(m * 255, 0, "uint8"), 0, warns=False)
    # 0/1 with nodata 65535: refused as a label mask ("would drop ... pixels of value 1").
    case("u16_01_nd65535", strip(m, 65535, "uint16"), 65535)
    # Float 0/1 with nodata -9999 read right, but as "binarised" (three values): binary now.
    case("f32_01_nd-9999", strip(m, -9999, "float32"), -9999)
    # Float64, which PIL cannot open: its nodata is read from the header alone.
    case("f64_01_nd-9999", strip(m, -9999, "float64"), -9999)
    # Float 0/1 with nodata near float32's maximum: the threshold, half the mask's maximum,
    # dropped every building and kept the strip.
    case("f32_01_nd3.4e38", strip(m, 3.4e38, "float32"), 3.4e38)
    # Three equal bands (a grey mask saved as RGB): a pixel is no data where all bands are.
    case("rgb_01_nd255", np.repeat(strip(m, 255, "uint8"), 3, axis=0), 255)
    return cases

"""Optional geospatial input: GeoTIFF scenes and vector building footprints.

Real satellite scenes often ship as GeoTIFFs that plain 8-bit decoding cannot represent
(16-bit or float pixels, more than four bands, a CRS that footprint polygons are expressed in).
This module reads them with rasterio into the uint8 (H, W, 3) RGB the rest of bldseg expects,
burns vector footprints (GeoJSON, Shapefile, GeoPackage) into the image's pixel grid, and
writes predicted masks back as GeoTIFFs that line up with the scene in a GIS.

The geo packages (rasterio, geopandas, pyogrio, shapely, pyproj) are the optional extra
``bldseg[geo]``: this module imports without them, so :mod:`bldseg.data.readers` can always
import it; each function that needs them imports them when called and raises ``ImportError``
naming the file and the ``pip install`` line when they are missing.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import struct
import uuid
import warnings
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

GEO_SUFFIXES = (".tif", ".tiff")
VECTOR_SUFFIXES = (".geojson", ".json", ".shp", ".gpkg")
# Low/high percentiles (per band) mapped to 0 and 255 when a raster is not 8-bit: clipping the
# 2% tails keeps a few saturated roofs or dark shadows from squashing the rest of the scene.
DEFAULT_STRETCH = (2.0, 98.0)

_PIP_HINT = "pip install 'bldseg[geo]'"

PathLike = str | os.PathLike[str]


def _import_optional(name: str) -> ModuleType:
    """Imports one optional geo dependency by name.

    Every import of a geo package goes through here, so tests can simulate a missing extra by
    patching this one function instead of the installed packages.
    """
    return importlib.import_module(name)


def _require(what: str, *names: str) -> tuple[ModuleType, ...]:
    """Imports ``names`` or raises ImportError saying that ``what`` needs the geo extra."""
    modules = []
    for name in names:
        try:
            modules.append(_import_optional(name))
        except ImportError as e:
            raise ImportError(
                f"{what} needs the optional geo extra: {_PIP_HINT} (cannot import {name}: {e})"
            ) from e
    return tuple(modules)


def geo_available() -> bool:
    """Whether rasterio can be imported (the ``bldseg[geo]`` extra is installed)."""
    try:
        _import_optional("rasterio")
    except ImportError:
        return False
    return True


def require_geo(what: str) -> None:
    """Raises ImportError unless rasterio can be imported.

    Args:
        what: What needs it, starting with the file, e.g. ``"scene.tif: reading GeoTIFF"``;
            the message continues with ``needs the optional geo extra: pip install ...``.

    Raises:
        ImportError: rasterio is not installed.
    """
    _require(what, "rasterio")


@contextlib.contextmanager
def _open_raster(path: Path, what: str) -> Iterator[Any]:
    """Opens ``path`` with rasterio (read mode); errors name the file.

    Reads inside the ``with`` block are covered too: a truncated or corrupt file often opens
    (its header is intact) and fails only when its pixels are read.
    """
    (rasterio,) = _require(f"{path}: {what}", "rasterio")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    with warnings.catch_warnings():
        # A plain TIFF has no georeference; that is a normal input here, not something to warn of.
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        try:
            src = rasterio.open(path)
        except rasterio.errors.RasterioIOError as e:
            raise ValueError(
                f"{path}: cannot read this file as a raster ({e}); check that it is a complete "
                "GeoTIFF/TIFF"
            ) from e
    with src:
        try:
            yield src
        except rasterio.errors.RasterioIOError as e:
            # rasterio's own message is "Read failed. See previous exception for details."
            raise ValueError(
                f"{path}: cannot read the pixels ({e.__cause__ or e}); the file is truncated or "
                "corrupt: copy or download it again"
            ) from e


def _carries_georeference(src: Any) -> bool:
    """Whether an open dataset has a CRS, a geotransform or ground control points."""
    return src.crs is not None or not src.transform.is_identity or bool(src.gcps[0])


class _TiffHeader(NamedTuple):
    """The fields of a TIFF's first image that decide how it can be decoded."""

    bits: int  # BitsPerSample (of the first band: bands of one image share it)
    samples: int  # SamplesPerPixel: the band count
    sample_format: int  # 1 unsigned integer, 2 signed, 3 float
    photometric: int | None  # 1 BlackIsZero (grey), 2 RGB, 3 palette, 6 YCbCr, ...; None: absent
    extra: int  # ExtraSamples of the first band past the colour ones: 0 unspecified, 1/2 alpha


def _tiff_header(path: Path) -> _TiffHeader | None:
    """The decoding-relevant fields of a TIFF's first image (see :class:`_TiffHeader`).

    Read from the first IFD (classic TIFF or BigTIFF) without decoding pixels; None when the
    file is not a TIFF. Used only without rasterio: OpenCV reads a 2-band TIFF as grey and
    decodes a whole scene just to report its dtype, and PIL refuses 16-bit multi-band files.
    """
    sizes = {3: 2, 4: 4, 16: 8}  # field types met for these tags -> bytes: SHORT, LONG, LONG8
    codes = {2: "H", 4: "I", 8: "Q"}  # unsigned struct code of each byte size
    # BitsPerSample, SamplesPerPixel, SampleFormat, PhotometricInterpretation, ExtraSamples,
    # with their defaults (-1: absent).
    wanted = {258: 1, 277: 1, 339: 1, 262: -1, 338: 0}
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            order = {b"II": "<", b"MM": ">"}.get(head[:2])
            if order is None:
                return None
            version = struct.unpack(order + "H", head[2:4])[0]
            if version == 42:  # classic TIFF: 2-byte entry count, 4-byte counts and values
                (ifd,) = struct.unpack(order + "I", head[4:8])
                n_bytes, word = 2, 4
            elif version == 43:  # BigTIFF: 8-byte entry count, 8-byte counts and values
                (ifd,) = struct.unpack(order + "Q", head[8:16])
                n_bytes, word = 8, 8
            else:
                return None
            f.seek(ifd)
            (n,) = struct.unpack(order + codes[n_bytes], f.read(n_bytes))
            entry_size = 4 + 2 * word  # tag (2), type (2), value count (word), value (word)
            entries = f.read(n * entry_size)
            for i in range(n):
                entry = entries[i * entry_size : (i + 1) * entry_size]
                tag, typ = struct.unpack(order + "HH", entry[:4])
                if tag not in wanted or typ not in sizes:
                    continue
                size = sizes[typ]
                (count,) = struct.unpack(order + codes[word], entry[4 : 4 + word])
                value = entry[4 + word :]
                if count * size > word:  # the values live elsewhere; the field holds an offset
                    (offset,) = struct.unpack(order + codes[word], value)
                    f.seek(offset)
                    value = f.read(size)
                # Only the first value: bands of one image share their depth and format, and
                # the first extra sample is the one OpenCV would take for alpha.
                (wanted[tag],) = struct.unpack(order + codes[size], value[:size])
    except (OSError, struct.error):
        return None
    photometric = None if wanted[262] == -1 else wanted[262]
    return _TiffHeader(wanted[258], wanted[277], wanted[339], photometric, wanted[338])


def _plain_colour_layout(count: int, colours: tuple[str, ...]) -> bool:
    """Whether OpenCV decodes these bands as they are meant: grey, RGB, or RGB + a declared alpha.

    OpenCV reads a MINISBLACK (grey) TIFF of 3+ bands as one grey band, and takes any 4th band
    for alpha, also one declared "unspecified" (often near-infrared); such files need rasterio.

    Args:
        count: The band count.
        colours: The bands' colour interpretations as GDAL names them (``"red"``, ``"gray"``,
            ``"alpha"``, ``"undefined"``, ...).
    """
    if count == 1:
        return True
    rgb = tuple(colours[:3]) == ("red", "green", "blue")
    return rgb and (count == 3 or (count == 4 and colours[3] == "alpha"))


def _header_colours(header: _TiffHeader) -> tuple[str, ...]:
    """The colour interpretations GDAL would give a TIFF's bands, from its header alone."""
    # YCbCr is decoded to RGB by libtiff and GDAL alike; any other photometric is not RGB.
    colours = ["red", "green", "blue"] if header.photometric in (2, 6) else ["gray"]
    # The first band past the colour ones: ExtraSamples 1 (associated) and 2 (unassociated)
    # are alpha, 0 is unspecified.
    colours.append("alpha" if header.extra in (1, 2) else "undefined")
    colours += ["undefined"] * (header.samples - len(colours))
    return tuple(colours[: header.samples])


def needs_raster_reader(path: PathLike, *, bands: tuple[int, ...] | None = None) -> bool:
    """Whether a TIFF needs :func:`read_raster_rgb` instead of plain 8-bit RGB decoding.

    True when ``path`` is a TIFF whose pixels are not uint8 or whose band count is not 1, 3 or
    4. With rasterio, also when OpenCV would misread its bands (3+ bands that are not RGB, as
    in a MINISBLACK multi-band TIFF, or a 4th band not declared alpha, e.g. near-infrared),
    when it carries a CRS/geotransform (kept for footprints and GeoTIFF outputs), or when
    ``bands`` are given. Other suffixes give False.

    Without rasterio the TIFF header is read directly: 16-bit, float or multi-band files give
    True, so the caller can :func:`require_geo`; an 8-bit 1/3/4-band file gives False (OpenCV
    reads it; a georeference is unusable then), unless ``bands`` are asked of a file whose
    bands OpenCV would misread. A file that is not a readable TIFF gives False, leaving the
    error to the plain decoder.

    Args:
        path: The image file.
        bands: The 1-based bands the caller will read (``ReadOptions.bands``), or None.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: rasterio cannot read the file (message names it).
    """
    path = Path(path)
    if path.suffix.lower() not in GEO_SUFFIXES:
        return False
    if geo_available():
        with _open_raster(path, "reading TIFF") as src:
            return (
                any(dt != "uint8" for dt in src.dtypes)
                or src.count not in (1, 3, 4)
                or not _plain_colour_layout(src.count, tuple(c.name for c in src.colorinterp))
                or _carries_georeference(src)
                or bands is not None
            )
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    header = _tiff_header(path)
    if header is None:
        return False
    if header.bits != 8 or header.sample_format != 1 or header.samples not in (1, 3, 4):
        return True
    # Without bands OpenCV's reading is kept (it needs no extra); with them, a layout it
    # misreads would give the wrong bands, so the caller asks for rasterio.
    return bands is not None and not _plain_colour_layout(header.samples, _header_colours(header))


def raster_size(path: PathLike) -> tuple[int, int]:
    """``(H, W)`` of a raster, from its header.

    Raises:
        ImportError: rasterio is not installed.
        FileNotFoundError, ValueError: Missing or unreadable file.
    """
    with _open_raster(Path(path), "reading GeoTIFF") as src:
        return src.height, src.width


def has_georeference(path: PathLike) -> bool:
    """Whether ``path`` is a TIFF that a GIS can place: it has a CRS and a non-identity
    geotransform, or ground control points (GCPs) with their CRS, or RPCs (rational polynomial
    coefficients, as raw satellite scenes ship); :func:`write_geotiff_mask` copies any of them.

    Non-TIFF suffixes give False without importing rasterio.

    Raises:
        ImportError: rasterio is not installed.
        FileNotFoundError, ValueError: Missing or unreadable TIFF.
    """
    path = Path(path)
    if path.suffix.lower() not in GEO_SUFFIXES:
        return False
    with _open_raster(path, "reading GeoTIFF") as src:
        gcps, gcp_crs = src.gcps
        return (
            (src.crs is not None and not src.transform.is_identity)
            or (bool(gcps) and gcp_crs is not None)
            or src.rpcs is not None
        )


#: How far (in the image's pixels, at any corner of it) a georeferenced mask's grid may lie from
#: its image's: GeoTIFF writers round the origin and pixel size in their last digits, a shifted
#: or resampled grid is off by whole pixels or a visible fraction of one.
GRID_TOLERANCE_PX = 0.01


def _describe_grid(crs: Any, transform: Any) -> str:
    """A raster's origin, pixel size and CRS, for messages."""
    rotation = ""
    if transform.b or transform.d:
        rotation = f", rotation terms ({transform.b:.6g}, {transform.d:.6g})"
    return (
        f"origin ({transform.c:.12g}, {transform.f:.12g}), pixel size {transform.a:.6g} x "
        f"{-transform.e:.6g}{rotation}, CRS {crs.to_string() or crs.to_wkt()}"
    )


def check_mask_grid(image_path: PathLike, mask_path: PathLike) -> None:
    """Raises ValueError when a georeferenced mask lies elsewhere than its georeferenced image.

    A mask is used pixel for pixel with its image; when both files carry a CRS and a
    geotransform they must agree, or the mask labels another place (a tile cut 100 px east, a
    mask exported in another CRS). The grids agree when the CRSs are equal and the mask's
    grid maps every corner of the image within :data:`GRID_TOLERANCE_PX` pixels of the image's
    own. A file without CRS or geotransform (a plain TIFF, one placed only by GCPs or RPCs)
    says nothing about where it lies: nothing is checked.

    Raises:
        ImportError: rasterio is not installed.
        FileNotFoundError, ValueError: Missing or unreadable file.
        ValueError: The grids disagree; the message names both files, their origins, pixel
            sizes and CRSs, and how to align the mask or strip its georeference.
    """
    image_path, mask_path = Path(image_path), Path(mask_path)
    with _open_raster(image_path, "reading GeoTIFF") as src:
        crs, transform, (h, w), bounds = src.crs, src.transform, src.shape, src.bounds
    with _open_raster(mask_path, "reading GeoTIFF mask") as src:
        mask_crs, mask_transform = src.crs, src.transform
    if crs is None or transform.is_identity or mask_crs is None or mask_transform.is_identity:
        return
    if mask_crs == crs:
        # Where the mask's grid puts each corner of the image, in the image's pixels.
        corners = [(0, 0), (w, 0), (0, h), (w, h)]
        placed = [~transform @ (mask_transform @ c) for c in corners]
        off = [(px - c[0], py - c[1]) for (px, py), c in zip(placed, corners, strict=True)]
        if max(max(abs(dx), abs(dy)) for dx, dy in off) <= GRID_TOLERANCE_PX:
            return
        dx, dy = off[0]
        where = (
            f"its pixel (0, 0) lies at column {dx:.4g}, row {dy:.4g} of the image"
            if abs(dx) > GRID_TOLERANCE_PX or abs(dy) > GRID_TOLERANCE_PX
            else "its pixel size or rotation differs from the image's"
        )
    else:
        where = "it is in another CRS"
    raise ValueError(
        f"mask {mask_path} is georeferenced to another place than its image {image_path} "
        f"({where}): image {_describe_grid(crs, transform)}; mask "
        f"{_describe_grid(mask_crs, mask_transform)}. A mask is used pixel for pixel with its "
        "image: align it to the image's grid (gdalwarp -t_srs "
        f"{crs.to_string() or 'IMAGE_CRS'} -te {bounds.left:.12g} {bounds.bottom:.12g} "
        f"{bounds.right:.12g} {bounds.top:.12g} -ts {w} {h} -r near {mask_path} ALIGNED.tif), "
        "check that it belongs to this image (--mask-pattern), or, if its pixels do match the "
        f"image's as they are, strip its georeference (gdal_edit.py -unsetgt -unsetsrs {mask_path})"
    )


def _resolve_bands(
    path: Path, count: int, bands: tuple[int, ...] | None, colours: tuple[str, ...] = ()
) -> tuple[int, ...]:
    """The 1-based bands to read (1 or 3 of them), checked against the file's ``count``.

    Without ``bands``, a raster whose bands declare red, green and blue (``colours``: their
    colour interpretations as GDAL names them, one each) is read by those declarations: a
    BGR+NIR GeoTIFF declaring (blue, green, red, undefined) is read as bands 3, 2, 1, not as
    swapped colours. Otherwise bands 1, 2, 3 (or the one band of a grey raster).
    """
    if bands is None:
        if count == 1:
            return (1,)
        declared = [name for name in colours if name in ("red", "green", "blue")]
        if sorted(declared) == ["blue", "green", "red"]:  # each declared exactly once
            return tuple(colours.index(name) + 1 for name in ("red", "green", "blue"))
        if count == 2:
            raise ValueError(
                f"{path}: the raster has 2 bands; choose what to read with --bands, "
                "e.g. --bands 1 (grey) or --bands 1,2,2"
            )
        return (1, 2, 3)
    bands = tuple(int(b) for b in bands)
    if len(bands) not in (1, 3):
        raise ValueError(
            f"{path}: --bands takes 1 (grey) or 3 (RGB) band indices, got {list(bands)}"
        )
    bad = [b for b in bands if not 1 <= b <= count]
    if bad:
        raise ValueError(
            f"{path}: band(s) {bad} out of range: the raster has {count} band(s), numbered "
            f"1..{count}; choose others with --bands"
        )
    return bands


def _colours(src: Any) -> tuple[str, ...]:
    """An open raster's colour interpretations as GDAL names them (``"red"``, ``"gray"``, ...)."""
    return tuple(c.name for c in src.colorinterp)


def _check_stretch(stretch: tuple[float, float]) -> tuple[float, float]:
    low, high = (float(v) for v in stretch)
    if not 0.0 <= low < high <= 100.0:
        raise ValueError(f"stretch percentiles need 0 <= low < high <= 100, got {stretch}")
    return low, high


@lru_cache(maxsize=256)
def _band_limits(
    path: str, mtime_ns: int, size: int, band: int, low: float, high: float
) -> tuple[float, float] | None:
    """Stretch limits ``(lo, hi)`` of one band over the whole raster; None if it is constant.

    Cached per file version (``mtime_ns``, ``size`` are part of the key), because a scene read
    as many tiles would otherwise be read whole once per tile.
    """
    with _open_raster(Path(path), "reading GeoTIFF") as src:
        data = src.read(band)  # (H, W), the whole band
        valid = (src.read_masks(band) > 0) & np.isfinite(data)  # nodata/mask and NaN/inf out
        values = data[valid]
    if values.size == 0:
        return None
    lo, hi = np.percentile(values, [low, high])  # numpy's default linear interpolation
    if not hi > lo:
        return None
    return float(lo), float(hi)


def valid_pixels(path: PathLike, *, bands: tuple[int, ...] | None = None) -> np.ndarray | None:
    """Where the raster has data: (H, W) bool, False where any band read (``bands``, as
    :func:`read_raster_rgb` chooses them) is nodata, masked (mask band, alpha) or NaN/inf.

    Returns None when every pixel is valid (no nodata value, mask or alpha, and no non-finite
    float), without reading the pixels unless the bands are float.

    Raises:
        ImportError: rasterio is not installed.
        ValueError: Unreadable file or bad ``bands`` (messages name the file).
    """
    path = Path(path)
    mask_flags = _import_optional("rasterio.enums").MaskFlags
    with _open_raster(path, "reading GeoTIFF") as src:
        chosen = tuple(dict.fromkeys(_resolve_bands(path, src.count, bands, _colours(src))))
        masked = [b for b in chosen if src.mask_flag_enums[b - 1] != [mask_flags.all_valid]]
        floats = [b for b in chosen if np.issubdtype(np.dtype(src.dtypes[b - 1]), np.floating)]
        if not masked and not floats:
            return None
        valid = np.ones((src.height, src.width), bool)  # (H, W)
        for b in masked:
            valid &= src.read_masks(b) > 0
        for b in floats:
            valid &= np.isfinite(src.read(b))
    return None if valid.all() else valid


def read_raster_rgb(
    path: PathLike,
    *,
    bands: tuple[int, ...] | None = None,
    stretch: tuple[float, float] = DEFAULT_STRETCH,
    window: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """Reads a GeoTIFF/TIFF with rasterio as uint8 (H, W, 3) RGB.

    Band choice: ``bands`` are 1-based indices (rasterio's convention), one (replicated to
    grey) or three (R, G, B). None reads a 1-band raster as grey, the bands declared red, green
    and blue (colour interpretation) of a raster declaring them, and bands 1, 2, 3 of any other
    raster with 3 or more bands (a 4th band, often alpha or near-infrared, is dropped); a 2-band
    raster needs an explicit choice. A palette (colour-mapped) band is read as its colours, as
    PIL and OpenCV read a palette PNG or TIFF.

    Pixel values: uint8 bands are kept as they are, nodata included (no stretch). Other dtypes
    (uint16, int16, float32, ...) are stretched per band: the ``stretch`` low/high percentiles
    (numpy's linear interpolation) of the band's valid pixels over the WHOLE raster, not just
    ``window``, so all tiles of a scene get one stretch, map linearly to 0 and 255; values are
    rounded to the nearest integer and clipped to 0..255. Valid pixels exclude nodata (rasterio's
    mask, which also honours mask bands) and NaN/inf; invalid pixels come out 0. A band that is
    constant over its valid pixels, or has none, comes out 0.

    Args:
        path: The raster file.
        bands: 1-based band indices, 1 or 3 of them; None for the default above.
        stretch: Low and high percentiles (0 <= low < high <= 100) for non-uint8 bands.
        window: ``(y, x, h, w)`` crop to read, inside the raster; None reads all of it.

    Returns:
        uint8 array (h, w, 3).

    Raises:
        ImportError: rasterio is not installed.
        FileNotFoundError: The file does not exist.
        ValueError: Unreadable file, 2 bands without ``bands``, a band index out of range, a
            bad ``stretch`` or a window outside the raster. Messages name the file.
    """
    path = Path(path)
    low, high = _check_stretch(stretch)
    with _open_raster(path, "reading GeoTIFF") as src:
        chosen = _resolve_bands(path, src.count, bands, _colours(src))
        height, width = src.height, src.width
        if window is None:
            y, x, h, w = 0, 0, height, width
        else:
            y, x, h, w = (int(v) for v in window)
            if h <= 0 or w <= 0 or y < 0 or x < 0 or y + h > height or x + w > width:
                raise ValueError(
                    f"{path}: window (y, x, h, w) = {tuple(window)} is not inside the raster "
                    f"of {height}x{width}"
                )
        rio_window = _import_optional("rasterio.windows").Window(x, y, w, h)
        palette = _import_optional("rasterio.enums").ColorInterp.palette
        if len(set(chosen)) == 1 and src.colorinterp[chosen[0] - 1] == palette:
            # The band holds indices into its colour map, not intensities (a GeoTIFF saved
            # with a colour table): read as grey it would be near-black noise.
            return _palette_rgb(src, chosen[0], src.read(chosen[0], window=rio_window), path)
        by_band: dict[int, np.ndarray] = {}  # band -> (h, w) uint8; each band read once
        for b in dict.fromkeys(chosen):
            data = src.read(b, window=rio_window)  # (h, w)
            if src.dtypes[b - 1] == "uint8":
                by_band[b] = data
                continue
            stat = path.stat()
            limits = _band_limits(str(path.resolve()), stat.st_mtime_ns, stat.st_size, b, low, high)
            out = np.zeros((h, w), np.uint8)
            if limits is not None:
                lo, hi = limits
                valid = (src.read_masks(b, window=rio_window) > 0) & np.isfinite(data)
                scaled = (data[valid].astype(np.float64) - lo) * (255.0 / (hi - lo))
                out[valid] = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
            by_band[b] = out
    rgb = [by_band[b] for b in (chosen * 3 if len(chosen) == 1 else chosen)]
    return np.ascontiguousarray(np.stack(rgb, axis=-1))  # (h, w, 3)


def _palette_rgb(src: Any, band: int, indices: np.ndarray, path: Path) -> np.ndarray:
    """(h, w) palette indices of ``band`` -> (h, w, 3) uint8 RGB through its colour map."""
    try:
        cmap = src.colormap(band)  # {index: (r, g, b, a)}
    except ValueError as e:
        raise ValueError(
            f"{path}: band {band} is declared a palette band but has no colour table ({e}); "
            "write the file again with its colour table, or as RGB"
        ) from e
    size = max(int(indices.max()) + 1 if indices.size else 0, max(cmap) + 1)
    lut = np.zeros((size, 3), np.uint8)  # (size, 3); indices the map lacks are black, as in PIL
    for i, rgba in cmap.items():
        lut[i] = rgba[:3]
    return lut[indices]  # (h, w, 3)


def rasterize_footprints(
    image_path: PathLike, vector_path: PathLike, *, all_touched: bool = False
) -> np.ndarray:
    """Burns building polygons into the pixel grid of a georeferenced image.

    The vector file (GeoJSON, Shapefile, GeoPackage; read with geopandas) is reprojected to the
    image's CRS when it has another one. A file without a CRS is taken to be in the image's CRS,
    but only if its bounds overlap the image's; otherwise the CRS is surely wrong and this is an
    error. Points and lines are ignored (multi-part geometries and collections are split into
    their polygons). A file with no geometry is a valid tile without buildings.

    Args:
        image_path: The georeferenced raster whose grid the mask follows.
        vector_path: The footprint polygons.
        all_touched: Burn every pixel a polygon touches, instead of the pixels whose centre is
            inside it (GDAL's default rule).

    Returns:
        uint8 (H, W) mask, 1 inside a building, 0 elsewhere.

    Raises:
        ImportError: rasterio or geopandas is not installed.
        FileNotFoundError: Either file does not exist.
        ValueError: The image has no CRS/geotransform; the vector file is unreadable, holds no
            polygon at all, has no CRS and lies elsewhere, or the image lies outside the extent
            of its polygons (an image inside it that no polygon overlaps gets an empty mask).
            Messages name both files.
    """
    image_path, vector_path = Path(image_path), Path(vector_path)
    both = f"footprints {vector_path} on image {image_path}"
    features, gpd = _require(
        f"{vector_path}: reading footprints", "rasterio", "rasterio.features", "geopandas"
    )[1:]
    if not vector_path.is_file():
        raise FileNotFoundError(f"{vector_path}: footprint file not found (for {image_path})")
    with _open_raster(image_path, "reading GeoTIFF") as src:
        crs, transform, shape, bounds = src.crs, src.transform, src.shape, src.bounds
    if crs is None or transform.is_identity:
        raise ValueError(
            f"{both}: the image has no CRS/geotransform, so polygons in map coordinates cannot "
            "be placed on its pixels; use the georeferenced GeoTIFF the footprints were drawn on"
        )
    try:
        gdf = gpd.read_file(vector_path)
    except (RuntimeError, OSError, ValueError) as e:
        raise ValueError(
            f"{vector_path}: cannot read the footprints ({e}) (for {image_path})"
        ) from e

    geoms = gdf.geometry
    geoms = geoms[~(geoms.isna() | geoms.is_empty)]
    mask = np.zeros(shape, np.uint8)  # (H, W)
    if len(geoms) == 0:
        return mask
    parts = geoms.explode(index_parts=False)  # MultiPolygon / GeometryCollection -> parts
    polys = parts[parts.geom_type == "Polygon"]
    if len(polys) == 0:
        kinds = sorted(set(geoms.geom_type))
        raise ValueError(f"{both}: the file holds no polygons, only {kinds}; footprints are areas")

    image_crs = crs.to_wkt()
    if polys.crs is None:
        if not _bounds_overlap(polys.total_bounds, bounds):
            raise ValueError(
                f"{both}: the footprint file has no CRS and its bounds "
                f"{_fmt_bounds(polys.total_bounds)} do not overlap the image's "
                f"{_fmt_bounds(bounds)} in the image's CRS ({crs}); write the footprints with "
                "their CRS (e.g. ogr2ogr -a_srs EPSG:XXXX)"
            )
    elif polys.crs != image_crs:
        polys = polys.to_crs(image_crs)

    # A scene without buildings inside the footprints' extent is an empty mask (one file of
    # footprints for a whole city); a scene outside that extent means a wrong CRS or file.
    if not _bounds_overlap(polys.total_bounds, bounds):
        raise ValueError(
            f"{both}: the image lies outside the extent of the {len(polys)} polygons "
            f"(footprints {_fmt_bounds(polys.total_bounds)}, image {_fmt_bounds(bounds)} in "
            f"{crs}); check the CRS of both files"
        )
    b = polys.bounds  # per polygon: minx, miny, maxx, maxy in the image's CRS
    hit = (b.minx < bounds.right) & (b.maxx > bounds.left)
    hit &= (b.miny < bounds.top) & (b.maxy > bounds.bottom)
    if not hit.any():
        return mask
    try:
        features.rasterize(
            ((g, 1) for g in polys[hit.to_numpy()]),
            out=mask,
            transform=transform,
            fill=0,
            all_touched=all_touched,
        )
    except ValueError as e:  # rasterio refuses when every geometry is invalid
        raise ValueError(f"{both}: cannot rasterize the polygons ({e})") from e
    return mask


def _bounds_overlap(a: Any, b: Any) -> bool:
    """Whether ``(minx, miny, maxx, maxy)`` boxes ``a`` and ``b`` overlap."""
    ax0, ay0, ax1, ay1 = (float(v) for v in a)
    bx0, by0, bx1, by1 = (float(v) for v in b)
    return ax0 < bx1 and bx0 < ax1 and ay0 < by1 and by0 < ay1


def _fmt_bounds(b: Any) -> str:
    return "(" + ", ".join(f"{float(v):.6g}" for v in b) + ")"


def write_geotiff_mask(
    mask: np.ndarray, out_path: PathLike, *, like: PathLike, valid: np.ndarray | None = None
) -> None:
    """Writes a mask as a single-band uint8 GeoTIFF on the grid of the raster ``like``.

    The file gets ``like``'s georeference, so the mask overlays the scene in a GIS: its CRS and
    geotransform, or, for a scene placed by ground control points alone (no geotransform), the
    GCPs and their CRS; and its RPCs when it has them. None if ``like`` has none. It is written
    to a temporary name in the output folder and renamed into place, so a reader never sees
    half a file.

    Args:
        mask: (H, W) bool or integer mask with values 0/255, or 0/1 (scaled to 0/255).
        out_path: The GeoTIFF to write (replaced if it exists; its folder is created).
        like: The raster whose (H, W) and georeference the mask follows.
        valid: (H, W) bool, where the scene has data (:func:`valid_pixels`); elsewhere the
            file's internal mask band says "no data", as the scene's own nodata does (a GIS
            shows those pixels as transparent). None: every pixel is valid.

    Raises:
        ImportError: rasterio is not installed.
        ValueError: The mask is not 2-D, has other values, or its shape differs from ``like``.
    """
    out_path, like = Path(out_path), Path(like)
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{out_path}: the mask must be (H, W), got shape {mask.shape}")
    if mask.dtype != bool and not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"{out_path}: the mask must be bool or integer, got {mask.dtype}")
    low, top = (int(mask.min()), int(mask.max())) if mask.size else (0, 0)
    if low < 0 or top not in (0, 1, 255) or not np.all((mask == 0) | (mask == top)):
        raise ValueError(
            f"{out_path}: mask values must be 0/1 or 0/255, got values in [{low}, {top}]; "
            "binarise it first"
        )
    data = (mask != 0).astype(np.uint8) * np.uint8(255)  # (H, W) 0/255
    if valid is not None and np.shape(valid) != data.shape:
        raise ValueError(
            f"{out_path}: the valid-pixel mask is {np.shape(valid)}, the mask {data.shape}"
        )

    (rasterio,) = _require(f"{out_path}: writing a GeoTIFF", "rasterio")
    with _open_raster(like, "reading GeoTIFF") as src:
        if src.shape != data.shape:
            raise ValueError(
                f"{out_path}: the mask is {data.shape[0]}x{data.shape[1]} but {like} is "
                f"{src.height}x{src.width}; write masks on the grid of their own scene"
            )
        profile: dict[str, Any] = dict(
            driver="GTiff",
            height=src.height,
            width=src.width,
            count=1,
            dtype="uint8",
            compress="deflate",
        )
        gcps, gcp_crs = src.gcps
        if src.transform.is_identity and gcps:
            # Placed by its control points (GDAL gives such a file no geotransform): the mask
            # shares the scene's pixel grid, so the same points place it.
            profile.update(gcps=gcps, crs=gcp_crs)
        else:
            profile.update(crs=src.crs, transform=src.transform)
        if src.rpcs is not None:
            profile["rpcs"] = src.rpcs
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder, so os.replace is an atomic rename; a unique name, so writers do not collide.
    tmp = out_path.with_name(f".{out_path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            # the no-data mask inside the file, not in a .msk file beside it
            with (
                rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True),
                rasterio.open(tmp, "w", **profile) as dst,
            ):
                dst.write(data, 1)
                if valid is not None:
                    dst.write_mask(np.where(valid, np.uint8(255), np.uint8(0)))
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

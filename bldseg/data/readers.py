"""Readers for the layouts users bring: the competition CSVs and image/mask folders.

Both readers return a list of :class:`SourceRecord` (one per cached sample); nothing is decoded
here except to check sizes, so listing 7,140 files is quick. Decoding happens once, when the
cache is built (:mod:`bldseg.data.cache`), with the :class:`ReadOptions` the records carry.

Competition layout (``train.csv``: ``img_id,img_path,mask_rle``, optional ``group``;
``test.csv``: ``img_id,img_path``): ``img_path`` is relative to the CSV's folder and may not
escape it.

Folder layout: images anywhere under an image folder (searched recursively), each matched to
one mask in a mask folder by a naming pattern (``{stem}.png``, ``{stem}_mask.png``,
``{stem}.mask.tif``, ... or the user's), or to a vector file of building footprints
(:mod:`bldseg.data.geo`). Large scenes such as Inria's 5000x5000 are cut into a grid of
``tile_size`` tiles; the last row/column of tiles is shifted inwards so tiles cover the scene
without padding (an image smaller than a tile is refused).

Masks are decoded exactly as real datasets ship them (see :func:`read_mask_image`): one
channel 0/1 or 0/255 (8 or 16 bit), three equal channels, palette PNGs (a grey palette is read
as its grey values; a colour palette drawing one colour on black reads that colour as building,
one drawing more colours is a class palette, refused unless ``mask_values`` names the building
indices, any other colour palette reads index > 0 as building; a pixel drawn fully
transparent, or a palette TIFF's nodata index, is no data, read as background like NaN in a
float mask, with a warning; so is a pixel holding the GDAL nodata value of any other TIFF
mask). A mask that is not binary but looks like one with antialiased edges or JPEG artefacts
is binarised at the midpoint of its range and counted, so the cache build can warn; a label
mask (class or instance ids) needs ``mask_values`` or ``mask_nonzero``; anything ambiguous is
an error naming the file.
"""

from __future__ import annotations

import os
import re
import struct
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import cv2
import numpy as np
import pandas as pd
from PIL import Image, TiffImagePlugin

from bldseg.data import geo
from bldseg.data.rle import rle_decode

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp")

#: Raster formats users bring that image folders do not list (JPEG 2000 orthophotos, GDAL
#: virtual and Erdas files, GIFs, netpbm): an image folder holding them is told so, where
#: listing only :data:`IMAGE_SUFFIXES` skipped them without a word. Some of them OpenCV
#: decodes (a competition CSV may name them), but not their georeference, palette or bands as
#: the listed formats are read. Sidecars (.tfw, .aux.xml, .prj) are not images and are not
#: counted.
UNREAD_RASTER_SUFFIXES = (
    ".jp2", ".j2k", ".jpx", ".gif", ".img", ".vrt", ".ecw", ".sid", ".ntf", ".nitf",
    ".heic", ".heif", ".avif", ".ppm", ".pgm", ".pnm", ".tga", ".jfif",
)  # fmt: skip

#: Mask file names tried for an image ``{stem}`` when no pattern is given, in this order; every
#: one that exists is a candidate, and two candidates for one image are an error.
DEFAULT_MASK_PATTERNS = (
    "{stem}.png",
    "{stem}.tif",
    "{stem}.tiff",
    "{stem}_mask.png",
    "{stem}_mask.tif",
    "{stem}.mask.png",
    "{stem}.mask.tif",
    "{stem}_gt.png",
    "{stem}.jpg",
    "{stem}.webp",
)


#: Version of the decoding rules, part of every cache fingerprint: bumped when a file read with
#: the same options decodes differently (2: grey palettes read as grey values, label masks
#: refused; 3: NaN in float masks read as background, grey palettes with a repeated grey read
#: by colour, palette GeoTIFF images read as their colours; 4: fully transparent palette
#: entries (PNG tRNS, alpha 0 of a PA image, a palette TIFF's GDAL nodata index) read as
#: background and left out of the grey-or-colour palette test; 5: pixels holding the GDAL
#: nodata value of a non-palette TIFF mask (0/1 with nodata 255, uint16 65535, float -9999)
#: read as background, before the binary/threshold/label checks see the mask; 6: colour
#: palettes read by the distinct colours they draw: a colour on black is the building whatever
#: its index (quantize() puts red at index 0), more than two colours (a class palette) are
#: refused instead of read as index > 0; 7: --mask-colors masks with soft edges (resampled,
#: JPEG) read by the nearest class colour and reported as not binary, one-channel masks read
#: as grey colours under --mask-colors, and images' bands declared red/green/blue read as RGB
#: by default; 8: --mask-colors calls a mask of at most 256 colours soft only by a colour near
#: a named one or a blend of one (a clean mask with a thin class was read softly) and then
#: takes no other colour far from the named ones for a building, grey masks under grey colours
#: told soft as without the flag, palette masks read by their colours as RGB ones, one-channel
#: masks under a colour refused), so caches built by older rules are rebuilt.
DECODE_RULES = 8

#: The version of DECODE_RULES in which image (not mask) decoding last changed (3: palette
#: GeoTIFF images read as their colours; 7: bands declared red/green/blue read as RGB). Masks
#: given as RLE (a competition CSV) decode without the mask rules, so their caches are keyed
#: by this alone: a change of the mask rules neither rebuilds them nor stops a search or
#: pipeline on them from resuming. Bump it with DECODE_RULES when image decoding changes.
IMAGE_RULES = 7


@dataclass(frozen=True)
class ReadOptions:
    """How images and masks are decoded (part of the cache's fingerprint).

    Attributes:
        mask_threshold: A mask that is not binary is binarised at this fraction of its range
            (0..1 for masks whose maximum is 1, else 0..255 or 0..65535 by bit depth).
        mask_values: Values (palette indices, class ids) that mean "building"; None: any
            nonzero value of a binary mask, or the colour a colour palette draws on black (see
            :func:`read_mask_image`).
        mask_nonzero: Every nonzero value is a building, as in instance-id masks (each
            building numbered 1..N); False: masks with more than two values must look like
            antialiased/JPEG binary masks, or name their building values in ``mask_values``.
        mask_colors: RGB colours that mean "building" in colour-coded class masks (ISPRS
            Potsdam/Vaihingen: ``((0, 0, 255),)``); None: colour masks must be grey.
        alpha: Images with transparent pixels: ``"refuse"`` (an error naming the file) or
            ``"fill"`` (composited over black, so transparent pixels become 0).
        bands: 1-based band indices read as RGB (one band is replicated to grey); None: the
            bands a multi-band raster declares red, green and blue, else its bands 1, 2, 3; the
            single band of a grey one.
        stretch: Low/high percentiles mapped to 0 and 255 when an image is not 8-bit.
    """

    mask_threshold: float = 0.5
    mask_values: tuple[int, ...] | None = None
    mask_nonzero: bool = False
    mask_colors: tuple[tuple[int, int, int], ...] | None = None
    alpha: Literal["refuse", "fill"] = "refuse"
    bands: tuple[int, ...] | None = None
    stretch: tuple[float, float] = geo.DEFAULT_STRETCH

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_threshold < 1.0:
            raise ValueError(f"mask_threshold must be in (0, 1), got {self.mask_threshold}")
        if self.alpha not in ("refuse", "fill"):
            raise ValueError(f"alpha must be 'refuse' or 'fill', got {self.alpha!r}")
        if self.mask_nonzero and self.mask_values is not None:
            raise ValueError(
                f"give mask_values or mask_nonzero, not both (mask_values={self.mask_values})"
            )
        if self.mask_colors is not None and any(len(c) != 3 for c in self.mask_colors):
            raise ValueError(f"mask_colors: give R,G,B triples, got {self.mask_colors}")
        if self.bands is not None and len(self.bands) not in (1, 3):
            raise ValueError(f"bands: give 1 (grey) or 3 (RGB) band indices, got {self.bands}")
        lo, hi = self.stretch
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"stretch percentiles need 0 <= low < high <= 100, got {self.stretch}")

    def key(self, masks: bool = True) -> list:
        """JSON-able identity for the cache fingerprint; ``masks`` False: of images whose masks
        are not decoded from files (RLE), which the mask rules do not touch."""
        return [
            f"rules{DECODE_RULES}" if masks else f"image-rules{IMAGE_RULES}",
            self.mask_threshold,
            None if self.mask_values is None else list(self.mask_values),
            self.mask_nonzero,
            None if self.mask_colors is None else [list(c) for c in self.mask_colors],
            self.alpha,
            None if self.bands is None else list(self.bands),
            list(self.stretch),
        ]


DEFAULT_READ = ReadOptions()


@dataclass(frozen=True)
class SourceRecord:
    """One sample as found on disk, before decoding.

    Attributes:
        img_id: Unique id, written to submissions (``TRAIN_0001``, ``austin1_y0_x1024``).
        image_path: Absolute path of the image file.
        mask_rle: Competition RLE of the mask (``-1`` for empty), or None.
        mask_path: Path of a mask image or of a vector file of footprints, or None.
        window: ``(y, x, h, w)`` crop of the source image this sample covers, or None for the
            whole image.
        csv_row: 1-based data row in the source CSV (for error messages), or None.
        group: Split group (tiles of one group never sit on both sides of a train/validation
            split); None: the source image.
        options: How to decode the files.
    """

    img_id: str
    image_path: Path
    mask_rle: str | None = None
    mask_path: Path | None = None
    window: tuple[int, int, int, int] | None = None
    csv_row: int | None = None
    group: str | None = None
    options: ReadOptions = field(default=DEFAULT_READ)

    @property
    def has_mask(self) -> bool:
        """Whether this record carries ground truth."""
        return self.mask_rle is not None or self.mask_path is not None


def _check_columns(df: pd.DataFrame, required: tuple[str, ...], path: Path) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(
            f"{path}: missing column(s) {missing}; expected {list(required)}, "
            f"found {list(df.columns)}"
        )


def _without_trailing_fields(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    """The CSV's columns, without the empty fields some writers add after the last one.

    When data rows have more fields than the header (``a,b,c,`` from a trailing comma),
    pandas takes the first fields for the row index and shifts every column by one. The
    fields are put back in file order; the extra ones must be empty, as a value there belongs
    to no column.

    Raises:
        ValueError: A row with a non-empty field past the header's columns (names the row).
    """
    if isinstance(df.index, pd.RangeIndex):
        return df  # as many fields as the header
    levels = [df.index.get_level_values(k).to_numpy() for k in range(df.index.nlevels)]
    fields = np.column_stack([*levels, df.to_numpy()])  # (rows, fields) in file order
    ncol = len(df.columns)
    extra = fields[:, ncol:]
    for i, row in enumerate(extra, start=1):
        values = [str(v) for v in row if str(v).strip()]
        if values:
            raise ValueError(
                f"{path}, row {i}: {len(values)} value(s) past the header's {ncol} columns "
                f"({', '.join(df.columns)}): {values}; remove them, or name their column in "
                "the header"
            )
    return pd.DataFrame(fields[:, :ncol], columns=df.columns)


def read_competition_csv(
    csv_path: str | os.PathLike,
    *,
    with_masks: bool | None = None,
    group_column: str | None = None,
    options: ReadOptions = DEFAULT_READ,
):
    """Reads ``train.csv`` or ``test.csv`` of the competition layout.

    Args:
        csv_path: The CSV file; ``img_path`` values are relative to its folder.
        with_masks: Require the ``mask_rle`` column (True), ignore it (False) or use it when
            present (None).
        group_column: Column naming each row's split group (e.g. the scene a tile was cut
            from); required when given. Without it a ``group`` column is used when present.
        options: How to decode the images.

    Returns:
        A list of :class:`SourceRecord`, in CSV order.

    Raises:
        FileNotFoundError: The CSV or an image it names does not exist.
        ValueError: A file that does not parse as a CSV, missing columns, empty or duplicate
            ids, a path escaping the CSV's folder, or an empty ``mask_rle`` cell. Messages name
            the file and the row.
    """
    csv_path = Path(csv_path).resolve()
    if not csv_path.is_file():
        raise FileNotFoundError(f"CSV file not found: {csv_path}")
    # dtype=str keeps ids like "0001" intact; keep_default_na=False so "-1" and "" stay strings.
    try:
        df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        # pandas' messages name neither the file nor what a readable CSV looks like.
        raise ValueError(
            f"{csv_path}: not a readable CSV ({str(e).strip()}); expected UTF-8 text with a "
            "header row and the same number of comma-separated fields on every line"
        ) from e
    df = _without_trailing_fields(df, csv_path)
    has_rle = "mask_rle" in df.columns
    if with_masks is None:
        with_masks = has_rle
    _check_columns(df, ("img_id", "img_path", *(("mask_rle",) if with_masks else ())), csv_path)
    if group_column is not None:
        _check_columns(df, (group_column,), csv_path)
    elif "group" in df.columns:
        group_column = "group"
    if len(df) == 0:
        raise ValueError(f"{csv_path}: the CSV has no data rows")

    root = csv_path.parent
    records: list[SourceRecord] = []
    seen: dict[str, int] = {}
    groups = df[group_column].astype(str).str.strip() if group_column else None
    for i, row in enumerate(df.itertuples(index=False), start=1):
        img_id = str(row.img_id).strip()
        where = f"{csv_path}, row {i}"
        if not img_id:
            raise ValueError(f"{where}: empty img_id")
        if img_id in seen:
            raise ValueError(f"{where}: duplicate img_id {img_id!r} (first at row {seen[img_id]})")
        seen[img_id] = i
        rel = str(row.img_path).strip()
        if not rel:
            raise ValueError(f"{where} ({img_id}): empty img_path")
        # Normalised, not resolved: a folder beside the CSV may be a link to another disk
        # (train_img -> /mnt/data/train_img); only a path that climbs out with ".." escapes.
        image_path = Path(os.path.normpath(root / rel))
        if not image_path.is_relative_to(root):
            raise ValueError(
                f"{where} ({img_id}): img_path {rel!r} points outside the CSV's folder {root}"
            )
        if not image_path.is_file():
            raise FileNotFoundError(f"{where} ({img_id}): image not found: {image_path}")
        rle = None
        if with_masks:
            rle = str(row.mask_rle).strip()
            if not rle:
                raise ValueError(f"{where} ({img_id}): empty mask_rle; an empty mask is written -1")
        group = None
        if groups is not None:
            group = groups.iloc[i - 1]
            if not group:
                raise ValueError(f"{where} ({img_id}): empty {group_column!r} cell")
        records.append(
            SourceRecord(img_id, image_path, mask_rle=rle, csv_row=i, group=group, options=options)
        )
    return records


def _tile_starts(length: int, tile: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``[0, length)`` without padding."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, tile))
    if starts[-1] + tile < length:
        starts.append(length - tile)  # shift the last tile inwards instead of padding
    return starts


def tile_windows(height: int, width: int, tile: int) -> list[tuple[int, int, int, int]]:
    """Grid of ``(y, x, h, w)`` windows that cover an image with tiles of size ``tile``.

    Tiles do not overlap except the last row/column, which is shifted inwards so that no tile
    needs padding. An image smaller than ``tile`` gives one window of its own size.
    """
    return [
        (y, x, min(tile, height), min(tile, width))
        for y in _tile_starts(height, tile)
        for x in _tile_starts(width, tile)
    ]


def image_size(path: Path) -> tuple[int, int]:
    """Height and width of an image file, read from its header (no full decode).

    Raises:
        ValueError: The file is not a readable image.
    """
    if path.suffix.lower() in geo.GEO_SUFFIXES and geo.geo_available():
        return geo.raster_size(path)
    try:
        with Image.open(path) as im:
            return im.height, im.width
    except (OSError, Image.UnidentifiedImageError) as e:
        raise ValueError(f"{path}: cannot read the image header: {e}") from e


def list_images(folder: str | os.PathLike, *, recursive: bool = True) -> list[Path]:
    """Image files under ``folder`` (suffixes :data:`IMAGE_SUFFIXES`, any case), sorted.

    Hidden files and folders (``.ipynb_checkpoints``, ``.DS_Store``) are skipped. Files of
    another raster format (:data:`UNREAD_RASTER_SUFFIXES`) are skipped with a warning that
    counts them by suffix.

    Raises:
        FileNotFoundError: The folder does not exist.
        ValueError: It holds no image (naming any unread raster files it holds).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    walk = _files_under(folder) if recursive else folder.iterdir()
    found: list[Path] = []
    unread: dict[str, int] = {}  # suffix -> files of a raster format folders do not list
    for p in walk:
        if p.name.startswith(".") or not p.is_file():
            continue
        suffix = p.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            found.append(p)
        elif suffix in UNREAD_RASTER_SUFFIXES:
            unread[suffix] = unread.get(suffix, 0) + 1
    where = "under" if recursive else "in"
    skipped = ""
    if unread:
        counts = ", ".join(f"{n} {s}" for s, n in sorted(unread.items(), key=lambda kv: -kv[1]))
        n = sum(unread.values())
        skipped = (
            f"{n} file{'s' if n > 1 else ''} {where} {folder} {'are' if n > 1 else 'is'} of a "
            f"raster format image folders do not list ({counts}; folders list "
            f"{'/'.join(IMAGE_SUFFIXES)}): convert them, e.g. 'gdal_translate -of GTiff in.jp2 "
            "out.tif'"
        )
    if not found:
        tail = f"; {skipped}" if skipped else ""
        raise ValueError(f"no images with suffix {'/'.join(IMAGE_SUFFIXES)} {where} {folder}{tail}")
    if skipped:
        warnings.warn(f"{skipped}; skipped", stacklevel=2)
    return sorted(found)


def _files_under(folder: Path) -> list[Path]:
    """Every file under ``folder``, through symbolic links to folders, hidden folders skipped.

    Datasets are often assembled from links (``images/austin -> /mnt/inria/austin``), which
    ``Path.rglob`` does not follow. A folder reached twice (a link to a folder already walked,
    or to one of its own parents) is walked once, under the first path met in sorted order, and
    the skip is warned about: the same image under two ids would sit on both sides of a split.
    """
    files: list[Path] = []
    walked: dict[str, str] = {}  # real path -> the path it was walked under
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in walked:
            dirnames[:] = []
            warnings.warn(
                f"{dirpath}: the same folder as {walked[real]} (a symbolic link); its files are "
                "listed once, under the first path",
                stacklevel=3,
            )
            continue
        walked[real] = dirpath
        # Sorted in place, so which path of a folder reached twice wins does not depend on the
        # file system's order.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files.extend(Path(dirpath) / f for f in filenames)
    return files


def mask_name(pattern: str, stem: str) -> str:
    """The mask file name that ``pattern`` gives for an image stem.

    A pattern is a format string with ``{stem}`` (``"{stem}_mask.png"``), or a regular
    expression substitution ``"REGEX=>REPLACEMENT"`` applied to the whole stem
    (``"(\\d+)_img=>\\1\\1.png"`` maps CrowdAI's ``1_img`` to ``11.png``).

    Raises:
        ValueError: A regular-expression pattern does not match the stem, or a bad pattern
            (see :func:`check_mask_pattern`).
    """
    check_mask_pattern(pattern)
    if "=>" in pattern:
        regex, repl = pattern.split("=>", 1)
        m = re.fullmatch(regex, stem)
        if m is None:
            # Quoted, not repr()'d: a repr doubles every backslash the user typed.
            raise ValueError(f"mask pattern '{pattern}': '{regex}' does not match '{stem}'")
        return m.expand(repl)
    return pattern.format(stem=stem)


def check_mask_pattern(pattern: str) -> None:
    """Refuses a mask pattern that could never give a file name, whatever the stem.

    Checked once before any image is matched, so a typo in ``--mask-pattern`` is reported as
    such instead of as a traceback from deep inside the matching, or as "no mask found".

    Raises:
        ValueError: A regular expression that does not compile, a replacement naming a group
            the expression lacks, or a format string without ``{stem}`` or with other fields.
    """
    if "=>" in pattern:
        regex, repl = pattern.split("=>", 1)
        try:
            # sub() parses the replacement even when nothing matches: bad group references
            # (re.error "invalid group reference", IndexError "unknown group name") show here.
            re.compile(regex).sub(repl, "")
        except (re.error, IndexError) as e:
            raise ValueError(
                f"--mask-pattern '{pattern}': not a valid REGEX=>REPLACEMENT: {e}"
            ) from e
        return
    if "{stem}" not in pattern:
        raise ValueError(
            f"--mask-pattern '{pattern}' has no {{stem}}; write e.g. '{{stem}}_mask.png', or "
            "REGEX=>REPLACEMENT"
        )
    try:
        pattern.format(stem="x")
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(
            f"--mask-pattern '{pattern}': {{stem}} is the only field a pattern may hold "
            f"(write a literal brace as {{{{ or }}}}); formatting failed: {e!r}"
        ) from e


def _mask_candidates(
    image: Path, images_dir: Path, masks_dir: Path, patterns: tuple[str, ...]
) -> tuple[list[list[Path]], str | None]:
    """Mask paths for ``image``, by folder: the mirrored sub-folder of ``masks_dir``, then its top.

    Returns:
        The candidate paths of each folder (mirrored first), and why the first pattern that
        gave no name did not apply (a regex that does not match the stem; None when every
        pattern applied).
    """
    rel_dir = image.parent.relative_to(images_dir)
    dirs = [masks_dir / rel_dir] + ([masks_dir] if rel_dir != Path(".") else [])
    levels: list[list[Path]] = []
    skipped: str | None = None
    for d in dirs:
        level: list[Path] = []
        for pat in patterns:
            try:
                cand = d / mask_name(pat, image.stem)
            except ValueError as e:
                # A regex pattern that does not apply to this stem (the patterns themselves
                # were checked up front); the reason is reported when no pattern applies.
                skipped = skipped or str(e)
                continue
            if cand not in level:
                level.append(cand)
        levels.append(level)
    return levels, skipped


def _suffix_folded(path: Path) -> Path:
    """``path`` with its suffix in lower case: masks named ``A.PNG`` match ``{stem}.png``, as
    images with upper-case suffixes are listed."""
    return path.with_suffix(path.suffix.lower())


def _sample_id(image: Path, images_dir: Path) -> str:
    """``sub/dir/name.png`` -> ``sub__dir__name``: unique across sub-folders, CSV-safe."""
    return "__".join(image.relative_to(images_dir).with_suffix("").parts)


def read_folder_dataset(
    images_dir: str | os.PathLike,
    masks_dir: str | os.PathLike | None = None,
    *,
    tile_size: int | None = None,
    mask_pattern: str | None = None,
    footprints: str | os.PathLike | None = None,
    recursive: bool = True,
    options: ReadOptions = DEFAULT_READ,
) -> list[SourceRecord]:
    """Reads an image folder, with a mask (or footprint) file per image.

    Args:
        images_dir: Folder of images (searched recursively, through symbolic links, unless
            ``recursive=False``).
        masks_dir: Folder of masks: each image ``sub/NAME.ext`` is matched to
            ``masks_dir/sub/<pattern>``, else ``masks_dir/<pattern>`` (the suffix in any case);
            None for unlabelled data.
        tile_size: Cut every image into a grid of tiles of this size (for large scenes such as
            Inria's 5000x5000; every image must be at least this large); None keeps whole
            images.
        mask_pattern: Mask file name for an image stem (see :func:`mask_name`); default: each
            of :data:`DEFAULT_MASK_PATTERNS`, where exactly one must exist.
        footprints: Instead of masks, a folder of vector files named like the images
            (``NAME.geojson``/``.gpkg``/``.shp``) or one vector file covering every image; the
            images must be georeferenced (needs ``bldseg[geo]``).
        recursive: Search sub-folders of ``images_dir``.
        options: How to decode images and masks.

    Returns:
        One :class:`SourceRecord` per image or tile, sorted by path; the tiles of one image
        share its split group.

    Raises:
        FileNotFoundError: A folder is missing, or an image has no mask (listing the names
            tried).
        ValueError: No images, two images with one id, two candidate masks for one image, one
            mask matched to two images, two files that are each other's mask (``a.jpg`` and
            ``a.png`` beside each other), both ``masks_dir`` and ``footprints``, a
            ``mask_pattern`` that cannot give a file name (:func:`check_mask_pattern`), or an
            image smaller than ``tile_size``.
    """
    images_dir = Path(images_dir).resolve()
    if masks_dir is not None and footprints is not None:
        raise ValueError("give masks or footprints, not both")
    if tile_size is not None and tile_size < 8:
        raise ValueError(f"tile_size must be >= 8, got {tile_size}")
    if mask_pattern:
        check_mask_pattern(mask_pattern)
    images = list_images(images_dir, recursive=recursive)
    patterns = (mask_pattern,) if mask_pattern else DEFAULT_MASK_PATTERNS
    label_of: dict[Path, Path] = {}
    if masks_dir is not None:
        masks_dir = Path(masks_dir).resolve()
        if not masks_dir.is_dir():
            raise FileNotFoundError(f"mask folder not found: {masks_dir}")
        label_of = _match_masks(images, images_dir, masks_dir, patterns)
        # Masks kept beside their images (``a.png`` + ``a_mask.png`` in one folder) are not
        # images to train on.
        mask_files = set(label_of.values())
        images = [p for p in images if p not in mask_files]
    elif footprints is not None:
        label_of = _match_footprints(images, Path(footprints).resolve())

    records: list[SourceRecord] = []
    seen: dict[str, Path] = {}
    sizes = {} if tile_size is None else _tileable_sizes(images, tile_size)
    for img in images:
        sid = _sample_id(img, images_dir)
        if sid in seen:
            raise ValueError(
                f"two images with the id {sid!r}: {seen[sid]} and {img}; rename one (ids are "
                "the file path without its suffix)"
            )
        seen[sid] = img
        label = label_of.get(img)
        if tile_size is None:
            records.append(SourceRecord(sid, img, mask_path=label, options=options))
            continue
        h, w = sizes[img]
        for y, x, th, tw in tile_windows(h, w, tile_size):
            records.append(
                SourceRecord(
                    f"{sid}_y{y}_x{x}", img, mask_path=label, window=(y, x, th, tw), options=options
                )
            )
    return records


def _tileable_sizes(images: list[Path], tile_size: int) -> dict[Path, tuple[int, int]]:
    """Image -> (height, width), from the headers, refusing images smaller than a tile.

    An image smaller than ``tile_size`` would give one smaller tile, which no cache can hold
    beside the others; the cache build then failed on the size mismatch and advised passing
    the --tile-size that was passed.

    Raises:
        ValueError: An image narrower or lower than ``tile_size`` (names the first, how many
            there are, and the largest tile size every image can give).
    """
    sizes = {img: image_size(img) for img in images}
    small = [img for img, hw in sizes.items() if min(hw) < tile_size]
    if small:
        first = small[0]
        h, w = sizes[first]
        smallest = min(small, key=lambda img: min(sizes[img]))
        side = min(sizes[smallest])
        others = f" ({len(small)} of {len(images)} images are)" if len(small) > 1 else ""
        if smallest != first:
            sh, sw = sizes[smallest]
            others += f"; the smallest is {smallest} ({sh}x{sw})"
        fix = f"pass --tile-size {side} or less, or " if side >= 8 else ""
        raise ValueError(
            f"{first}: the image is {h}x{w}, smaller than --tile-size (tile_size=) {tile_size}"
            f"{others}; every tile must be {tile_size}x{tile_size}: {fix}move the smaller "
            "images out of the folder"
        )
    return sizes


def _match_masks(
    images: list[Path], images_dir: Path, masks_dir: Path, patterns: tuple[str, ...]
) -> dict[Path, Path]:
    """Image -> its one mask file; errors name the image and every name tried.

    A mask in the image's mirrored sub-folder (``masks/x/a.png`` for ``images/x/a.png``) wins
    over one at the top of the mask folder, which only sub-folders without their own mask use.
    """
    by_name: dict[Path, list[Path]] = {}  # suffix-folded path -> the files with that name
    for p in _files_under(masks_dir):
        if p.is_file():
            by_name.setdefault(_suffix_folded(p), []).append(p)
    out: dict[Path, Path] = {}
    unmatched: list[tuple[Path, list[Path], str | None]] = []
    for img in images:
        levels, skipped = _mask_candidates(img, images_dir, masks_dir, patterns)
        found: list[Path] = []
        for level in levels:
            # An image is never its own mask (masks beside images: a.png tries a.png too).
            hits = (f for c in level for f in by_name.get(_suffix_folded(c), []) if f != img)
            found = list(dict.fromkeys(hits))
            if found:
                break
        if len(found) > 1:
            raise ValueError(
                f"{img}: two candidate masks {[str(f) for f in found]}; keep one, or name the "
                "right one with --mask-pattern"
            )
        if found:
            out[img] = found[0]
        else:
            own = _suffix_folded(img)
            tried = [c for level in levels for c in level if _suffix_folded(c) != own]
            unmatched.append((img, tried, skipped))
    _refuse_mutual_masks(out)
    _refuse_shared_masks(out)
    # Beside-the-image masks (images_dir == masks_dir) are listed as images too: an unmatched
    # file that is some image's mask is not an error.
    mask_files = set(out.values())
    unmatched = [u for u in unmatched if u[0] not in mask_files]
    if unmatched:
        img, cands, skipped = unmatched[0]
        tried = ", ".join(str(c.relative_to(masks_dir)) for c in cands)
        if not tried:
            tried = f"no name, as no pattern applies ({skipped})"
        raise FileNotFoundError(
            f"{img}: no mask found in {masks_dir} ({len(unmatched)} of {len(images)} images "
            f"unmatched); tried {tried}. Name masks like the images, or pass --mask-pattern, "
            "e.g. '{stem}_label.png' or '(\\d+)_img=>\\1.png'"
        )
    return out


def _refuse_mutual_masks(mask_of: dict[Path, Path]) -> None:
    """Raises ValueError when two files are each other's mask.

    With masks beside their images, ``a.jpg`` takes ``a.png`` as its mask and ``a.png`` takes
    ``a.jpg``, and both used to be dropped as masks. Which one is the image only the user knows
    (PNG masks beside JPEG photos are the usual case, but PNG tiles beside TIFF masks exist
    too), so the one flag that says it is named.
    """
    pairs = [(img, mask) for img, mask in mask_of.items() if mask_of.get(mask) == img]
    if not pairs:
        return
    img, mask = min(pairs)
    if img.stem == mask.stem:
        advice = (
            f"pass --mask-pattern '{{stem}}{mask.suffix}' if the {mask.suffix} files are the "
            f"masks, or --mask-pattern '{{stem}}{img.suffix}' if the {img.suffix} files are"
        )
    else:
        advice = "name the masks with --mask-pattern"
    raise ValueError(
        f"{img} and {mask} each match the other as its mask ({len(pairs) // 2} such pair(s) "
        f"in all); say which files are the masks: {advice}"
    )


def _refuse_shared_masks(mask_of: dict[Path, Path]) -> None:
    """Raises ValueError when one mask file was matched to two or more images.

    Images in sub-folders also look for their mask at the top of the mask folder, so
    ``images/austin/1.png`` and ``images/chicago/1.png`` would both take ``masks/1.png``.
    """
    images_of: dict[Path, list[Path]] = {}
    for img, mask in mask_of.items():
        images_of.setdefault(mask, []).append(img)
    for mask, imgs in images_of.items():
        if len(imgs) > 1:
            shown = ", ".join(str(p) for p in imgs[:4]) + (", ..." if len(imgs) > 4 else "")
            raise ValueError(
                f"{mask}: one mask matched to {len(imgs)} images ({shown}); every image needs "
                "its own mask: put the masks in sub-folders that mirror the images' "
                "(masks/<sub-folder>/NAME), or name them with --mask-pattern"
            )


def _match_footprints(images: list[Path], footprints: Path) -> dict[Path, Path]:
    """Image -> vector file: one file for all, or ``NAME.<vector suffix>`` in a folder."""
    if footprints.is_file():
        return dict.fromkeys(images, footprints)
    if not footprints.is_dir():
        raise FileNotFoundError(f"footprints not found: {footprints}")
    out = {}
    for img in images:
        cands = [footprints / f"{img.stem}{suf}" for suf in geo.VECTOR_SUFFIXES]
        found = [c for c in cands if c.is_file()]
        if len(found) != 1:
            what = "no footprint file" if not found else "two footprint files"
            raise FileNotFoundError(
                f"{img}: {what} in {footprints}; tried "
                f"{', '.join(c.name for c in cands)}; or pass one vector file for every image"
            )
        out[img] = found[0]
    return out


def _fill_alpha(bgr: np.ndarray, alpha: np.ndarray, path: Path, options: ReadOptions):
    """Drops an opaque alpha channel; transparent pixels: composite over black or refuse."""
    if int(alpha.min()) == 255:
        return bgr
    if options.alpha == "fill":
        a = alpha.astype(np.float32)[..., None] / 255.0  # (H, W, 1)
        return np.rint(bgr.astype(np.float32) * a).astype(np.uint8)
    n = int((alpha < 255).sum())
    raise ValueError(
        f"{path}: {n} transparent pixel(s) in the alpha channel; pass --alpha fill to composite "
        "them over black, or save the image without transparency"
    )


#: How far from a JPEG file's end its end-of-image marker may sit (some writers append a few
#: bytes of padding or metadata after it).
_JPEG_TAIL = 1024


def _refuse_truncated_jpeg(path: Path) -> None:
    """Raises ValueError when ``path`` is a JPEG whose end-of-image marker (FF D9) is missing.

    OpenCV decodes a truncated JPEG without an error (the missing rows come out grey) and only
    prints "Premature end of JPEG file", without the file's name. Entropy-coded data never holds
    FF D9 (a data byte FF is written FF 00), so a marker-free tail means the file was cut.
    Files that do not start like a JPEG (FF D8 FF) are left to the decoder, whatever their
    suffix.
    """
    with open(path, "rb") as f:
        if f.read(3) != b"\xff\xd8\xff":
            return
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - _JPEG_TAIL))
        tail = f.read()
    if b"\xff\xd9" not in tail:
        raise ValueError(
            f"{path}: truncated JPEG (no end-of-image marker in its last {_JPEG_TAIL} bytes, "
            f"{size} bytes in all); the file is incomplete: copy or download it again"
        )


_opencv_quiet_lock = threading.Lock()
_opencv_quiet_users = 0  # reads in progress with OpenCV's warnings off (cache builds thread)
_opencv_level_before = 0  # OpenCV's log level when the first of them began


@contextmanager
def _opencv_warnings_off() -> Iterator[None]:
    """OpenCV's log level at errors for the block, the user's level back afterwards.

    libtiff, inside OpenCV, warns of every GeoTIFF tag it does not know ("TIFF_Warning ...
    Unknown field with tag 33550"): four lines per georeferenced file, tens of thousands on a
    SpaceNet-sized folder, saying nothing about the pixels read. The level is process-wide and
    cache builds read in threads, so it is counted: the last read to end restores it.
    """
    global _opencv_quiet_users, _opencv_level_before
    logging = cv2.utils.logging
    with _opencv_quiet_lock:
        if _opencv_quiet_users == 0:
            _opencv_level_before = logging.getLogLevel()
            logging.setLogLevel(min(_opencv_level_before, logging.LOG_LEVEL_ERROR))
        _opencv_quiet_users += 1
    try:
        yield
    finally:
        with _opencv_quiet_lock:
            _opencv_quiet_users -= 1
            if _opencv_quiet_users == 0:
                logging.setLogLevel(_opencv_level_before)


def _imread(path: Path) -> np.ndarray | None:
    """``cv2.imread(path, IMREAD_UNCHANGED)``, without libtiff's warnings for a TIFF."""
    if path.suffix.lower() not in geo.GEO_SUFFIXES:
        return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    with _opencv_warnings_off():
        return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def read_image(path: str | os.PathLike, options: ReadOptions = DEFAULT_READ) -> np.ndarray:
    """Decodes an image as 8-bit RGB.

    8-bit RGB is kept as is; an opaque alpha channel is dropped (transparent pixels: see
    ``options.alpha``); grey is replicated to three channels; 16-bit and multi-band rasters
    (GeoTIFFs) are read with rasterio and stretched to 8-bit per band between the
    ``options.stretch`` percentiles (:func:`bldseg.data.geo.read_raster_rgb`).

    With rasterio, TIFFs whose bands OpenCV would misread are read with it too
    (:func:`bldseg.data.geo.needs_raster_reader`): a 3+ band grey (MINISBLACK) TIFF gives its
    bands 1, 2, 3, and RGB plus an extra band that is not declared alpha (e.g. near-infrared)
    gives its RGB unchanged, the extra band unused (``--bands`` picks others); so does any
    TIFF read with ``options.bands``. A truncated JPEG is refused.

    Returns:
        uint8 array (H, W, 3) in RGB order.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: The file is not a decodable image, has transparent pixels (unless
            ``alpha="fill"``), or a band selection that does not fit it.
        ImportError: A GeoTIFF or 16-bit image, or ``options.bands`` of a multi-band TIFF
            that is not plain RGB(A), without the ``bldseg[geo]`` extra.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    _refuse_truncated_jpeg(path)
    if path.suffix.lower() in geo.GEO_SUFFIXES and geo.needs_raster_reader(
        path, bands=options.bands
    ):
        bands = f" with --bands {','.join(map(str, options.bands))}" if options.bands else ""
        geo.require_geo(f"{path}: reading this TIFF{bands}")
        return geo.read_raster_rgb(path, bands=options.bands, stretch=options.stretch)
    # IMREAD_UNCHANGED so grey, 16-bit and alpha images are seen as what they are instead of
    # being silently converted.
    img = _imread(path)
    if img is None:
        raise ValueError(f"{path}: cannot decode the image (corrupt, truncated or not an image)")
    if img.dtype != np.uint8:
        geo.require_geo(f"{path} ({img.dtype} image)")
        return geo.read_raster_rgb(path, bands=options.bands, stretch=options.stretch)
    if img.ndim == 2:
        img = img[..., None]
    if img.shape[2] == 2:  # grey + alpha
        img = _fill_alpha(img[..., :1], img[..., 1], path, options)
    elif img.shape[2] == 4:  # BGRA
        if path.suffix.lower() in geo.GEO_SUFFIXES:
            img = _tiff_straight_bgra(path, img)
        img = _fill_alpha(img[..., :3], img[..., 3], path, options)
    if img.shape[2] == 1:
        grey = img[..., 0]
        if options.bands not in (None, (1,)):
            raise ValueError(f"{path}: --bands {options.bands} but the image has one band")
        return np.repeat(grey[..., None], 3, axis=2)
    if img.shape[2] != 3:
        raise ValueError(f"{path}: expected 1, 3 or 4 channels, got shape {img.shape}")
    rgb = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if options.bands is not None and options.bands != (1, 2, 3):
        if max(options.bands) > 3 or min(options.bands) < 1:
            raise ValueError(f"{path}: --bands {options.bands} but the image has 3 bands (1-3)")
        sel = rgb[..., [b - 1 for b in options.bands]]
        rgb = np.repeat(sel, 3, axis=2) if sel.shape[2] == 1 else np.ascontiguousarray(sel)
    return rgb


def _tiff_straight_bgra(path: Path, bgra: np.ndarray) -> np.ndarray:
    """A 4-channel TIFF's pixels with straight (not premultiplied) colour: (H, W, 4) BGRA.

    OpenCV returns a TIFF's colour multiplied by its alpha (libtiff's RGBA interface), so
    filling the transparent pixels would multiply by alpha twice. PIL reads unassociated alpha
    as it is stored and converts associated (premultiplied) alpha back.
    """
    with Image.open(path) as im:
        if im.mode not in ("RGBA", "RGBa"):
            return bgra  # no colour + alpha PIL knows: OpenCV's reading stands
        rgba = np.asarray(im.convert("RGBA"))  # (H, W, 4) RGBA, straight alpha
    return np.ascontiguousarray(rgba[..., [2, 1, 0, 3]])


@dataclass
class MaskRead:
    """A decoded mask.

    Attributes:
        mask: uint8 (H, W) of 0/1.
        binary: Whether the file held exactly two values (or palette indices / named values);
            False when it was binarised at the threshold (antialiased, JPEG).
    """

    mask: np.ndarray
    binary: bool


def _nominal_max(m: np.ndarray) -> float:
    """Top of a mask's value range: 1 for 0..1 masks, else the bit depth's maximum."""
    top = float(m.max())
    if top <= 1.0:
        return 1.0
    if np.issubdtype(m.dtype, np.integer):
        return float(np.iinfo(m.dtype).max)
    return top


def read_mask_image(path: str | os.PathLike, options: ReadOptions = DEFAULT_READ) -> MaskRead:
    """Decodes a mask image exactly as datasets ship it.

    - one channel, 8 or 16 bit: a mask holding one nonzero value (0/1, 0/255, 0/65535) is
      exact; one that looks like a binary mask with antialiased or JPEG-noisy edges (pixels
      near the top of its range, no flat areas of mid-range values) is binarised at
      ``options.mask_threshold`` of its range (0..1 when its maximum is 1, else the bit
      depth's) and reported as not binary; a label mask (class or instance ids) is an error
      unless ``options.mask_values`` or ``options.mask_nonzero`` says which values are
      buildings;
    - three (or four, with an opaque alpha) equal channels: as one channel;
    - float masks: NaN/inf pixels (no data) are background, with a warning counting them;
    - TIFFs with a GDAL nodata value (TIFF tag 42113, as rasterio/GDAL write it): pixels
      holding it (in every band) are no data, background, with a warning counting those that
      would have read as a building (a nodata value of 0 changes nothing); the checks below
      see the mask without them, so a 0/1 mask with nodata 255 stays binary;
    - palette PNGs/TIFFs: when every colour the image uses is grey (PIL's ``quantize`` often
      puts white at index 0; two entries may share a grey), the grey values, read as one
      channel; in a colour palette, the indices in ``options.mask_values`` or
      (``options.mask_nonzero``) index > 0 are buildings; without them the distinct colours
      drawn decide: one colour on black is the building whatever its index (``quantize`` may
      put red at index 0), more than two colours (a class palette) are refused, and otherwise
      (one colour; two, neither black) index > 0 is a building; fully transparent pixels (a
      tRNS entry or PA alpha of 0, a TIFF's GDAL nodata index) are no data: background, with
      a warning counting those the palette would have read as building, and their entries'
      colours decide nothing; under ``options.mask_colors`` (without ``mask_values``) a
      palette image is read as the RGB colours it draws, as below, its transparent pixels
      background;
    - ``options.mask_values`` set: exactly those values are buildings (class-id masks);
    - ``options.mask_nonzero`` set: every nonzero value is a building (instance-id masks);
    - ``options.mask_colors`` set: colour-coded class masks (a one-channel mask as the grey
      colours (v, v, v); under a colour that is not grey it is refused), exactly those RGB
      colours are buildings; a class-colour mask with soft edges (resampled, antialiased,
      JPEG) is read by the nearest class colour and reported as not binary
      (:func:`_colour_classes`).

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: Corrupt or truncated file; colour channels that differ; a mask stored only
            in the alpha channel; transparent pixels; a label mask without ``mask_values`` or
            ``mask_nonzero``; a colour palette of more than two colours without
            ``mask_values``, ``mask_colors`` or ``mask_nonzero``; a one-channel mask under
            ``mask_colors`` that are not grey. Messages name the file and say what to do.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask not found: {path}")
    _refuse_truncated_jpeg(path)
    palette = _read_palette(path)
    nodata = None  # (H, W) pixels holding a TIFF's GDAL nodata value; palettes: in `palette`
    if palette is not None and options.mask_colors is not None and options.mask_values is None:
        # Read by the colours it draws, as the same pixels saved as RGB are: a JPEG'd class
        # mask quantised to a palette (PIL's quantize) draws no exact class colour, and read by
        # entry it had no building, binary. Entries past the palette draw black, as PIL does.
        rgb = np.clip(palette.colours, 0, 255).astype(np.uint8)[palette.indices]  # (H, W, 3)
        # a palette drawing only greys is a grey mask saved as P (PIL's convert("P")): read as
        # one channel, so a colour it cannot hold is refused as for an L-mode mask
        grey = bool((rgb == rgb[..., :1]).all())
        hit, binary = _colour_classes(
            rgb[..., 0] if grey else rgb[..., ::-1], options.mask_colors, path
        )
        return MaskRead(_transparent_to_background(hit, palette, hit > 0, path), binary)
    if palette is not None:
        labels = _palette_labels(palette, options, path)
        # (H, W) uint8 0/1 labels, or grey values read on as one channel (all >= 0 but where
        # the pixel is transparent, which is zeroed next).
        m = labels if labels is not None else palette.colours[:, 0][palette.indices]
        building = m > 0  # (H, W) what the palette would read as building
        if labels is None:
            # read as grey values: a transparent entry that is no grey (a magenta colour key
            # on the background) was left out of the grey test and would read as nothing
            c = palette.colours
            grey = (c >= 0).all(axis=1) & (c == c[:, :1]).all(axis=1)  # (256,)
            building &= grey[palette.indices]
        m = _transparent_to_background(m.astype(np.uint8), palette, building, path)
        if labels is not None:
            return MaskRead(m, True)
    else:
        m = _imread(path)
        if m is None:
            raise ValueError(f"{path}: cannot decode the mask (corrupt, truncated or not an image)")
        nodata_text = _gdal_nodata(path)
        nodata = _nodata_pixels(m, nodata_text)  # (H, W) bool, or None
        if options.mask_colors is not None:
            # one channel too, as the grey colour (v, v, v): the named colours decide polarity
            # whatever the channel count (a grey 0/255 mask under --mask-colors 0,0,0 reads
            # black as building, as the same mask saved as RGB does)
            hit, binary = _colour_classes(m, options.mask_colors, path)
            if nodata is not None:
                hit = _nodata_to_background(hit, nodata, hit > 0, nodata_text, path)
            return MaskRead(hit, binary)
        if np.issubdtype(m.dtype, np.floating):
            m = _no_data_to_background(m, path)
        if m.ndim == 3:
            m = _one_channel(m, path)
        if nodata is not None:
            named = options.mask_values
            building = m != 0 if named is None else np.isin(m, named)  # (H, W)
            m = _nodata_to_background(m, nodata, building, nodata_text, path)
    if options.mask_values is not None:
        hit = np.isin(m, options.mask_values)
        if nodata is not None:
            hit &= ~nodata  # zeroed, but still no data where 0 is a named value
        return MaskRead(hit.astype(np.uint8), True)
    if options.mask_nonzero:
        return MaskRead((m > 0).astype(np.uint8), True)
    if m.dtype == np.uint8:
        counts = np.bincount(m.ravel(), minlength=256)
        values = np.flatnonzero(counts)
        counts = counts[values]
    else:
        values, counts = np.unique(m, return_counts=True)
    if (len(values) <= 2 and values[0] == 0) or len(values) == 1:
        return MaskRead((m > 0).astype(np.uint8), True)
    cut = options.mask_threshold * _nominal_max(m)
    _refuse_label_mask(m, values, counts, cut, path)
    return MaskRead((m > cut).astype(np.uint8), False)


def _no_data_to_background(m: np.ndarray, path: Path) -> np.ndarray:
    """A float mask with NaN/inf (no-data, e.g. outside a scene's footprint) -> those pixels 0.

    Left in, NaN makes the mask's maximum NaN and every comparison with the threshold False:
    the whole mask would read as empty. Nothing is known of buildings where there is no data,
    so those pixels are background, and the count is warned about.
    """
    bad = ~np.isfinite(m)  # (H, W) or (H, W, C)
    n = int((bad if bad.ndim == 2 else bad.any(axis=2)).sum())
    if n == 0:
        return m
    warnings.warn(
        f"{path}: {n} of {m.shape[0] * m.shape[1]} mask pixels are NaN/inf (no data); read as "
        "no building",
        stacklevel=3,
    )
    return np.where(bad, 0, m).astype(m.dtype)


def _gdal_nodata(path: Path) -> str | None:
    """The GDAL nodata value (TIFF tag 42113, text) of a TIFF's first image; None if none.

    Read from the image's header alone, so the pixels are decoded once (by OpenCV); PIL's
    directory reader takes any TIFF, also those whose pixels PIL cannot decode (float64).
    Files that are not TIFFs have no such tag.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if head[2:4] in (b"\x2b\x00", b"\x00\x2b"):  # BigTIFF: 8-byte offset follows
                head += f.read(8)
            ifd = TiffImagePlugin.ImageFileDirectory_v2(head)
            f.seek(ifd.next)
            ifd.load(f)
    except (OSError, SyntaxError, ValueError, struct.error, EOFError):
        return None  # not a TIFF, or a header the decoder will report on
    nodata = ifd.get(_GDAL_NODATA_TAG)
    return None if nodata is None else str(nodata).strip("\x00 ")


def _nodata_number(nodata: object) -> float | None:
    """The number a GDAL nodata tag holds (text such as "255", "-9999", "nan"), if any."""
    if nodata is None:
        return None
    try:
        return float(str(nodata).strip("\x00 "))
    except ValueError:
        return None  # not a number GDAL would read either: no pixel is no data


def _nodata_pixels(m: np.ndarray, nodata: str | None) -> np.ndarray | None:
    """(H, W) bool: pixels of a decoded mask whose every band holds the nodata value.

    As GDAL compares, the value is cast to the pixels' type, and one that type cannot hold
    (255.5 or -9999 in a uint8 mask) marks no pixel. A pixel is no data only when all its
    bands are (rasterio's ``dataset_mask``): a building coloured (0, 0, 255) under nodata 0
    keeps its colour. NaN/inf are left to :func:`_no_data_to_background`. None: no pixel.
    """
    value = _nodata_number(nodata)
    if value is None or not np.isfinite(value):
        return None
    if np.issubdtype(m.dtype, np.integer):
        info = np.iinfo(m.dtype)
        if not value.is_integer() or not info.min <= value <= info.max:
            return None
    with np.errstate(over="ignore"):
        target = np.asarray(value).astype(m.dtype)  # () in the pixels' type
    if not np.isfinite(target):
        return None  # past float32's range: no pixel can hold it
    hit = m == target  # (H, W) or (H, W, C)
    if hit.ndim == 3:
        hit = hit.all(axis=2)
    return hit if hit.any() else None


def _nodata_to_background(
    m: np.ndarray, nodata: np.ndarray, building: np.ndarray, value: str | None, path: Path
) -> np.ndarray:
    """(H, W) mask with its GDAL nodata pixels 0.

    Nothing is known of buildings where there is no data (a scene's border, a gap between
    flight lines): like NaN in a float mask it is background. The count is warned about only
    where the pixels would have read as a building (``building``): a nodata value of 0, the
    usual profile copied from the imagery, changes nothing.
    """
    n = int((nodata & building).sum())
    if n:
        warnings.warn(
            f"{path}: {n} of {m.shape[0] * m.shape[1]} mask pixels are no data (GDAL nodata "
            f"value {value}; if they are buildings, unset it: gdal_edit.py -unsetnodata); read "
            "as no building",
            stacklevel=3,
        )
    return np.where(nodata, 0, m).astype(m.dtype)


class _Palette(NamedTuple):
    """A palette image as read: indices, colours, and the pixels it marks as no data."""

    indices: np.ndarray  # (H, W) uint8
    colours: np.ndarray  # (256, 3) int16 RGB, -1 past the palette
    clear: np.ndarray  # (H, W) bool, pixels drawn fully transparent (no data)
    why: str  # what marks them, for the warning ("" when none are)


#: TIFF tag in which GDAL stores a raster's nodata value (as text).
_GDAL_NODATA_TAG = 42113


def _read_palette(path: Path) -> _Palette | None:
    """A palette image's indices, colours and no-data pixels; None for other images.

    A palette's entries past its length are black, as PIL draws them; they are marked by a
    colour of -1 so that no index beyond the palette is taken for grey. Pixels are no data
    where they are drawn fully transparent: an entry of alpha 0 in a PNG's tRNS chunk (PIL's
    ``info["transparency"]``, one index or one alpha per entry), alpha 0 in a palette + alpha
    (PA) image, or a TIFF's GDAL nodata index (a TIFF colour map holds no alpha: GDAL reports
    the nodata entry as the transparent one). Partly transparent entries (an overlay's
    half-opaque building colour) are still drawn, so they keep their meaning.
    """
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "PA"):
                return None
            indices = np.asarray(im.getchannel(0) if im.mode == "PA" else im)  # (H, W) uint8
            entries = np.asarray(im.getpalette() or [], np.int16).reshape(-1, 3)[:256]
            alpha = np.asarray(im.getchannel(1)) if im.mode == "PA" else None  # (H, W)
            transparency = im.info.get("transparency")
            nodata = getattr(im, "tag_v2", {}).get(_GDAL_NODATA_TAG)
    except (OSError, Image.UnidentifiedImageError):
        return None  # not for PIL (e.g. some TIFFs): OpenCV decides
    colours = np.full((256, 3), -1, np.int16)  # (256, 3) RGB, -1 past the palette
    colours[: len(entries)] = entries
    hidden = np.zeros(256, bool)  # (256,) entries drawn fully transparent
    if isinstance(transparency, int) and 0 <= transparency < 256:
        hidden[transparency] = True
    elif isinstance(transparency, bytes):
        hidden[: len(transparency)] = np.frombuffer(transparency[:256], np.uint8) == 0
    source = "fully transparent"
    index = _nodata_index(nodata)
    if index is not None:
        hidden[index] = True
        source = "GDAL nodata"
    clear = hidden[indices]  # (H, W)
    used = np.flatnonzero(hidden & np.bincount(indices.ravel(), minlength=256).astype(bool))
    why = ""
    if len(used):
        names = ", ".join(str(i) for i in used)
        why = f"palette {'index' if len(used) == 1 else 'indices'} {names}: {source}"
    if alpha is not None and (alpha == 0).any():
        clear |= alpha == 0
        why = f"{why}, alpha 0" if why else "alpha 0"
    return _Palette(indices, colours, clear, why)


def _nodata_index(nodata: object) -> int | None:
    """The palette index a GDAL nodata tag names (text such as "255" or "2.0"), if any."""
    value = _nodata_number(nodata)
    if value is not None and value.is_integer() and 0 <= value < 256:
        return int(value)
    return None


def _transparent_to_background(
    m: np.ndarray, palette: _Palette, building: np.ndarray, path: Path
) -> np.ndarray:
    """(H, W) mask of a palette image with its no-data (transparent) pixels 0.

    A fully transparent pixel shows nothing, so nothing is known of buildings there: like NaN
    in a float mask it is background. The count is warned about only where the palette would
    have read a building (``building``, (H, W) bool): a transparent background (the usual
    overlay export, a colour key) changes nothing.
    """
    n = int((palette.clear & building).sum())
    if n:
        warnings.warn(
            f"{path}: {n} of {m.shape[0] * m.shape[1]} mask pixels are no data ({palette.why}) "
            "where the palette would read a building; read as no building",
            stacklevel=3,
        )
    # zeroed even where nothing is warned: a colour key's grey-path value is its red channel
    return np.where(palette.clear, 0, m).astype(m.dtype)


def _palette_labels(palette: _Palette, options: ReadOptions, path: Path) -> np.ndarray | None:
    """(H, W) 0/1 mask of a palette image read by index, or None to read its grey values.

    Grey values are read when every colour the image draws is grey, duplicates included (a 0/255
    mask saved as a palette, possibly inverted: PIL's ``quantize`` and ``ADAPTIVE`` palettes
    often put white at index 0), unless ``mask_values`` names what is a building
    (``mask_nonzero``: every index > 0 of a colour palette; under ``mask_colors`` a palette is
    not read here but by its colours, :func:`_colour_classes`). Otherwise the distinct colours
    drawn decide (two entries of one colour count once):

    - two, one of them black: the other colour is the building, whatever its index (a red mask
      through ``quantize`` has red at index 0 and black at index 1);
    - one (not grey): index > 0 is a building;
    - two, neither black (white background, red buildings): index > 0 is a building;
    - more (a class palette: background, road, building, a 255 "ignore" border): refused,
      naming the file and its colours, as a grey label mask is.

    Entries seen only in transparent pixels are not drawn, so their colour (a magenta colour
    key, say) decides nothing.

    Raises:
        ValueError: A colour palette drawing more than two colours, without ``mask_values``,
            ``mask_colors`` or ``mask_nonzero``.
    """
    indices, colours = palette.indices, palette.colours
    if options.mask_values is not None:
        return np.isin(indices, options.mask_values).astype(np.uint8)
    counts = np.bincount(indices[~palette.clear], minlength=256)  # (256,) pixels drawn per entry
    used = np.flatnonzero(counts)
    rgb = colours[used]  # (K, 3)
    # Greys are read as what they show, also when two indices share one (a second black entry
    # is common): the index of a grey palette is no label.
    if (rgb >= 0).all() and (rgb == rgb[:, :1]).all():
        return None
    if options.mask_nonzero:
        return (indices > 0).astype(np.uint8)  # instance ids: every index but 0
    # Counted by colour, not by index: two entries of one colour draw one thing.
    drawn = np.unique(rgb, axis=0)  # (D, 3) distinct colours drawn
    black = (drawn == 0).all(axis=1)  # (D,)
    if len(drawn) == 2 and black.any():
        # A building colour on black: PIL's quantize()/ADAPTIVE palettes order entries by
        # frequency or colour, so the building colour may be index 0 and black index 1. Every
        # entry that is not black counts, so the no-data warning still counts a transparent
        # entry's pixels where its colour would have drawn a building.
        not_black = (colours != 0).any(axis=1)  # (256,)
        return not_black[indices].astype(np.uint8)
    if len(drawn) > 2:
        _refuse_class_palette(used, rgb, counts[used], path)
    return (indices > 0).astype(np.uint8)


def _refuse_class_palette(
    used: np.ndarray, rgb: np.ndarray, counts: np.ndarray, path: Path
) -> None:
    """Raises ValueError for a colour palette drawing more than two colours (a class palette).

    Its indices are classes (0 background, 1 road, 2 building, 255 an "ignore" border): read as
    index > 0 every class would be a building. Refused as a grey label mask is, naming what the
    user can pass.

    Args:
        used: (K,) palette indices drawn (transparent pixels left out).
        rgb: (K, 3) their colours, -1 past the palette.
        counts: (K,) pixels drawn with each.
        path: The file, for the message.
    """

    def entry(i: int, c: np.ndarray, n: int) -> str:
        colour = "past the palette" if (c < 0).any() else f"RGB {','.join(map(str, c.tolist()))}"
        return f"index {i} {colour}: {n} px"

    shown = [entry(int(i), c, int(n)) for i, c, n in zip(used, rgb, counts, strict=True)]
    listed = "; ".join(shown[:8]) + (f"; ... ({len(used)} in all)" if len(used) > 8 else "")
    k = int(np.flatnonzero(used > 0)[0])  # the first index > 0, as the grey message's example
    colour = ",".join(map(str, rgb[k].tolist())) if (rgb[k] >= 0).all() else "R,G,B"
    raise ValueError(
        f"{path}: this looks like a class palette, not a binary mask: it draws "
        f"{len(np.unique(rgb, axis=0))} colours ({listed}), and reading every index > 0 as a "
        f"building would take each class for one. Name the building indices with --mask-values "
        f"(e.g. --mask-values {used[k]}) or their colours with --mask-colors (e.g. --mask-colors "
        f"{colour}); for instance ids (each building its own index) pass --mask-nonzero"
    )


def _refuse_label_mask(
    m: np.ndarray, values: np.ndarray, counts: np.ndarray, cut: float, path: Path
) -> None:
    """Raises ValueError unless a multi-valued mask looks like a binary one with soft edges.

    Antialiasing, resampling and JPEG leave building interiors near the top of the range and
    mid-range values only on edges, where neighbours differ. Label masks (class ids 0/1/2,
    instance ids 1..N) hold nothing above the cut at all (small ids, or 16-bit ids) or flat
    areas of mid-range values (pixels whose four neighbours share their value; more than 5%
    of the mid-range pixels): binarising them would silently drop buildings. A mask with an
    "ignore" value (0/1/255: 1 building, 255 ignore) keeps only the ignored pixels at the cut;
    it is told by the nonzero values below the cut lying mostly in flat areas (more than half
    of them; JPEG's near-black noise and resampled edges stay under 3% on real masks).

    Args:
        m: (H, W) one-channel mask.
        values: Its distinct values, ascending (3 or more, or 2 without 0).
        counts: Pixels of each value.
        cut: The threshold it would be binarised at.
        path: The file, for the message.
    """
    why = _label_mask_why(m, values, counts, cut)
    if why is None:
        return
    top = _nominal_max(m)
    shown = ", ".join(str(v) for v in values[:8]) + (
        f", ..., {values[-1]}" if len(values) > 8 else ""
    )
    example = values[values > 0][0]
    jpeg = ""
    if path.suffix.lower() in (".jpg", ".jpeg"):
        jpeg = "; a 0/1 mask saved as JPEG cannot be read exactly (JPEG changes values): save PNG"
    raise ValueError(
        f"{path}: this looks like a label mask (class or instance ids), not a binary one: it "
        f"holds {len(values)} values ({shown}), and binarising it at {cut:g} of 0..{top:g} "
        f"{why}. For class ids name the building ids with --mask-values (e.g. --mask-values "
        f"{example}); for instance ids (each building its own number) pass --mask-nonzero{jpeg}"
    )


def _label_mask_why(
    m: np.ndarray, values: np.ndarray, counts: np.ndarray, cut: float
) -> str | None:
    """Why a multi-valued one-channel mask is a label mask, not a binary one with soft edges
    (the text :func:`_refuse_label_mask` gives); None when it looks binary with soft edges.

    Args as :func:`_refuse_label_mask`'s.
    """
    if not np.issubdtype(m.dtype, np.integer):
        return None  # float masks are soft 0..1 maps: thresholding is what they are for
    top = _nominal_max(m)
    kept = int(counts[values > cut].sum())
    mid = (m > 0.25 * top) & (m < 0.75 * top)  # (H, W)
    c = m[1:-1, 1:-1]  # (H-2, W-2) pixels with four neighbours
    flat = mid[1:-1, 1:-1] & (c == m[:-2, 1:-1]) & (c == m[2:, 1:-1])
    flat &= (c == m[1:-1, :-2]) & (c == m[1:-1, 2:])
    n_mid, n_flat = int(mid.sum()), int(flat.sum())
    low = (m > 0) & (m <= cut)  # (H, W) nonzero pixels the cut drops
    low_flat = low[1:-1, 1:-1] & (c == m[:-2, 1:-1]) & (c == m[2:, 1:-1])
    low_flat &= (c == m[1:-1, :-2]) & (c == m[1:-1, 2:])
    n_low, n_low_flat = int(low.sum()), int(low_flat.sum())
    dropped_flat = n_low_flat > 16 and n_low_flat > 0.5 * n_low
    if kept > 0 and n_flat <= 0.05 * n_mid and not dropped_flat:
        return None
    nonzero = int(counts[values > 0].sum())
    if kept == 0:
        why = f"would keep none of its {nonzero} nonzero pixels"
    elif dropped_flat:
        dropped = values[(values > 0) & (values <= cut)]
        names = ", ".join(str(v) for v in dropped[:4]) + (", ..." if len(dropped) > 4 else "")
        why = (
            f"would drop {n_low} pixels of value {names}, which fill whole areas (a class, or "
            f"buildings beside an 'ignore' value such as 255 in a 0/1/255 mask: bldseg has no "
            f"ignore label, --mask-values 1 reads the ignored pixels as background)"
        )
    else:
        why = (
            f"would cut through {n_flat} pixels inside flat areas of mid-range values, which "
            "antialiasing does not make"
        )
    return why


#: Colour distance (Euclidean, 0..255 per channel) within which a soft-edged class-colour mask's
#: pixels are taken for one class colour: JPEG moves flat colours by up to ~20 (q75), while
#: class palettes keep their colours further apart (ISPRS 255; a palette with two colours
#: closer than this reads them as one class in a soft-edged mask).
_COLOUR_TOLERANCE = 32.0


def _colour_classes(m: np.ndarray, colours, path: Path) -> tuple[np.ndarray, bool]:
    """Class-colour mask -> ((H, W) uint8 0/1 where it shows a building colour, binary).

    ``m``: (H, W, 3|4) BGR(A), or (H, W) grey, read as the colour (v, v, v). A clean class mask
    (every pixel exactly one class colour) is read by exact colour, binary. A mask with soft
    edges is not: resampling blends neighbouring class colours (a 256->128->256 bilinear ISPRS
    mask has ~30k colours and ~half its building pixels off (0, 0, 255)) and JPEG moves every
    pixel off its colour (none stays (0, 0, 255)), so exact matching silently drops buildings.

    The test is kept conservative, since a clean mask read softly takes other classes for
    buildings: a mask of at most 256 colours (class masks hold at most one colour per uint8
    class id) is clean unless a colour other than the named ones lies within
    _COLOUR_TOLERANCE of one (a JPEG'd, quantised or blended building colour; no class palette
    puts another class that close to the building's) or on the line between a named colour and
    another drawn one (:func:`_blends_of_named`: a resampled edge, whose blends step too far
    apart for the tolerance). Whether a class fills areas or is drawn
    only in 1-px lines and specks decides nothing. Grey masks under grey colours (class ids
    0/1/2/3 under 1,1,1 lie within the tolerance of each other) are told as a one-channel mask
    is without --mask-colors: two values, or a label mask, are clean; a binary one with soft
    edges is not (:func:`_label_mask_why`). A soft mask is read by the nearest class colour
    (:func:`_nearest_class`), as a soft one-channel mask is binarised at the midpoint of its
    range, and reported as not binary; in one of at most 256 colours only the colours near a
    named one or blends of one can be a building: its other colours are exact colours drawn on
    purpose (a thin class), which the nearest-class reading would merge into the building
    whenever they are too rare to be found as a class of their own.

    Raises:
        ValueError: A one-channel mask under a colour that is not grey (it cannot draw it: its
            buildings would all read as background); a mask that is not 8-bit grey or RGB.
    """
    named = np.asarray(colours, np.int32).reshape(-1, 3)
    named_grey = bool((named == named[:, :1]).all())
    if m.ndim == 2 and not named_grey:
        flag = ";".join(",".join(map(str, c)) for c in named.tolist())
        colour = " ".join(",".join(map(str, c)) for c in named.tolist() if len(set(c)) > 1)
        raise ValueError(
            f"{path}: a one-channel (grey) mask cannot hold the colour(s) {colour} that "
            f"--mask-colors '{flag}' names, so its buildings would read as background; convert "
            "the grey masks to the class colours (RGB), or read grey masks with --mask-values "
            "(e.g. --mask-values 255) or without a mask flag"
        )
    if m.dtype != np.uint8 or (m.ndim == 3 and m.shape[2] not in (3, 4)):
        raise ValueError(
            f"{path}: --mask-colors needs an 8-bit RGB (or grey) mask, got {m.shape} {m.dtype}; "
            "save the mask as 8-bit RGB PNG"
        )
    bgr = np.repeat(m[..., None], 3, axis=2) if m.ndim == 2 else np.ascontiguousarray(m[..., :3])
    key = bgr[..., 2].astype(np.int32) << 16  # (H, W) one int per colour, R << 16 | G << 8 | B
    key |= bgr[..., 1].astype(np.int32) << 8
    key |= bgr[..., 0]
    named_key = (named[:, 0] << 16) | (named[:, 1] << 8) | named[:, 2]  # (K,)
    # Tables over all 2**24 colours (16 MB each) instead of np.unique: a 5000x5000 mask is
    # sorted in seconds, looked up in a fraction of one.
    drawn = np.zeros(1 << 24, bool)
    drawn[key] = True
    seen = np.flatnonzero(drawn)  # (N,) the colours drawn
    seen_rgb = _key_rgb(seen)  # (N, 3)
    few = len(seen) <= 256
    grey = named_grey and bool((seen_rgb == seen_rgb[:, :1]).all())
    if grey:
        g = bgr[..., 0]  # (H, W)
        values = (seen & 255).astype(np.uint8)
        counts = np.bincount(g.ravel(), minlength=256)[values]
        cut = 0.5 * _nominal_max(g)
        clean = len(values) <= 2 or _label_mask_why(g, values, counts, cut) is not None
    else:
        clean = False  # more than 256 colours: soft, without a look at each
        if few:
            to_named = _distances(seen_rgb, named.astype(np.float32)).min(axis=1)  # (N,)
            blend = _blends_of_named(seen_rgb, named, seen_rgb)  # (N,)
            loose = ~np.isin(seen, named_key)  # (N,) drawn colours not named
            clean = not ((to_named[loose] <= _COLOUR_TOLERANCE) | blend[loose]).any()
    lut = np.zeros(1 << 24, bool)  # colour -> building
    if clean:
        lut[named_key] = True
        return lut[key].astype(np.uint8), True
    anchors = _class_anchors(key, _colour_spread(bgr), named, _COLOUR_TOLERANCE)  # named first
    hit = _nearest_class(seen_rgb, anchors, len(named))  # (N,)
    if few and not grey:
        # a building's blends are read by the nearest class colour, other colours far from
        # every named one are no building (a thin class too rare to be found as a class)
        hit &= (to_named <= _COLOUR_TOLERANCE) | blend
    lut[seen[hit]] = True
    return lut[key].astype(np.uint8), False


def _blends_of_named(colours: np.ndarray, named: np.ndarray, drawn: np.ndarray) -> np.ndarray:
    """(N,) bool: ``colours`` ((N, 3) RGB) that lie between a named colour (``named``, (K, 3))
    and another drawn colour (``drawn``, (M, 3)), within 2 of the segment joining them: what
    resampling or antialiasing makes of a building's edge (a 2x bilinear upsample of blue on
    white draws (64, 64, 255), 64 from the blue, beyond _COLOUR_TOLERANCE). Exact class
    palettes seldom put a class on such a segment."""
    colours = np.asarray(colours, np.float32)
    out = np.zeros(len(colours), bool)
    for a in np.asarray(named, np.float32):
        d = np.asarray(drawn, np.float32) - a  # (M, 3) from the named colour to each drawn
        length2 = (d * d).sum(axis=1)
        d, length2 = d[length2 > 0], length2[length2 > 0]
        c = colours - a  # (N, 3)
        t = (c @ d.T) / length2  # (N, M) where along each segment a colour projects
        off = (c * c).sum(axis=1)[:, None] - t * t * length2  # squared distance to the line
        out |= ((t > 0) & (t < 1) & (off <= 4.0)).any(axis=1)
    return out


def _colour_spread(colour: np.ndarray) -> np.ndarray:
    """(H, W) uint8: the largest per-channel range of each pixel's 3x3 neighbourhood."""
    kernel = np.ones((3, 3), np.uint8)
    # erode/dilate skip pixels outside the image (their default border), so edges count too
    a, b, c = cv2.split(cv2.subtract(cv2.dilate(colour, kernel), cv2.erode(colour, kernel)))
    return cv2.max(cv2.max(a, b), c)


def _key_rgb(keys: np.ndarray) -> np.ndarray:
    """(N,) colour keys (R << 16 | G << 8 | B) -> (N, 3) float32 RGB."""
    return np.stack([keys >> 16, (keys >> 8) & 255, keys & 255], axis=1).astype(np.float32)


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, 3), (M, 3) float32 colours -> (N, M) Euclidean distances (one column at a time:
    N may be every colour of a large JPEG mask, M is a few class colours)."""
    out = np.empty((len(a), len(b)), np.float32)
    for j, colour in enumerate(b):
        out[:, j] = np.sqrt(((a - colour) ** 2).sum(axis=1))
    return out


def _class_anchors(
    key: np.ndarray, spread: np.ndarray, named: np.ndarray, tolerance: float
) -> np.ndarray:
    """(A, 3) float32 class colours of a (possibly soft-edged) class-colour mask, named first.

    The other classes are found where the mask is nearly flat (a 3x3 neighbourhood spanning at
    most tolerance / 2 per channel: interiors, also under JPEG noise; blends lie on edges): the
    most frequent such colour is a class colour when its flat pixels within ``tolerance`` hold
    at least 0.05% of the mask (and 16 px), and those pixels are then taken; repeated until
    none is left. Flat colours within ``tolerance`` of a named colour are that colour.
    """
    fkeys, fcounts = np.unique(key[spread <= tolerance / 2], return_counts=True)
    fcolours = _key_rgb(fkeys)  # (F, 3)
    named = named.astype(np.float32)
    left = _distances(fcolours, named).min(axis=1) > tolerance  # (F,)
    least = max(16, 0.0005 * key.size)
    found = []
    while left.any():
        i = np.flatnonzero(left)[fcounts[left].argmax()]
        near = left & (_distances(fcolours, fcolours[i : i + 1])[:, 0] <= tolerance)
        if fcounts[near].sum() >= least:
            found.append(fcolours[i])
        left &= ~near
    return np.concatenate([named, np.asarray(found, np.float32).reshape(-1, 3)])


def _nearest_class(colours: np.ndarray, anchors: np.ndarray, n_named: int) -> np.ndarray:
    """(N,) bool: colours read as a building in a soft-edged class-colour mask.

    A colour is a building when its nearest class colour (``anchors``, (A, 3), the first
    ``n_named`` named) is a named one, strictly (a tie between a building and another class
    is not one), and it lies within three quarters of the way from that colour to the nearest
    other class colour (or within the tolerance, when no other is found): a blend of building
    and background is cut at its midpoint, as a soft one-channel mask is, while a colour far
    from every class (a mix of other classes, or a class too rare to be found) is not taken
    for a building.
    """
    dist = _distances(colours, anchors)  # (N, A)
    to_named = dist[:, :n_named].min(axis=1)
    which = dist[:, :n_named].argmin(axis=1)
    if len(anchors) == n_named:
        return to_named <= _COLOUR_TOLERANCE
    to_other = dist[:, n_named:].min(axis=1)
    reach = 0.75 * _distances(anchors[:n_named], anchors[n_named:]).min(axis=1)  # (K,)
    return (to_named < to_other) & (to_named <= reach[which])


def _top_colours(colour: np.ndarray, k: int = 4) -> list[list[int]]:
    """The ``k`` most frequent RGB colours of a (H, W, 3) BGR array."""
    flat = colour.reshape(-1, 3)[:, ::-1]
    uniq, counts = np.unique(flat, axis=0, return_counts=True)
    return [uniq[i].tolist() for i in np.argsort(-counts)[:k]]


def _one_channel(m: np.ndarray, path: Path) -> np.ndarray:
    """(H, W, C) colour mask (BGR/BGRA/grey+alpha) -> (H, W), refusing what is ambiguous."""
    colour, alpha = (m, None) if m.shape[2] in (1, 3) else (m[..., :-1], m[..., -1])
    if alpha is not None and int(alpha.min()) < int(np.iinfo(m.dtype).max):
        if (colour == colour.reshape(-1, colour.shape[2])[0]).all():
            raise ValueError(
                f"{path}: the mask is stored only in the alpha channel (the colour channels "
                "are constant); save the alpha channel as a single-channel mask"
            )
        raise ValueError(
            f"{path}: mask with transparent pixels; save it as a single-channel image without alpha"
        )
    if not (colour == colour[..., :1]).all():
        ys, xs = np.nonzero((colour != colour[..., :1]).any(axis=2))
        px = colour[ys[0], xs[0]][::-1].tolist()  # BGR -> RGB
        raise ValueError(
            f"{path}: colour mask with differing channels (pixel y={ys[0]}, x={xs[0]} is RGB "
            f"{px}; most frequent colours {_top_colours(colour)}); bldseg needs one channel "
            "(0 background, nonzero building): for a colour-coded class mask name the building "
            "colour with --mask-colors R,G,B (e.g. 0,0,255 for ISPRS), else save the building "
            "class as a single-channel or palette PNG"
        )
    return colour[..., 0]


@dataclass
class DecodedRecord:
    """A record decoded: image (H, W, 3) uint8, mask (H, W) uint8 0/1 or None, and whether
    the mask file was binary as stored (False: binarised at the threshold)."""

    image: np.ndarray
    mask: np.ndarray | None
    mask_binary: bool = True


def check_mask_grid(image_path: str | os.PathLike, mask_path: str | os.PathLike) -> None:
    """Raises ValueError when a mask GeoTIFF is georeferenced to another place than its GeoTIFF
    image (:func:`bldseg.data.geo.check_mask_grid`); call it once the sizes are known to agree.

    Only TIFF pairs can carry a georeference, and only rasterio reads it: other files, or
    either file without a CRS and geotransform, or no ``bldseg[geo]`` extra, check nothing.
    """
    image_path, mask_path = Path(image_path), Path(mask_path)
    if image_path.suffix.lower() not in geo.GEO_SUFFIXES:
        return
    if mask_path.suffix.lower() not in geo.GEO_SUFFIXES or not geo.geo_available():
        return
    geo.check_mask_grid(image_path, mask_path)


def _source_key(record: SourceRecord) -> tuple:
    """What a record's decoded pixels depend on, its window aside."""
    return (record.image_path, record.mask_rle, record.mask_path, record.options)


def source_runs(records: Sequence[SourceRecord]) -> list[list[int]]:
    """Indices of ``records`` in runs of consecutive records cut from one source.

    The tiles of a scene are listed one after the other (:func:`read_folder_dataset`); each run
    can be decoded with one :func:`decode_records` call instead of one decode per tile.
    """
    runs: list[list[int]] = []
    last = None
    for i, r in enumerate(records):
        key = _source_key(r)
        if runs and key == last:
            runs[-1].append(i)
        else:
            runs.append([i])
        last = key
    return runs


def decode_records(records: Sequence[SourceRecord]) -> list[DecodedRecord]:
    """Decodes records cut from one source (the tiles of a scene) with one decode of it.

    A 2500x2500 scene cut into 100 tiles is decoded (and its footprints burnt) once, not 100
    times. The results are views into that one decoded scene, so memory holds it once.

    Args:
        records: Records with the same image, mask and options (:func:`source_runs`); their
            windows may differ.

    Raises:
        ValueError: Records from different sources; the mask's size differs from the image's,
            or a mask GeoTIFF is georeferenced to another place than its GeoTIFF image
            (:func:`check_mask_grid`), a window outside the image, or the RLE is malformed (the
            message names the image id and the CSV row), or any decoding error.
    """
    record = records[0]
    if any(_source_key(r) != _source_key(record) for r in records[1:]):
        raise ValueError(f"decode_records: records from different sources ({record.img_id}, ...)")
    try:
        image = read_image(record.image_path, record.options)
    except ValueError as e:
        if record.csv_row is None:
            raise  # its message starts with the file's path: all a folder's record names
        # a corrupt test PNG was named by its path alone, a missing one by its CSV row and id
        raise ValueError(f"{record.img_id} (CSV row {record.csv_row}): {e}") from e
    full_hw = image.shape[:2]
    mask, binary = None, True
    row = f", CSV row {record.csv_row}" if record.csv_row is not None else ""
    try:
        if record.mask_rle is not None:
            mask = rle_decode(record.mask_rle, full_hw)
        elif record.mask_path is not None:
            if record.mask_path.suffix.lower() in geo.VECTOR_SUFFIXES:
                geo.require_geo(f"footprints {record.mask_path}")
                mask = geo.rasterize_footprints(record.image_path, record.mask_path)
            else:
                read = read_mask_image(record.mask_path, record.options)
                mask, binary = read.mask, read.binary
            if mask.shape != full_hw:
                raise ValueError(
                    f"mask {record.mask_path} is {mask.shape[0]}x{mask.shape[1]} but the image "
                    f"is {full_hw[0]}x{full_hw[1]}"
                )
            if record.mask_path.suffix.lower() not in geo.VECTOR_SUFFIXES:
                check_mask_grid(record.image_path, record.mask_path)
    except ValueError as e:
        raise ValueError(f"{record.img_id} ({record.image_path}{row}): {e}") from e
    out = []
    for r in records:
        if r.window is None:
            out.append(DecodedRecord(image, mask, binary))
            continue
        y, x, h, w = r.window
        if y < 0 or x < 0 or y + h > full_hw[0] or x + w > full_hw[1]:
            raise ValueError(
                f"{r.img_id} ({r.image_path}{row}): window (y, x, h, w) = {r.window} is not "
                f"inside the decoded image of {full_hw[0]}x{full_hw[1]} (did the file change "
                "after it was listed?)"
            )
        tile_mask = None if mask is None else mask[y : y + h, x : x + w]
        out.append(DecodedRecord(image[y : y + h, x : x + w], tile_mask, binary))
    return out


def decode_record(record: SourceRecord) -> DecodedRecord:
    """Decodes one record with its options, cropped to its window.

    Raises:
        ValueError: The mask's size differs from the image's, or the RLE is malformed (the
            message names the image id and the CSV row), or any decoding error.
    """
    return decode_records([record])[0]


def load_record(record: SourceRecord) -> tuple[np.ndarray, np.ndarray | None]:
    """Decodes one record: its image (H, W, 3) uint8 and mask (H, W) uint8 0/1 or None."""
    d = decode_record(record)
    return d.image, d.mask

"""Readers for the layouts users bring: the competition CSVs and image/mask folders.

Both readers return a list of :class:`SourceRecord` (one per cached sample); nothing is decoded
here except to check sizes, so listing 7,140 files is quick. Decoding happens once, when the
cache is built (:mod:`bldseg.data.cache`).

Competition layout (``train.csv``: ``img_id,img_path,mask_rle``; ``test.csv``:
``img_id,img_path``): ``img_path`` is relative to the CSV's folder and may not escape it.

Folder layout: ``images/NAME.png`` + ``masks/NAME.png`` (matched by file stem; masks are single
channel, nonzero = building). Large scenes such as Inria's 5000x5000 are cut into a grid of
``tile_size`` tiles; the last row/column of tiles is shifted inwards so tiles cover the scene
without padding.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image

from bldseg.data.rle import rle_decode

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


@dataclass(frozen=True)
class SourceRecord:
    """One sample as found on disk, before decoding.

    Attributes:
        img_id: Unique id, written to submissions (``TRAIN_0001``, ``austin1_r0_c1024``).
        image_path: Absolute path of the RGB image file.
        mask_rle: Competition RLE of the mask (``-1`` for empty), or None.
        mask_path: Path of a mask image (folder layout), or None.
        window: ``(y, x, h, w)`` crop of the source image this sample covers, or None for the
            whole image.
        csv_row: 1-based data row in the source CSV (for error messages), or None.
    """

    img_id: str
    image_path: Path
    mask_rle: str | None = None
    mask_path: Path | None = None
    window: tuple[int, int, int, int] | None = None
    csv_row: int | None = None

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


def read_competition_csv(csv_path: str | os.PathLike, *, with_masks: bool | None = None):
    """Reads ``train.csv`` or ``test.csv`` of the competition layout.

    Args:
        csv_path: The CSV file; ``img_path`` values are relative to its folder.
        with_masks: Require the ``mask_rle`` column (True), ignore it (False) or use it when
            present (None).

    Returns:
        A list of :class:`SourceRecord`, in CSV order.

    Raises:
        FileNotFoundError: The CSV or an image it names does not exist.
        ValueError: Missing columns, empty or duplicate ids, a path escaping the CSV's folder,
            or an empty ``mask_rle`` cell. Messages name the file and the row.
    """
    csv_path = Path(csv_path).resolve()
    if not csv_path.is_file():
        raise FileNotFoundError(f"CSV file not found: {csv_path}")
    # dtype=str keeps ids like "0001" intact; keep_default_na=False so "-1" and "" stay strings.
    df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    has_rle = "mask_rle" in df.columns
    if with_masks is None:
        with_masks = has_rle
    _check_columns(df, ("img_id", "img_path", *(("mask_rle",) if with_masks else ())), csv_path)
    if len(df) == 0:
        raise ValueError(f"{csv_path}: the CSV has no data rows")

    root = csv_path.parent
    records: list[SourceRecord] = []
    seen: dict[str, int] = {}
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
        image_path = (root / rel).resolve()
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
        records.append(SourceRecord(img_id, image_path, mask_rle=rle, csv_row=i))
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
    try:
        with Image.open(path) as im:
            return im.height, im.width
    except (OSError, Image.UnidentifiedImageError) as e:
        raise ValueError(f"{path}: cannot read the image header: {e}") from e


def read_folder_dataset(
    images_dir: str | os.PathLike,
    masks_dir: str | os.PathLike | None = None,
    *,
    tile_size: int | None = None,
) -> list[SourceRecord]:
    """Reads an image folder (+ a mask folder with matching file stems).

    Args:
        images_dir: Folder of RGB images.
        masks_dir: Folder of single-channel masks named like the images (any of the image
            suffixes); None for unlabelled data.
        tile_size: Cut every image into a grid of tiles of this size (for large scenes such as
            Inria's 5000x5000); None keeps whole images.

    Returns:
        One :class:`SourceRecord` per image or tile, sorted by file name.

    Raises:
        FileNotFoundError: A folder is missing, or an image has no mask.
        ValueError: The folder holds no images.
    """
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {images_dir}")
    images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ValueError(f"{images_dir}: no images with suffix {IMAGE_SUFFIXES}")
    masks: dict[str, Path] = {}
    if masks_dir is not None:
        masks_dir = Path(masks_dir)
        if not masks_dir.is_dir():
            raise FileNotFoundError(f"mask folder not found: {masks_dir}")
        masks = {
            p.stem: p.resolve() for p in masks_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
        }
    records = []
    for img in images:
        mask_path = None
        if masks_dir is not None:
            mask_path = masks.get(img.stem)
            if mask_path is None:
                raise FileNotFoundError(f"{img}: no mask named {img.stem}.* in {masks_dir}")
        if tile_size is None:
            records.append(SourceRecord(img.stem, img.resolve(), mask_path=mask_path))
            continue
        h, w = image_size(img)
        for y, x, th, tw in tile_windows(h, w, tile_size):
            records.append(
                SourceRecord(
                    f"{img.stem}_y{y}_x{x}",
                    img.resolve(),
                    mask_path=mask_path,
                    window=(y, x, th, tw),
                )
            )
    return records


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decodes an 8-bit RGB image.

    Returns:
        uint8 array (H, W, 3) in RGB order.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: The file is not a decodable image (corrupt or truncated), is not 8-bit, or
            is not RGB (grayscale, RGBA with transparency).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    # IMREAD_UNCHANGED so grayscale, 16-bit and alpha images are seen as what they are instead of
    # being silently converted.
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ValueError(f"{path}: cannot decode the image (corrupt, truncated or not an image)")
    if img.dtype != np.uint8:
        raise ValueError(f"{path}: expected an 8-bit image, got {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 4:
        if img[..., 3].min() < 255:
            raise ValueError(f"{path}: RGBA image with transparent pixels; expected RGB")
        img = img[..., :3]
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"{path}: expected an RGB image (H, W, 3), got shape {img.shape}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_mask_image(path: str | os.PathLike) -> np.ndarray:
    """Decodes a mask image; nonzero pixels are buildings.

    Returns:
        uint8 array (H, W) of 0/1.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: Corrupt file, or a colour mask whose channels differ.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask not found: {path}")
    m = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if m is None:
        raise ValueError(f"{path}: cannot decode the mask (corrupt, truncated or not an image)")
    if m.ndim == 3:
        if not (m[..., :3] == m[..., :1]).all():
            raise ValueError(f"{path}: colour mask with differing channels; expected one channel")
        m = m[..., 0]
    return (m > 0).astype(np.uint8)


def load_record(record: SourceRecord) -> tuple[np.ndarray, np.ndarray | None]:
    """Decodes one record: its image (H, W, 3) uint8 and mask (H, W) uint8 0/1 or None.

    Raises:
        ValueError: The mask's size differs from the image's, or the RLE is malformed (the
            message names the image id and the CSV row).
    """
    image = read_image(record.image_path)
    full_hw = image.shape[:2]
    mask = None
    try:
        if record.mask_rle is not None:
            mask = rle_decode(record.mask_rle, full_hw)
        elif record.mask_path is not None:
            mask = read_mask_image(record.mask_path)
            if mask.shape != full_hw:
                raise ValueError(
                    f"mask {record.mask_path} is {mask.shape[0]}x{mask.shape[1]} but the image "
                    f"is {full_hw[0]}x{full_hw[1]}"
                )
    except ValueError as e:
        row = f", CSV row {record.csv_row}" if record.csv_row is not None else ""
        raise ValueError(f"{record.img_id} ({record.image_path}{row}): {e}") from e
    if record.window is not None:
        y, x, h, w = record.window
        image = image[y : y + h, x : x + w]
        mask = None if mask is None else mask[y : y + h, x : x + w]
    return image, mask

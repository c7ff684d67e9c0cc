"""Train/validation split and torch datasets over a :class:`~bldseg.data.cache.DatasetCache`.

Training samples random crops (224 by default) from the large cached images, as the reference
workflow did; validation uses fixed tiles covering each validation image, so it mirrors the
competition's 224x224 test tiles.

Both datasets hold the cache by path (it pickles as its folder), so ``num_workers > 0``
DataLoader workers map the same files instead of copying the arrays.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from bldseg.data.cache import DatasetCache
from bldseg.data.readers import tile_windows

Transform = Callable[..., dict]


def split_indices(
    n: int,
    val_fraction: float = 0.05,
    seed: int = 0,
    groups: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic split of ``n`` samples into train and validation indices, by group.

    Whole groups go to one side, so tiles cut from one scene (or one area, see
    :func:`split_groups`) never sit on both sides. Groups are shuffled and, in that order, each
    is taken for validation when it brings the validation side closer to ``round(n *
    val_fraction)`` samples (a group larger than that is passed over, not taken whole: one
    scene of 95 tiles among 100 would have made the 5% split 95% validation); when no group
    fits, the smallest is taken. With one group per sample this is the plain random split by
    image. A split far from the fraction asked for (groups too uneven) warns.

    Args:
        n: Number of samples.
        val_fraction: Share of samples for validation (the reference workflow used 5%). At
            least one group goes to each side.
        seed: Seed of the permutation.
        groups: Group label of every sample; None: every sample is its own group.

    Returns:
        ``(train_idx, val_idx)``, each sorted ascending.

    Raises:
        ValueError: ``val_fraction`` outside (0, 1), or fewer than 2 groups.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    codes = _group_codes(n, groups)
    n_groups = int(codes.max()) + 1 if n else 0
    if n_groups < 2:
        raise ValueError(
            f"need at least 2 split groups (source scenes) to split, got {n_groups} for {n} "
            "samples; cut more scenes, or give a group column / --split-group pattern"
        )
    target = min(n - 1, max(1, round(n * val_fraction)))
    sizes = np.bincount(codes, minlength=n_groups)
    perm = np.random.default_rng(seed).permutation(n_groups)
    val_groups, size = [], 0
    for g in perm:
        if len(val_groups) == n_groups - 1:
            break  # the last group stays for training, however close it would bring the target
        if abs(size + sizes[g] - target) < abs(size - target):
            val_groups.append(g)
            size += int(sizes[g])
    if not val_groups:  # every group is larger than the target: the smallest one
        val_groups = [perm[np.argmin(sizes[perm])]]
        size = int(sizes[val_groups[0]])
    if not 0.5 * target <= size <= 2 * target:
        warnings.warn(
            f"val_fraction={val_fraction}: whole split groups give {size} of {n} samples "
            f"({size / n:.1%}) for validation instead of about {target}; the groups (source "
            "scenes) are too uneven for this fraction: change val_fraction or --split-group",
            stacklevel=2,
        )
    is_val = np.isin(codes, val_groups)
    idx = np.arange(n)
    return idx[~is_val], idx[is_val]


def _group_codes(n: int, groups: Sequence[str] | None) -> np.ndarray:
    """(n,) int group code of every sample, numbered in order of first appearance (so a split
    does not depend on how the labels are spelled); one group per sample when None."""
    if groups is None:
        return np.arange(n)
    if len(groups) != n:
        raise ValueError(f"{len(groups)} group labels for {n} samples")
    _, first, codes = np.unique(
        np.asarray(groups, dtype=object).astype(str), return_index=True, return_inverse=True
    )
    order = np.argsort(np.argsort(first))
    return order[codes]


def split_record(ids: Sequence[str], assigned: np.ndarray) -> dict[str, Any]:
    """What a run records of its split (``folds.json``, a single run's ``last.pt``): the
    number of images and SHA-256 fingerprints of their ids and of the (id, part) pairs
    (order-free; small for any data).

    Args:
        ids: The id of every training image.
        assigned: (N,) the part each image is in: the fold that holds it out
            (:func:`fold_assignment`), or 1 for validation and 0 for training.
    """
    pairs = sorted(zip((str(i) for i in ids), (int(f) for f in assigned), strict=True))

    def digest(lines: Sequence[str]) -> str:
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()

    return {
        "images": len(pairs),
        "ids_sha256": digest([i for i, _ in pairs]),
        "folds_sha256": digest([f"{i}\t{f}" for i, f in pairs]),
    }


def fold_assignment(
    n: int, folds: int, seed: int = 0, groups: Sequence[str] | None = None
) -> np.ndarray:
    """The validation fold of every sample for K-fold training, by group.

    Whole groups go to one fold, so tiles cut from one scene are validated together and never
    trained on by the model that validates them. Groups are shuffled by ``seed`` and dealt,
    largest first (ties in shuffled order), each to the fold holding the fewest samples so far:
    every fold gets at least one group and the folds' sizes stay close. With one group per
    sample this is a plain shuffled K-fold split.

    Args:
        n: Number of samples.
        folds: K, at least 2 and at most the number of groups.
        seed: Seed of the group shuffle (the run config's ``split_seed``).
        groups: Group label of every sample; None: every sample is its own group.

    Returns:
        (n,) int array, the fold (0..K-1) whose validation set holds each sample.

    Raises:
        ValueError: ``folds`` below 2 or above the number of groups (the message names
            ``--folds``).
    """
    codes = _group_codes(n, groups)
    n_groups = int(codes.max()) + 1 if n else 0
    if folds < 2:
        raise ValueError(
            f"--folds {folds}: K-fold training needs at least 2 folds (0 gives the plain "
            "holdout split of val_fraction)"
        )
    if folds > n_groups:
        raise ValueError(
            f"--folds {folds}: the data has only {n_groups} split group(s) (source scenes), and "
            f"each fold needs at least one; use --folds {n_groups} or fewer (at least 2), or a "
            "--split-group pattern that groups more finely"
        )
    sizes = np.bincount(codes, minlength=n_groups)
    perm = np.random.default_rng(seed).permutation(n_groups)
    order = perm[np.argsort(-sizes[perm], kind="stable")]  # largest first, ties shuffled
    fold_of_group = np.empty(n_groups, dtype=np.int64)
    load = np.zeros(folds, dtype=np.int64)
    for g in order:
        f = int(np.argmin(load))  # the lightest fold; the lowest index among equals
        fold_of_group[g] = f
        load[f] += sizes[g]
    return fold_of_group[codes]


def fold_indices(
    n: int, folds: int, fold: int, seed: int = 0, groups: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(train_idx, val_idx)`` of fold ``fold`` of K (see :func:`fold_assignment`).

    The validation sets of the K folds partition the samples; each fold trains on the rest.

    Raises:
        ValueError: A bad ``folds`` (see :func:`fold_assignment`) or ``fold`` outside
            ``0..folds-1`` (the message names ``--fold``).
    """
    if not 0 <= fold < max(folds, 1):
        raise ValueError(f"--fold {fold}: the folds of --folds {folds} are 0..{folds - 1}")
    assigned = fold_assignment(n, folds, seed, groups)
    idx = np.arange(n)
    return idx[assigned != fold], idx[assigned == fold]


def split_groups(cache: DatasetCache, pattern: str | None = None) -> list[str]:
    """The split group of every sample of a cache.

    Args:
        cache: The cache; its groups are the CSV's group column or the source image path.
        pattern: A regular expression searched in each source file's name (without suffix);
            the concatenated capture groups (or the whole match) form the group, so
            neighbouring map tiles stay together: ``r"x(\\d+)\\d_"`` groups tiles ``x120_...``
            to ``x129_...``. A name it does not match is an error.

    Raises:
        ValueError: ``pattern`` does not compile or does not match a file name.
    """
    if pattern is None:
        return cache.groups
    # Kept on the cache object (never pickled): a search's start-up check splits the data for
    # every sample, range end and fold, one regex per source name each time (0.55 s a split at
    # 60,640 tiles: minutes in all).
    memo = cache.__dict__.setdefault("_split_groups_memo", {})
    if pattern not in memo:
        memo[pattern] = _pattern_groups(cache, pattern)
    return list(memo[pattern])


def _pattern_groups(cache: DatasetCache, pattern: str) -> list[str]:
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"split group pattern {pattern!r}: {e}") from e
    out = []
    for src in cache.sources:
        name = Path(src["path"]).stem
        m = rx.search(name)
        if m is None:
            raise ValueError(
                f"split group pattern {pattern!r} does not match {src['path']} "
                f"(searched in {name!r})"
            )
        out.append("".join(g or "" for g in m.groups()) if m.groups() else m.group(0))
    return out


@dataclass(frozen=True)
class Tile:
    """A fixed window of a cached image.

    Attributes:
        index: Image index in the cache.
        y: Top row of the window.
        x: Left column of the window.
        size: Window height and width.
    """

    index: int
    y: int
    x: int
    size: int

    def tile_id(self, ids: Sequence[str]) -> str:
        """Stable id ``<img_id>_y<y>_x<x>`` for logs and the ensemble library."""
        return f"{ids[self.index]}_y{self.y}_x{self.x}"


def validation_tiles(cache: DatasetCache, indices: Sequence[int], tile_size: int) -> list[Tile]:
    """Tiles of ``tile_size`` covering every image in ``indices`` (edge tiles shifted inwards).

    Raises:
        ValueError: ``tile_size`` is larger than the cached images.
    """
    h, w = cache.image_size
    if tile_size > min(h, w):
        raise ValueError(f"tile_size {tile_size} is larger than the cached images ({h}x{w})")
    windows = tile_windows(h, w, tile_size)
    return [Tile(int(i), y, x, tile_size) for i in indices for (y, x, _, _) in windows]


def _to_tensors(image, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, W, 3) array or (3, H, W) tensor + (H, W) mask -> image (3, H, W), mask (1, H, W)."""
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    if image.dtype == torch.uint8:
        # No Normalize in the pipeline: scale to [0, 1] so models never see 0..255.
        image = image.float().div_(255.0)
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(np.ascontiguousarray(mask))
    return image.float(), mask.float().reshape(1, *mask.shape[-2:])


class RandomCropDataset(Dataset):
    """Random windows from cached images, then an albumentations pipeline.

    Reading only a window from the memory map (instead of the whole 1024x1024 image) is what
    makes the cache fast: ``window`` should be large enough for the pipeline's own scale and
    crop steps (for RandomScale(0.2) then RandomCrop(224): ceil(224 / 0.8) = 280).

    Each item is ``{"image": (3, S, S) float, "mask": (1, S, S) float, "index": int}``.
    Randomness is keyed by ``(seed, epoch, item)``, so a run is reproducible with any number
    of workers; call :meth:`set_epoch` at the start of each epoch.

    Images are drawn as one shuffled stream across epochs, every image once per pass over the
    training set: with ``samples_per_epoch`` below the number of images, successive epochs go
    on through the pass (item i of every epoch was image i: the images past the first
    ``samples_per_epoch`` were never trained on).
    """

    def __init__(
        self,
        cache: DatasetCache,
        indices: Sequence[int],
        transform: Transform | None = None,
        *,
        window: int = 280,
        samples_per_epoch: int | None = None,
        seed: int = 0,
    ):
        """Creates the dataset.

        Args:
            cache: The cache (must have masks).
            indices: Cache indices of the training images.
            transform: An albumentations pipeline called as ``transform(image=, mask=)``; None
                gives the raw window scaled to [0, 1].
            window: Side of the random window read from the cache (clipped to the image).
            samples_per_epoch: Items per epoch; default one per training image.
            seed: Base seed.
        """
        if cache.masks is None:
            raise ValueError(f"{cache.root}: training needs masks, this cache has none")
        if len(indices) == 0:
            raise ValueError("no training images")
        self.cache = cache
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform
        h, w = cache.image_size
        self.window = (min(window, h), min(window, w))
        self.samples_per_epoch = samples_per_epoch or len(self.indices)
        self.seed = seed
        self.epoch = 0
        self._passes: dict[int, np.ndarray] = {}  # pass number -> its image order (a few kept)

    def _image(self, item: int) -> int:
        """Cache index of the image behind ``item`` of the current epoch."""
        n = len(self.indices)
        pass_no, pos = divmod(self.epoch * self.samples_per_epoch + item, n)
        order = self._passes.get(pass_no)
        if order is None:
            # the constant keeps this stream apart from the crops' (seed, epoch, item) keys
            order = np.random.default_rng((self.seed, 7_919, pass_no)).permutation(n)
            if len(self._passes) >= 4:
                self._passes.pop(min(self._passes))
            self._passes[pass_no] = order
        return int(self.indices[order[pos]])

    def set_epoch(self, epoch: int) -> None:
        """Selects the random stream of ``epoch`` (call before iterating each epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.samples_per_epoch

    def __getitem__(self, item: int) -> dict:
        rng = np.random.default_rng((self.seed, self.epoch, item))
        index = self._image(item)
        h, w = self.cache.image_size
        wh, ww = self.window
        y = int(rng.integers(0, h - wh + 1))
        x = int(rng.integers(0, w - ww + 1))
        # np.array copies only the window out of the memory map: (wh, ww, 3) and (wh, ww).
        image = np.array(self.cache.images[index, y : y + wh, x : x + ww])
        mask = np.array(self.cache.masks[index, y : y + wh, x : x + ww])
        if self.transform is not None:
            if hasattr(self.transform, "set_random_state"):
                # One stream shared by the pipeline's transforms, seeded per (seed, epoch, item).
                # Not set_random_seed: it gives every transform its own generator from the same
                # seed, so all drew the same numbers: both flips applied together or not at all
                # (never one), the crop's offset followed the flip, a rarer transform applied
                # only with every likelier one.
                seed = int(rng.integers(2**31))
                self.transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        image_t, mask_t = _to_tensors(image, mask)
        return {"image": image_t, "mask": mask_t, "index": index}


class TileDataset(Dataset):
    """Fixed tiles of cached images (validation and prediction), deterministic.

    Each item is ``{"image": (3, S, S) float, "mask": (1, S, S) float (if the cache has
    masks), "tile": int}`` where ``tile`` indexes ``tiles``.
    """

    def __init__(
        self,
        cache: DatasetCache,
        tiles: Sequence[Tile],
        transform: Transform | None = None,
    ):
        """Creates the dataset.

        Args:
            cache: The cache.
            tiles: Windows to read, e.g. from :func:`validation_tiles`.
            transform: A deterministic pipeline (Normalize); None scales to [0, 1].
        """
        self.cache = cache
        self.tiles = list(tiles)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, item: int) -> dict:
        t = self.tiles[item]
        sl = (t.index, slice(t.y, t.y + t.size), slice(t.x, t.x + t.size))
        image = np.array(self.cache.images[sl])
        has_mask = self.cache.masks is not None
        mask = np.array(self.cache.masks[sl]) if has_mask else np.zeros(image.shape[:2], np.uint8)
        if self.transform is not None:
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        image_t, mask_t = _to_tensors(image, mask)
        sample = {"image": image_t, "tile": item}
        if has_mask:
            sample["mask"] = mask_t
        return sample


def window_for(crop_size: int, scale_limit: float = 0.0) -> int:
    """Window side that a RandomScale(scale_limit) + RandomCrop(crop_size) pipeline needs."""
    return math.ceil(crop_size / max(1e-6, 1.0 - scale_limit))

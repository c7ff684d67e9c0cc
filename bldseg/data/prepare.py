"""From "where the data is" to opened caches: the one call entry scripts make.

``prepare_data(None)`` uses the built-in synthetic world (generated on first use); a folder
holding ``train.csv`` (competition layout) or a path to a ``train.csv`` uses the user's data.
Both go through the same readers and cache, so the demo exercises the real ingestion path.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from bldseg.data.cache import DatasetCache, ensure_cache
from bldseg.data.readers import read_competition_csv

#: Where the built-in synthetic world and caches live unless told otherwise (relative to the
#: working directory, ignored by git).
DEFAULT_DATA_ROOT = Path("data")

#: The built-in world: the generator's default sizes, with 30% of the training masks corrupted
#: the way real ground truth is wrong (the test split keeps clean masks for honest scoring).
DEFAULT_SYNTHETIC = {"noise_fraction": 0.3}


@dataclass
class PreparedData:
    """Caches of one dataset.

    Attributes:
        root: The dataset folder (holding ``train.csv``).
        train: Cache of the training images and masks.
        test: Cache of the test images (no masks), or None when there is no ``test.csv``.
        test_truth_csv: Held-out ground truth of the test images (synthetic world only).
        clean_train_csv: Clean training masks when the training masks carry injected noise
            (synthetic world only).
    """

    root: Path
    train: DatasetCache
    test: DatasetCache | None
    test_truth_csv: Path | None
    clean_train_csv: Path | None


def _cache_dir(cache_root: Path, dataset_root: Path) -> Path:
    # Keyed by the dataset's absolute path, so two datasets with the same folder name never
    # share a cache, and a read-only dataset folder is never written to.
    key = hashlib.blake2b(str(dataset_root).encode(), digest_size=4).hexdigest()
    return cache_root / "cache" / f"{dataset_root.name}-{key}"


def prepare_data(
    data: str | os.PathLike | None = None,
    *,
    data_root: str | os.PathLike = DEFAULT_DATA_ROOT,
    synthetic: dict | None = None,
    progress: bool = True,
) -> PreparedData:
    """Finds (or generates) a dataset and opens its caches, building them when needed.

    Args:
        data: A folder with ``train.csv`` (and optionally ``test.csv``), a ``train.csv`` path,
            or None for the built-in synthetic world.
        data_root: Folder for the synthetic world and the caches.
        synthetic: Keyword arguments for :func:`bldseg.data.synthetic.generate_world` when
            ``data`` is None (default: :data:`DEFAULT_SYNTHETIC`).
        progress: Show progress bars.

    Returns:
        The opened caches.

    Raises:
        FileNotFoundError: ``data`` has no ``train.csv``.
    """
    data_root = Path(data_root).resolve()
    if data is None:
        from bldseg.data.synthetic import generate_world

        world_dir = data_root / "synthetic"
        generate_world(
            world_dir, progress=progress, **(DEFAULT_SYNTHETIC if synthetic is None else synthetic)
        )
        data = world_dir
    path = Path(data).resolve()
    train_csv = path if path.suffix == ".csv" else path / "train.csv"
    if not train_csv.is_file():
        raise FileNotFoundError(
            f"no train.csv at {train_csv}; pass the folder holding the competition's train.csv "
            "(img_id,img_path,mask_rle) or the CSV itself"
        )
    root = train_csv.parent
    cache_dir = _cache_dir(data_root, root)
    train = ensure_cache(
        read_competition_csv(train_csv, with_masks=True), cache_dir / "train", progress=progress
    )
    test = None
    test_csv = root / "test.csv"
    if test_csv.is_file():
        test = ensure_cache(
            read_competition_csv(test_csv, with_masks=False), cache_dir / "test", progress=progress
        )
    truth = root / "test_truth.csv"
    clean = root / "train_clean.csv"
    return PreparedData(
        root=root,
        train=train,
        test=test,
        test_truth_csv=truth if truth.is_file() else None,
        clean_train_csv=clean if clean.is_file() else None,
    )

"""From "where the data is" to opened caches: the one call every entry script makes.

``--data`` may name any of (the kind is detected and printed):

- nothing: the built-in synthetic world (generated on first use);
- a competition folder holding ``train.csv`` (and optionally ``test.csv``), or the CSV itself;
- an image/mask folder: ``DATA/images/`` + ``DATA/masks/`` (or ``DATA/footprints/`` with
  vector labels), or any layout through ``--images`` / ``--masks`` / ``--footprints``;
- an existing bldseg cache: a cache folder (``manifest.json``) or a folder of caches
  (``train/``, optionally ``test/``).

Prediction (:func:`prepare_test_data`) reads only the test split: a competition folder needs
only ``test.csv`` there (``--data`` may also name the test CSV itself), and the training split
is neither read nor cached.

Every kind goes through the same readers and cache, so the demo exercises the real ingestion
path. Caches live under ``data_root/cache/`` keyed by the dataset's location (never inside a
possibly read-only dataset folder; each training CSV of a competition folder has its own), and
are rebuilt when a source file or a decoding option changes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Literal

import pandas as pd

from bldseg.data.cache import DatasetCache, ensure_cache
from bldseg.data.readers import (
    DEFAULT_MASK_PATTERNS,
    ReadOptions,
    image_size,
    read_competition_csv,
    read_folder_dataset,
)

#: Where the built-in synthetic world and caches live unless told otherwise (relative to the
#: working directory, ignored by git).
DEFAULT_DATA_ROOT = Path("data")

#: The built-in world: the generator's default sizes, with 30% of the training masks corrupted
#: the way real ground truth is wrong (the test split keeps clean masks for honest scoring).
DEFAULT_SYNTHETIC = {"noise_fraction": 0.3}

DataKind = Literal["synthetic", "competition", "folders", "cache"]


@dataclass
class DataOptions:
    """How to find and decode a user's dataset (the entry scripts' data flags).

    Attributes:
        images: Image folder; default ``DATA/images`` for a folder dataset.
        masks: Mask folder; default ``DATA/masks``.
        footprints: Vector labels instead of masks (a folder of ``NAME.geojson``... or one
            file); default ``DATA/footprints`` when there is no mask folder.
        mask_pattern: Mask file name for an image stem (``{stem}_mask.png`` or
            ``REGEX=>REPLACEMENT``); default: the usual names, exactly one must exist.
        tile_size: Cut images into tiles of this size (large scenes; mixed sizes).
        recursive: Search sub-folders of the image folder.
        group_column: Competition CSV column naming each row's split group.
        read: How images and masks are decoded.
    """

    images: str | None = None
    masks: str | None = None
    footprints: str | None = None
    mask_pattern: str | None = None
    tile_size: int | None = None
    recursive: bool = True
    group_column: str | None = None
    read: ReadOptions = field(default_factory=ReadOptions)

    @classmethod
    def from_dict(cls, d: dict) -> DataOptions:
        """Inverse of ``dataclasses.asdict`` (lists back to tuples)."""
        d = dict(d)
        read = {k: _tuples(v) for k, v in (d.pop("read", None) or {}).items()}
        return cls(**d, read=ReadOptions(**read))

    def key(self, masks: bool = True) -> str:
        """Short hash of the options that change which files are read and how (the cache
        folder): jobs on one dataset with other options never rebuild each other's cache.
        ``masks`` False: masks given as RLE (:meth:`ReadOptions.key`)."""
        d = asdict(self)
        d["read"] = self.read.key(masks)
        d = {
            k: str(Path(v).resolve()) if k in ("images", "masks", "footprints") and v else v
            for k, v in d.items()
        }
        return hashlib.blake2b(json.dumps(d, sort_keys=True).encode(), digest_size=4).hexdigest()


def _tuples(v):
    """JSON lists back to (nested) tuples."""
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


@dataclass
class PreparedData:
    """Caches of one dataset.

    Attributes:
        root: The dataset folder (holding ``train.csv``, ``images/``, or the caches).
        train: Cache of the training images and masks.
        test: Cache of the test images (no masks), or None when there is no test split.
        test_truth_csv: Held-out ground truth of the test images: ``test_truth.csv`` beside
            ``test.csv`` where there is one (the synthetic world writes it).
        clean_train_csv: Clean training masks when the training masks carry injected noise
            (synthetic world only).
        kind: What ``--data`` named.
        description: One line saying what was found (printed by the entry scripts).
        split_hint: Where the training files are named like tiles of fewer larger scenes
            but each is its own split group, the note that says so and names the
            ``--split-group`` that groups them (:func:`_tile_names_hint`); else empty. Worked
            out for the printed data line only (``verbose``, no ``split_group``).
        options: How the files were read (training records its image decoding for prediction).
            For a bldseg cache given as the data, the read options its manifest records, with
            the layout fields at their defaults; None where that is not known (a cache built
            before they were recorded).
    """

    root: Path
    train: DatasetCache
    test: DatasetCache | None
    test_truth_csv: Path | None
    clean_train_csv: Path | None
    kind: DataKind = "competition"
    description: str = ""
    options: DataOptions | None = None
    split_hint: str = ""


def _cache_dir(cache_root: Path, dataset_root: Path, extra: str = "") -> Path:
    # Keyed by the dataset's absolute path, so two datasets with the same folder name never
    # share a cache, and a read-only dataset folder is never written to.
    key = hashlib.blake2b(f"{dataset_root}{extra}".encode(), digest_size=4).hexdigest()
    return cache_root / "cache" / f"{dataset_root.name}-{key}"


def _is_cache(path: Path) -> bool:
    return (path / "manifest.json").is_file()


def detect_data(data: str | os.PathLike | None, options: DataOptions | None = None) -> DataKind:
    """What ``--data`` (and the folder flags) name; see the module docstring.

    Raises:
        FileNotFoundError: ``data`` does not exist or is none of the known kinds (the message
            lists what was looked for).
    """
    options = options or DataOptions()
    if options.images is not None:
        return "folders"
    if data is None:
        return "synthetic"
    path = Path(data)
    if path.is_file() and path.suffix.lower() == ".csv":
        return "competition"
    if not path.is_dir():
        raise FileNotFoundError(f"--data {path}: no such folder or CSV file")
    if (path / "train.csv").is_file():
        return "competition"
    if _is_cache(path) or _is_cache(path / "train"):
        return "cache"
    if (path / "images").is_dir():
        return "folders"
    raise FileNotFoundError(
        f"--data {path}: not a dataset bldseg knows. Looked for train.csv (competition "
        "layout), images/ + masks/ (or footprints/) (image/mask folders), manifest.json or "
        "train/manifest.json (a bldseg cache). For another layout pass --images DIR and "
        "--masks DIR"
    )


def prepare_data(
    data: str | os.PathLike | None = None,
    *,
    options: DataOptions | None = None,
    data_root: str | os.PathLike = DEFAULT_DATA_ROOT,
    synthetic: dict | None = None,
    progress: bool = True,
    verbose: bool = False,
    split_group: str | None = None,
    test_split: bool = True,
) -> PreparedData:
    """Finds (or generates) a dataset and opens its caches, building them when needed.

    Args:
        data: A competition folder or ``train.csv``, an image/mask folder, a bldseg cache, or
            None for the built-in synthetic world (see the module docstring).
        options: Folder layout and decoding options (:class:`DataOptions`).
        data_root: Folder for the synthetic world and the caches.
        synthetic: Keyword arguments for :func:`bldseg.data.synthetic.generate_world` when
            ``data`` is None (default: :data:`DEFAULT_SYNTHETIC`).
        progress: Show progress bars.
        verbose: Print what was found (the entry scripts do), with the training files'
            split note (:attr:`PreparedData.split_hint`) unless ``split_group`` is given.
        split_group: The run's ``--split-group`` pattern, where the caller has one.
        test_split: False: the test split of a competition folder (or the synthetic world)
            is neither read nor cached (:attr:`PreparedData.test` None), for callers that only
            train: a competition's is 60,640 tiles, ~9 GB and a minute to decode, and a bad
            test file then does not stop a training run.

    Returns:
        The opened caches.

    Raises:
        FileNotFoundError: ``data`` is none of the known kinds, or files are missing.
        ValueError: Bad files (each error names the file and what to do); an existing cache
            is left untouched.
    """
    options = options or DataOptions()
    data_root = Path(data_root).resolve()
    kind = detect_data(data, options)
    _refuse_unused_options(kind, options, data)
    if kind == "synthetic":
        world_dir = _synthetic_world(data_root, synthetic, progress)
        prepared = _prepare_competition(world_dir, options, data_root, progress, test_split)
        prepared.kind = "synthetic"
        prepared.description = (
            f"built-in synthetic world at {world_dir}: {_describe_cache(prepared.train)}"
        )
    elif kind == "competition":
        prepared = _prepare_competition(Path(data), options, data_root, progress, test_split)
    elif kind == "cache":
        prepared = _prepare_cache(Path(data))
    else:
        prepared = _prepare_folders(data, options, data_root, progress)
    if not test_split:  # a cache given as the data: its test/ is only opened, not built
        prepared.test = None
    if kind != "cache":  # a cache given as the data: the options its manifest records
        prepared.options = options
    if verbose:
        # only for the printed line (it reads every source's record): commands print it once
        grouped = ""
        if kind != "synthetic" and not split_group:
            prepared.split_hint = _tile_names_hint(prepared.train)
        elif split_group:  # the line counted source scenes; the split keeps these together
            from bldseg.data.dataset import split_groups

            n = len(set(split_groups(prepared.train, split_group)))
            grouped = f", {n} split group(s) by --split-group {split_group!r}"
        print(
            f"data ({prepared.kind}): {prepared.description}{grouped}{prepared.split_hint}",
            flush=True,
        )
    return prepared


#: Layout flags and the DataOptions fields they set (``--no-recursive``: ``recursive=False``).
_LAYOUT_FLAGS = {
    "--masks": "masks",
    "--footprints": "footprints",
    "--mask-pattern": "mask_pattern",
    "--tile-size": "tile_size",
    "--no-recursive": "recursive",
    "--group-column": "group_column",
}

#: Mask-decoding flags and the ReadOptions fields they set: only mask images read them, and a
#: competition CSV's masks are run-length codes.
_MASK_FLAGS = {
    "--mask-values": "mask_values",
    "--mask-nonzero": "mask_nonzero",
    "--mask-colors": "mask_colors",
    "--mask-threshold": "mask_threshold",
}

#: Image-decoding flags and the ReadOptions fields they set: every kind but a cache (whose
#: tiles were decoded when it was built) reads them.
_IMAGE_FLAGS = {"--alpha": "alpha", "--bands": "bands", "--stretch": "stretch"}

_READ_FLAGS = {**_MASK_FLAGS, **_IMAGE_FLAGS}


def _flag_value(options: DataOptions, flag: str):
    if flag in _READ_FLAGS:
        return getattr(options.read, _READ_FLAGS[flag])
    return getattr(options, _LAYOUT_FLAGS[flag])


def _unread_flags(kind: DataKind, options: DataOptions) -> list[str]:
    """The data flags set in ``options`` that ``kind`` of data does not read: the folder and
    mask flags on a competition layout, ``--group-column`` on folders, all of them on a cache."""
    layout = set(_LAYOUT_FLAGS)
    reads = {
        "folders": (layout - {"--group-column"}) | set(_READ_FLAGS),
        "cache": set(),
    }.get(kind, {"--group-column"} | set(_IMAGE_FLAGS))
    defaults = DataOptions()
    return [
        flag
        for flag in (*_LAYOUT_FLAGS, *_READ_FLAGS)
        if flag not in reads and _flag_value(options, flag) != _flag_value(defaults, flag)
    ]


def _without_flags(options: DataOptions, flags: list[str]) -> DataOptions:
    """``options`` with ``flags`` back at their defaults."""
    defaults = DataOptions()
    layout = [_LAYOUT_FLAGS[f] for f in flags if f in _LAYOUT_FLAGS]
    read = [_READ_FLAGS[f] for f in flags if f in _READ_FLAGS]
    return replace(
        options,
        **{name: getattr(defaults, name) for name in layout},
        read=replace(options.read, **{name: getattr(defaults.read, name) for name in read}),
    )


def absolute_folders(options: DataOptions) -> DataOptions:
    """``options`` with its folders (``images``, ``masks``, ``footprints``) absolute, against
    the current folder: what a record keeps, for a command run from another folder."""
    return replace(
        options,
        **{
            name: os.path.abspath(value)
            for name in ("images", "masks", "footprints")
            if (value := getattr(options, name)) is not None
        },
    )


def without_unread_options(
    data: str | os.PathLike | None, options: DataOptions, what: str
) -> DataOptions:
    """``options`` without the data flags ``data``'s kind does not read, with a warning.

    For settings recorded before such flags were refused (a search or pipeline started with
    ``--tile-size`` or ``--mask-values`` on a ``train.csv`` ignored them): continuing it must not
    fail on a flag nobody can leave out. ``what`` names the record in the warning.
    """
    try:
        kind = detect_data(data, options)
    except FileNotFoundError:
        return options  # prepare_data says what is missing
    unread = _unread_flags(kind, options)
    if not unread:
        return options
    # The mask flags were part of a competition cache's fingerprint although its masks are
    # RLE: the record's fingerprint cannot match without them, and the caller's check says so.
    fingerprint = (
        "; the data fingerprint it recorded included the mask flags, so it no longer matches"
        if kind in ("synthetic", "competition") and any(f in _MASK_FLAGS for f in unread)
        else ""
    )
    warnings.warn(
        f"{what} was started with {', '.join(unread)}, which --data's kind ({kind}) does not "
        f"read: ignored then, left out now{fingerprint}",
        stacklevel=2,
    )
    return _without_flags(options, unread)


def _refuse_unused_options(kind: DataKind, options: DataOptions, data) -> None:
    """Raises ValueError naming the data flags that ``--data``'s kind does not read (they were
    ignored without a word: ``--tile-size 512`` on a ``train.csv`` trained whole images, and
    each ``--mask-threshold`` value built another copy of its cache)."""
    if kind == "folders":
        reads = "a competition train.csv"
    else:
        reads = "image/mask folder layouts (--data DIR with images/, or --images DIR)"
    given = _unread_flags(kind, options)
    if given:
        rle = (
            ", whose masks are its CSV's mask_rle run-length codes (no mask image is decoded)"
            if any(f in _MASK_FLAGS for f in given)
            else ""
        )
        what = {
            "synthetic": f"the built-in synthetic world (a competition layout){rle}",
            "competition": f"the competition layout {data}{rle}",
            "cache": f"the bldseg cache {data} (its tiles are already cut and decoded)",
            "folders": f"the image/mask folders {options.images or data}",
        }[kind]
        raise ValueError(
            f"{', '.join(given)}: only {reads} read {'them' if len(given) > 1 else 'it'}; "
            f"--data names {what}. Leave {'them' if len(given) > 1 else 'it'} out"
            + (
                ", or save the images with their masks as images/NAME.png + masks/NAME.png "
                "and pass that folder"
                if kind in ("synthetic", "competition") and options.tile_size
                else ""
            )
        )


def _synthetic_world(data_root: Path, synthetic: dict | None, progress: bool) -> Path:
    """The built-in world's folder, generated when it is missing or out of date."""
    from bldseg.data.synthetic import generate_world

    world_dir = data_root / "synthetic"
    # The built-in world's folder is ours: one made by an older generator or with other
    # parameters is regenerated (generate_world still refuses a folder that is not a world).
    # Decided by generate_world under its lock, not here: a command that waited for another
    # one generating the world would have judged the folder before that world existed.
    generate_world(
        world_dir,
        progress=progress,
        overwrite=True,
        **(DEFAULT_SYNTHETIC if synthetic is None else synthetic),
    )
    return world_dir


def _describe_cache(cache: DatasetCache) -> str:
    h, w = cache.image_size
    scenes = len(set(cache.groups))
    masks = "with masks" if cache.masks is not None else "no masks"
    return f"{len(cache)} samples of {h}x{w} from {scenes} source scene(s), {masks}"


#: A file stem that reads as a tile of a larger scene: the scene's name, then a number.
_TILE_STEM = re.compile(r"^(.+)[_-]\d+$")


def _tile_names_hint(cache: DatasetCache) -> str:
    """A note where every source file is its own split group but the names say they are tiles
    of fewer scenes (Inria's ``austin1_10``, ``chicago1_3``): the validation split then holds
    tiles of the scenes it trains on, without a word. Empty where they do not.

    Two or more name prefixes, each shared by two or more files, and every stem of that form:
    a competition's ``TRAIN_0001``..., one prefix for distinct scenes, gives no note.
    """
    sources = cache.sources
    paths = {s["path"] for s in sources}
    if any(s.get("group") not in (None, s["path"]) for s in sources) or len(paths) < 4:
        return ""  # a CSV's group column decides, or too few files to tell
    prefixes: dict[str, int] = {}
    for path in paths:
        m = _TILE_STEM.match(Path(path).stem)
        if m is None:
            return ""
        prefixes[m.group(1)] = prefixes.get(m.group(1), 0) + 1
    if len(prefixes) < 2 or min(prefixes.values()) < 2:
        return ""
    examples = ", ".join(f"{p}_*" for p in sorted(prefixes)[:2])
    return (
        f"; their file names look like tiles of {len(prefixes)} larger scenes ({examples}): "
        "if they are, train with --split-group '^(.+)[_-]\\d+$' so that each scene's tiles "
        "stay on one side of the validation split"
    )


#: What a competition training CSV of images of mixed sizes is told to do. --tile-size is no
#: help there: the CSV's run-length masks are cached whole, one sample per row.
COMPETITION_SIZES_HINT = (
    "the competition layout caches each image whole (--tile-size cuts only image/mask folder "
    "layouts); resize or crop the images to one size, or save them with their masks as "
    "images/NAME.png + masks/NAME.png and pass that folder with --tile-size"
)


def _prepare_competition(
    data: Path, options: DataOptions, data_root: Path, progress: bool, test_split: bool = True
) -> PreparedData:
    path = data.resolve()
    train_csv = path if path.suffix.lower() == ".csv" else path / "train.csv"
    root = train_csv.parent
    cache_dir = _cache_dir(data_root, root, options.key(masks=False))  # RLE masks
    # Each training CSV of a folder has its own cache (train.csv and train_clean.csv sharing
    # one rebuilt it at every switch, under the trials of a search reading it); train.csv keeps
    # the plain name that existing caches, searches and pipelines point at. The test split is
    # the folder's test.csv whichever CSV trains, so its cache stays shared.
    name = "train" if train_csv.name == "train.csv" else f"train-{train_csv.stem}"
    train = ensure_cache(
        read_competition_csv(
            train_csv, with_masks=True, group_column=options.group_column, options=options.read
        ),
        cache_dir / name,
        progress=progress,
        mixed_sizes_hint=f"{train_csv}: {COMPETITION_SIZES_HINT}",
    )
    test = None
    test_csv = root / "test.csv"
    if test_csv.is_file() and test_split:
        test = ensure_cache(
            read_competition_csv(test_csv, with_masks=False, options=options.read),
            cache_dir / "test",
            progress=progress,
            # The test cache prediction reads (see _prepare_competition_test): same advice.
            mixed_sizes_hint=f"{test_csv} is predicted one image per tile; {PREDICT_IMAGES_HINT}",
        )
    truth = root / "test_truth.csv"
    clean = root / "train_clean.csv"
    if test is not None:
        test_part = f"; test: {len(test)} images"
    else:
        test_part = "; test.csv not read (training only)" if test_csv.is_file() else "; no test.csv"
    return PreparedData(
        root=root,
        train=train,
        test=test,
        test_truth_csv=truth if truth.is_file() else None,
        clean_train_csv=clean if clean.is_file() else None,
        kind="competition",
        description=f"competition layout {train_csv}: {_describe_cache(train)}{test_part}",
    )


def _prepare_cache(path: Path) -> PreparedData:
    path = path.resolve()
    train_dir = path if _is_cache(path) else path / "train"
    train = DatasetCache(train_dir)
    if train.masks is None:
        raise ValueError(
            f"{train_dir}: this cache has no masks (a test cache); --data needs a training "
            "cache, or the folder holding train/ and test/"
        )
    test_dir = path / "test"
    test = DatasetCache(test_dir) if train_dir != path and _is_cache(test_dir) else None
    test_part = f"; test: {len(test)} images" if test is not None else ""
    return PreparedData(
        root=path,
        train=train,
        test=test,
        test_truth_csv=None,
        clean_train_csv=None,
        kind="cache",
        description=f"bldseg cache {train_dir}: {_describe_cache(train)}{test_part}",
        options=_recorded_options(train),
    )


def _recorded_options(cache: DatasetCache) -> DataOptions | None:
    """The read options ``cache``'s manifest records (layout fields at their defaults: its
    tiles are already cut), so a model trained on it records how its images were decoded like
    one trained on the source folder; None for a cache built before they were recorded.

    Raises:
        ValueError: The record holds values these read options refuse (names the manifest).
    """
    recorded = cache.read_options
    if recorded is None:
        return None
    # Fields a newer bldseg may add are left out: the image fields prediction reads are known.
    known = {f.name for f in fields(ReadOptions)}
    try:
        return DataOptions.from_dict({"read": {k: v for k, v in recorded.items() if k in known}})
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"{cache.root / 'manifest.json'}: its record of the read options ({recorded}) "
            f"cannot be used ({e}); build the cache again with bldseg prepare from its source data"
        ) from e


@dataclass
class PreparedTest:
    """The test split of a dataset, for prediction.

    Attributes:
        root: The dataset folder (holding the test CSV, or the caches).
        test: Cache of the test images (no masks).
        test_truth_csv: Held-out ground truth of the test images: ``test_truth.csv`` beside
            ``test.csv`` where there is one (the synthetic world writes it).
        kind: What ``--data`` named.
        description: One line saying what was found (printed by the predict command).
    """

    root: Path
    test: DatasetCache
    test_truth_csv: Path | None
    kind: DataKind
    description: str


#: What a test split of images of mixed sizes (or not square) is told to do instead.
PREDICT_IMAGES_HINT = "predict such images with --images DIR --out masks/ (one mask per image)"


def prepare_test_data(
    data: str | os.PathLike | None = None,
    *,
    options: DataOptions | None = None,
    data_root: str | os.PathLike = DEFAULT_DATA_ROOT,
    synthetic: dict | None = None,
    progress: bool = True,
    verbose: bool = False,
) -> PreparedTest:
    """Finds a dataset's test split and opens its cache, building it when needed.

    Only the test split is read: prediction needs neither the training CSV (its masks may be
    absent, or bad) nor its cache, which for a real dataset takes far longer to build. The
    test cache is the one :func:`prepare_data` builds, so training and prediction share it.

    Args:
        data: None (the built-in synthetic world); a competition folder holding ``test.csv``
            (``train.csv`` is not needed); a test CSV itself (``img_id,img_path``; a
            training CSV, ``train.csv`` or any with a ``mask_rle`` column, stands for the
            ``test.csv`` beside it); or a bldseg cache folder holding ``test/``.
        options: Decoding options (:class:`DataOptions`).
        data_root: Folder for the synthetic world and the caches.
        synthetic: As for :func:`prepare_data`.
        progress: Show progress bars.
        verbose: Print what was found.

    Raises:
        FileNotFoundError: No test split there (the message says what was looked for; a
            training CSV with no ``test.csv`` beside it is one), or a file the test CSV names
            is missing.
        ValueError: Bad files, or test images that are not square or not all of one size
            (prediction takes each as one tile; the message names the test CSV and advises
            folder prediction).
    """
    options = options or DataOptions()
    data_root = Path(data_root).resolve()
    if data is None:
        prepared = _prepare_competition_test(
            _synthetic_world(data_root, synthetic, progress) / "test.csv",
            options,
            data_root,
            progress,
        )
        prepared.kind = "synthetic"
    else:
        path = Path(data).resolve()
        if path.is_file() and path.suffix.lower() == ".csv":
            test_csv = _test_csv_for(path)
            prepared = _prepare_competition_test(test_csv, options, data_root, progress)
            if test_csv != path:
                prepared.description += (
                    f" (--data {path.name} is a training CSV: prediction reads the test "
                    f"split beside it, {test_csv.name})"
                )
        elif (path / "test.csv").is_file():
            prepared = _prepare_competition_test(path / "test.csv", options, data_root, progress)
        elif _is_cache(path / "test"):
            test = DatasetCache(path / "test")
            prepared = PreparedTest(
                path, test, None, "cache", f"bldseg cache {test.root}: {_describe_cache(test)}"
            )
        elif not path.exists():
            raise FileNotFoundError(f"--data {path}: no such folder or CSV file")
        else:
            raise FileNotFoundError(
                f"--data {path}: no test split to predict. Looked for test.csv (competition "
                "layout; train.csv is not needed) and test/manifest.json (a bldseg cache); "
                "to predict a folder of images pass --images DIR --out masks/"
            )
    if verbose:
        print(f"data ({prepared.kind}): {prepared.description}", flush=True)
    return prepared


def _test_csv_for(csv: Path) -> Path:
    """The test CSV that ``--data CSV`` stands for in prediction: the CSV itself, or for a
    training CSV (``train.csv``, or any with a ``mask_rle`` column) the ``test.csv`` beside it.

    Raises:
        FileNotFoundError: A training CSV with no ``test.csv`` beside it (its images would be
            predicted and labelled a test split: the run's own training images).
    """
    if csv.name != "train.csv":
        try:
            columns = pd.read_csv(csv, nrows=0).columns
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
            return csv  # read_competition_csv names the file and what a readable CSV is
        if "mask_rle" not in columns:
            return csv
    test_csv = csv.with_name("test.csv")
    if csv == test_csv or test_csv.is_file():
        return test_csv
    raise FileNotFoundError(
        f"--data {csv}: a training CSV (train.csv, or one with a mask_rle column) with no "
        "test.csv beside it to predict; pass the test CSV (img_id,img_path) or the folder "
        "holding test.csv (to predict the images this CSV lists, save a copy without its "
        "mask_rle column)"
    )


def _prepare_competition_test(
    test_csv: Path, options: DataOptions, data_root: Path, progress: bool
) -> PreparedTest:
    root = test_csv.parent
    if not test_csv.is_file():
        raise FileNotFoundError(f"--data {root}: no {test_csv.name} to predict")
    records = read_competition_csv(test_csv, with_masks=False, options=options.read)
    # Each test image is predicted as one square tile: refused from the first image's header,
    # before the whole split is decoded into a cache.
    h, w = image_size(records[0].image_path)
    if h != w:
        raise ValueError(
            f"{test_csv}: prediction takes each image as one square tile, but "
            f"{records[0].img_id} ({records[0].image_path}) is {h}x{w}; {PREDICT_IMAGES_HINT}"
        )
    # The cache prepare_data builds for test.csv; another CSV of the folder gets its own.
    name = "test" if test_csv.name == "test.csv" else f"test-{test_csv.stem}"
    test = ensure_cache(
        records,
        _cache_dir(data_root, root, options.key(masks=False)) / name,  # RLE or no masks
        progress=progress,
        mixed_sizes_hint=f"{test_csv} is predicted one image per tile; {PREDICT_IMAGES_HINT}",
    )
    truth = root / "test_truth.csv"
    return PreparedTest(
        root=root,
        test=test,
        test_truth_csv=truth if test_csv.name == "test.csv" and truth.is_file() else None,
        kind="competition",
        description=f"competition test split {test_csv}: {_describe_cache(test)}",
    )


def folder_layout(
    data: str | os.PathLike | None, options: DataOptions
) -> tuple[Path, Path | None, Path | None]:
    """The image folder and the mask folder or footprints of a folder dataset.

    Raises:
        FileNotFoundError: No image folder, or no labels (masks/ or footprints/) at all.
    """
    base = Path(data).resolve() if data is not None else None
    images = Path(options.images).resolve() if options.images else None
    if images is None:
        if base is None:
            raise FileNotFoundError("pass --data DIR (with images/ + masks/) or --images DIR")
        images = base / "images"
    masks = Path(options.masks).resolve() if options.masks else None
    footprints = Path(options.footprints).resolve() if options.footprints else None
    if masks is None and footprints is None and base is not None:
        if (base / "masks").is_dir():
            masks = base / "masks"
        elif (base / "footprints").is_dir():
            footprints = base / "footprints"
    return images, masks, footprints


def _prepare_folders(
    data: str | os.PathLike | None, options: DataOptions, data_root: Path, progress: bool
) -> PreparedData:
    images, masks, footprints = folder_layout(data, options)
    if masks is None and footprints is None:
        raise FileNotFoundError(
            f"{images}: no labels for training; expected a masks/ (or footprints/) folder "
            "beside it, or pass --masks DIR / --footprints PATH"
        )
    if masks is None:
        # footprints are rasterised to 0/1: the mask flags would be ignored without a word
        given = [f for f in _MASK_FLAGS if _flag_value(options, f) != _flag_value(DataOptions(), f)]
        if given:
            raise ValueError(
                f"{', '.join(given)}: the labels are vector footprints ({footprints}), "
                "rasterised to 0/1 building masks; no mask image is decoded: leave "
                f"{'them' if len(given) > 1 else 'it'} out"
            )
    records = read_folder_dataset(
        images,
        masks,
        tile_size=options.tile_size,
        mask_pattern=options.mask_pattern,
        footprints=footprints,
        recursive=options.recursive,
        options=options.read,
    )
    root = Path(data).resolve() if data is not None else images.parent
    train = ensure_cache(
        records, _cache_dir(data_root, root, options.key()) / "train", progress=progress
    )
    labels = (
        f"{masks} (patterns: {options.mask_pattern or ', '.join(DEFAULT_MASK_PATTERNS[:4])}...)"
    )
    if footprints is not None:
        labels = f"footprints {footprints}"
    tiles = f", tiles of {options.tile_size}" if options.tile_size else ""
    return PreparedData(
        root=root,
        train=train,
        test=None,
        test_truth_csv=None,
        clean_train_csv=None,
        kind="folders",
        description=f"image/mask folders {images} + {labels}{tiles}: {_describe_cache(train)}",
    )


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e


def _colour_list(text: str) -> tuple[tuple[int, int, int], ...]:
    colours = tuple(_int_list(c) for c in text.split(";") if c.strip())
    if not colours or any(len(c) != 3 or not all(0 <= v <= 255 for v in c) for c in colours):
        raise argparse.ArgumentTypeError(f"expected R,G,B[;R,G,B...] in 0..255, got {text!r}")
    return colours


def add_data_arguments(
    parser: argparse.ArgumentParser, *, training: bool = True, data_help: str | None = None
) -> None:
    """Adds the data flags every entry script shares (``--data`` and the folder options);
    ``data_help`` replaces ``--data``'s help where its default is another (a model's record)."""
    g = parser.add_argument_group("data")
    a = g.add_argument
    if data_help is None and training:
        data_help = (
            "competition folder (train.csv), image/mask folder (images/ + masks/), or a "
            "bldseg cache; default: the built-in synthetic world"
        )
    elif data_help is None:  # prediction reads a test split, by default the model(s)' data
        data_help = (
            "the dataset whose test split to predict: a competition folder (test.csv), a "
            "test CSV, or a bldseg cache (test/); default: the data the model(s) were trained "
            "on, recorded in best.pt (the built-in synthetic world for models trained on it)"
        )
    a("--data", default=None, help=data_help)
    a(
        "--data-root",
        default=str(DEFAULT_DATA_ROOT),
        help="where decoded caches (and the built-in synthetic world) are kept; default: data/ "
        "in the current folder",
    )
    a(
        "--images",
        default=None,
        help="image folder, for layouts other than DATA/images"
        if training
        else "predict every image under this folder (mask PNGs to --out) instead of a test split",
    )
    if training:
        a("--masks", default=None, help="mask folder, for layouts other than DATA/masks")
        a(
            "--footprints",
            default=None,
            help="building polygons instead of masks: a folder of NAME.geojson/.gpkg/.shp or "
            "one vector file (georeferenced images; needs bldseg[geo])",
        )
        a(
            "--mask-pattern",
            default=None,
            help="mask file name for an image stem, e.g. '{stem}_mask.png', or a regex "
            "substitution '(\\d+)_img=>\\1.png' (default: {stem}.png, {stem}.tif, "
            "{stem}_mask.png, {stem}.mask.tif, ...; exactly one must exist)",
        )
        a(
            "--mask-values",
            type=_int_list,
            default=None,
            help=(
                "mask values / palette indices that are buildings, e.g. 1,2 (default: binary "
                "masks as they are; label masks are refused, naming this flag and --mask-nonzero)"
            ),
        )
        a(
            "--mask-nonzero",
            action="store_true",
            help="every nonzero mask value is a building: instance-id masks (each building "
            "numbered 1..N), which are refused without it",
        )
        a(
            "--mask-colors",
            type=_colour_list,
            default=None,
            help="colour-coded class masks: RGB colours that are buildings, e.g. '0,0,255' "
            "(ISPRS); several separated by ';'",
        )
        a(
            "--mask-threshold",
            type=float,
            default=0.5,
            help="non-binary masks (antialiased, JPEG) are binarised at this fraction of their "
            "range (default 0.5)",
        )
        a("--group-column", default=None, help="competition CSV column with split groups")
    a("--tile-size", type=int, default=None, help="cut large or mixed-size images into tiles")
    a("--no-recursive", action="store_true", help="do not search sub-folders of --images")
    a(
        "--alpha",
        choices=["refuse", "fill"],
        default="refuse",
        help="images with transparent pixels: refuse (default) or fill them with black"
        if training
        else "images with transparent pixels: refuse or fill them with black (default: as the "
        "model's training images were read, recorded in best.pt; else refuse)",
    )
    a(
        "--bands",
        type=_int_list,
        default=None,
        help="1-based raster bands read as RGB (3) or grey (1), e.g. 5,3,2 (default 1,2,3"
        + ("" if training else "; in prediction: as recorded in best.pt")
        + ")",
    )
    a(
        "--stretch",
        type=float,
        nargs=2,
        default=None,
        metavar=("LOW", "HIGH"),
        help="percentiles mapped to 0/255 for 16-bit or float rasters (default 2 98"
        + ("" if training else "; in prediction: as recorded in best.pt")
        + ")",
    )


def data_options(args: argparse.Namespace) -> DataOptions:
    """:class:`DataOptions` from the flags of :func:`add_data_arguments`.

    Raises:
        SystemExit: A flag value is invalid (the message names the flag).
    """
    try:
        read = ReadOptions(
            mask_threshold=getattr(args, "mask_threshold", 0.5),
            mask_values=getattr(args, "mask_values", None),
            mask_nonzero=getattr(args, "mask_nonzero", False),
            mask_colors=getattr(args, "mask_colors", None),
            alpha=args.alpha,
            bands=args.bands,
            stretch=tuple(args.stretch) if args.stretch else ReadOptions().stretch,
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}") from e
    return DataOptions(
        images=args.images,
        masks=getattr(args, "masks", None),
        footprints=getattr(args, "footprints", None),
        mask_pattern=getattr(args, "mask_pattern", None),
        tile_size=args.tile_size,
        recursive=not args.no_recursive,
        group_column=getattr(args, "group_column", None),
        read=read,
    )


#: The :class:`DataOptions` fields, with those of its ``read`` (:class:`ReadOptions`) beside
#: them: how a command line's data flags, or a checkpoint's record of them, are compared.
DATA_OPTION_NAMES = (
    "images",
    "masks",
    "footprints",
    "mask_pattern",
    "tile_size",
    "recursive",
    "group_column",
    "mask_threshold",
    "mask_values",
    "mask_nonzero",
    "mask_colors",
    "alpha",
    "bands",
    "stretch",
)

#: The mask-decoding options (the flags prediction's --masks is read with).
MASK_READ_NAMES = tuple(_MASK_FLAGS.values())

#: Options given together: one given replaces its group's recorded values, as a --mask-values
#: given beside a recorded --mask-nonzero would be refused as both, and a --footprints beside
#: a recorded --masks would go unread.
_OPTION_GROUPS = (("masks", "footprints"), ("mask_values", "mask_nonzero", "mask_colors"))

#: Each data option (:data:`DATA_OPTION_NAMES`) and the flag that sets it.
OPTION_FLAGS = {
    "images": "--images",
    "recursive": "--no-recursive",
    **{name: flag for flag, name in _LAYOUT_FLAGS.items() if name != "recursive"},
    **{name: flag for flag, name in _READ_FLAGS.items()},
}

_PATH_NAMES = ("images", "masks", "footprints")


def flat_options(options: DataOptions) -> dict:
    """``options`` as one flat dict over :data:`DATA_OPTION_NAMES` (the read fields beside
    the layout ones)."""
    layout = {f.name: getattr(options, f.name) for f in fields(DataOptions) if f.name != "read"}
    return {**layout, **{f.name: getattr(options.read, f.name) for f in fields(ReadOptions)}}


def options_from_flat(flat: dict) -> DataOptions:
    """The inverse of :func:`flat_options`.

    Raises:
        ValueError: Options that do not fit together (``DataOptions`` names them).
    """
    read = {f.name: flat[f.name] for f in fields(ReadOptions)}
    layout = {f.name: flat[f.name] for f in fields(DataOptions) if f.name != "read"}
    return DataOptions(**layout, read=ReadOptions(**read))


def option_flag(name: str, value) -> str:
    """One data option (a :data:`DATA_OPTION_NAMES` field) as the flag that sets it:
    ``--mask-values 0,1``; ``no --tile-size`` for an option left unset."""
    flag = OPTION_FLAGS[name]
    if name == "recursive":
        return "no --no-recursive" if value else flag
    if value is None or value is False:
        return f"no {flag}"
    if value is True:
        return flag
    if name == "mask_colors":
        return f"{flag} '{';'.join(','.join(map(str, c)) for c in value)}'"
    if name == "stretch":
        return f"{flag} {value[0]:g} {value[1]:g}"
    if isinstance(value, tuple):
        return f"{flag} {','.join(map(str, value))}"
    return f"{flag} {value}"


def describe_options(values: dict) -> str:
    """Data options (name -> value) as the flags that set them; those at their defaults are
    left out (``no --mask-values, --mask-nonzero or --mask-colors`` when all are)."""
    defaults = flat_options(DataOptions())
    said = [option_flag(n, v) for n, v in values.items() if v != defaults[n]]
    if said:
        return " ".join(said)
    if len(values) == 1:  # --mask-threshold 0.5, --alpha refuse, no --tile-size
        return option_flag(*next(iter(values.items())))
    flags = [OPTION_FLAGS[n] for n in values]
    return "no " + (flags[0] if len(flags) == 1 else f"{', '.join(flags[:-1])} or {flags[-1]}")


def given_data_options(args: argparse.Namespace, names=DATA_OPTION_NAMES) -> dict:
    """The data options typed on the command line, name -> value (folder paths absolute).

    A flag is typed when its value is not the parser's "not given" default: None (parsers
    that read a record set ``alpha`` and ``mask_threshold`` to None), or False for a switch.
    """
    given = {}
    for name in names:
        value = getattr(args, "no_recursive" if name == "recursive" else name, None)
        if value is None or value is False:
            continue
        if name == "recursive":
            value = False
        elif name in _PATH_NAMES:
            value = os.path.abspath(value)
        elif name == "stretch":
            value = tuple(float(v) for v in value)
        elif name in ("mask_values", "bands"):
            value = tuple(value)
        given[name] = value
    return given


def option_groups(names=DATA_OPTION_NAMES) -> list[tuple[str, ...]]:
    """``names`` in the groups an option given replaces whole (:data:`_OPTION_GROUPS`: the
    mask value flags together, the label folders together), each other name alone."""
    groups = [g for g in _OPTION_GROUPS if set(g) <= set(names)]
    return groups + [(n,) for n in names if not any(n in g for g in groups)]


def flag_names(names) -> str:
    """Options (:data:`DATA_OPTION_NAMES` fields) as their flags, for "pass ...":
    ``--mask-values, --mask-nonzero or --mask-colors``."""
    flags = [OPTION_FLAGS[n] for n in names]
    return flags[0] if len(flags) == 1 else f"{', '.join(flags[:-1])} or {flags[-1]}"


def unsettled_groups(records: list[dict], given: dict, names=DATA_OPTION_NAMES) -> list[tuple]:
    """The option groups (:func:`option_groups`) in which ``records`` (flat options,
    :func:`flat_options`, one per model) differ and no option was given
    (:func:`given_data_options`): what the flags typed leave undecided between models trained
    on data read differently. A flag of a group settles the whole group, as it replaces it."""
    return [
        group
        for group in option_groups(names)
        if not any(n in given for n in group)
        and len({tuple(r[n] for n in group) for r in records}) > 1
    ]


def recorded_folders(options: DataOptions) -> dict:
    """The folders a model's training data was given by, as --images/--masks/--footprints
    (name -> path); empty when the record names no --images (data named by --data, whose
    folders are found inside it)."""
    if options.images is None:
        return {}
    return {n: v for n in _PATH_NAMES if (v := getattr(options, n)) is not None}


def recorded_flags_left_out(
    recorded: DataOptions, now: DataOptions | None = None, kind: DataKind | None = None
) -> str | None:
    """The data flags a model's record holds at other than their defaults that the options
    read with ``now`` do not repeat, as typed: ``--tile-size 32 --mask-values 0``; None when
    there are none. Said when other data than the model's own is read, where the record is not
    applied: the flags may well be needed there too.

    Folders are left out (they say where the data was, not how it is read), and with ``kind``
    the flags that kind of data does not read (a cache's, already decoded; a competition CSV's
    run-length masks)."""
    if kind is not None:
        recorded = _without_flags(recorded, _unread_flags(kind, recorded))
    was, typed = flat_options(recorded), flat_options(now or DataOptions())
    defaults = flat_options(DataOptions())
    left_out = {
        n: v for n, v in was.items() if n not in _PATH_NAMES and v != defaults[n] and v != typed[n]
    }
    return describe_options(left_out) if left_out else None


def choose_data_options(
    recorded: DataOptions, given: dict, names=DATA_OPTION_NAMES
) -> tuple[DataOptions, list[tuple[str, str]]]:
    """The options to read a model's training data (or masks) with: its record, with what
    was typed now (:func:`given_data_options`) in place of the recorded values.

    An option given replaces its whole group's record (``--mask-values`` also replaces a
    recorded ``--mask-nonzero``). Only ``names`` are taken from ``given``.

    Returns:
        ``(the options, one (given flags, recorded flags) pair per group given otherwise than
        recorded)``, for the caller's warnings.

    Raises:
        ValueError: The options chosen do not fit together (names them).
    """
    chosen = flat_options(recorded)
    defaults = flat_options(DataOptions())
    differ = []
    for group in option_groups(names):
        typed = [n for n in group if n in given]
        if not typed:
            continue
        now = {n: given.get(n, defaults[n]) for n in group}
        was = {n: chosen[n] for n in group}
        chosen.update(now)
        if now != was:
            differ.append((describe_options({n: now[n] for n in typed}), describe_options(was)))
    return options_from_flat(chosen), differ


def recorded_options_read_by(data: str | os.PathLike | None, options: DataOptions) -> DataOptions:
    """A model's recorded data options without those ``data``'s kind does not read: a cache
    given as the data records the read options its manifest records, which a cache (already
    decoded) refuses as flags. Quiet: nobody typed them."""
    try:
        kind = detect_data(data, options)
    except FileNotFoundError:
        return options  # prepare_data says what is missing
    return _without_flags(options, _unread_flags(kind, options))

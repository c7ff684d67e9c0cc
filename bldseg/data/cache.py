"""The one-time decoded cache: "load once, in 5 seconds", without holding it all in RAM.

Every image is decoded once into memory-mapped ``.npy`` files::

    cache_dir/
        images.npy      uint8 (N, H, W, 3)   RGB
        masks.npy       uint8 (N, H, W)      0/1 (absent for unlabelled data, e.g. test.csv)
        sources.json    one entry per sample: img_id, source path, window, size, mtime, hash
        manifest.json   format version, shapes, fingerprint of the sources, the read options
                        the images were decoded with (written last)

Opening is O(1) in the cache size: ``np.load(mmap_mode="r")`` maps the files and reads only the
``.npy`` headers; ``sources.json`` is parsed only when ids are asked for.

A build writes into a hidden temporary folder and renames it into place at the end, with
``manifest.json`` written last, so an interrupted build never leaves a cache that looks valid.
The fingerprint (paths, sizes, mtimes, RLE strings, windows, and the sidecar files GDAL reads
with a georeferenced input) detects stale caches, which :func:`ensure_cache` rebuilds. The
disk space a build needs is reserved before anything is decoded, so a full disk is an error
that names the sizes, not a process killed by the kernel. Concurrent builders (several Ray
workers) are serialised with a file lock.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from functools import cached_property
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from bldseg.data import geo
from bldseg.data.readers import (
    DecodedRecord,
    SourceRecord,
    _imread,
    _top_colours,
    check_mask_grid,
    decode_records,
    source_runs,
)
from bldseg.io import file_lock

CACHE_FORMAT_VERSION = 2

#: The manifest field recording how the samples were decoded (:attr:`DatasetCache.read_options`):
#: a cache given as ``--data`` trains a model that records them for prediction. Not part of the
#: fingerprint, so caches built before it was written stay current.
READ_OPTIONS_KEY = "read_options"

#: What the error about images of different sizes advises by default (training data).
TILE_SIZE_HINT = "pass --tile-size (tile_size=) to cut scenes of varying size into equal tiles"


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


#: Files of a Shapefile besides ``.shp`` that its features are read with: the index, the
#: attributes, the CRS and the attributes' encoding.
SHAPEFILE_PARTS = ("shx", "dbf", "prj", "cpg")


def sidecar_names(path: Path) -> tuple[str, ...]:
    """Lower-cased names of the files GDAL (rasterio, pyogrio) may read together with ``path``.

    A raster's georeference, nodata and mask can live beside it: the PAM ``NAME.ext.aux.xml``,
    world files (``NAME.wld``, ``NAME.pgw``/``.tfw``/``.jgw``: the suffix's first and last
    letter and ``w``, or ``NAME.extw``), a MapInfo ``NAME.tab``, an external mask
    ``NAME.ext.msk``, an Erdas ``.aux``; a Shapefile's features need its ``.shx``, ``.dbf``,
    ``.prj`` and ``.cpg``; a GeoPackage's latest edits sit in its ``-wal`` journal until they
    are checkpointed. GDAL finds each name in any case. A raster's ``NAME.prj`` is not listed:
    GDAL takes a raster's CRS from the ``.aux.xml``, not from it (checked with GDAL 3.x).
    """
    name, stem, ext = path.name, path.stem, path.suffix.lower().lstrip(".")
    if path.suffix.lower() in geo.VECTOR_SUFFIXES:
        if ext == "shp":
            names = [f"{stem}.{part}" for part in SHAPEFILE_PARTS]
        elif ext == "gpkg":
            names = [f"{name}-wal"]
        else:
            names = []  # GeoJSON: one self-contained file
    else:
        names = [
            f"{name}.aux.xml",
            f"{name}.msk",
            f"{name}.aux",
            f"{stem}.aux",
            f"{stem}.wld",
            f"{stem}.tab",
            f"{stem}.{ext}w",
        ]
        if len(ext) >= 2:
            names.append(f"{stem}.{ext[0]}{ext[-1]}w")
    return tuple(dict.fromkeys(n.lower() for n in names))


def _read_with_gdal(r: SourceRecord) -> list[Path]:
    """The files of ``r`` whose sidecars change what is decoded: both files of a record with
    vector footprints (the polygons are burnt through the image's georeference), and TIFFs
    (read with rasterio: nodata and masks from sidecars). A PNG or JPEG decoded by OpenCV is
    left out, so a viewer's ``.aux.xml`` of statistics beside a training tile does not rebuild
    the cache."""
    if r.mask_path is not None and r.mask_path.suffix.lower() in geo.VECTOR_SUFFIXES:
        return [r.image_path, r.mask_path]
    return [
        p
        for p in (r.image_path, r.mask_path)
        if p is not None and p.suffix.lower() in geo.GEO_SUFFIXES
    ]


class _Sidecars:
    """The sidecar files (:func:`sidecar_names`) that exist beside paths, with their stats.

    Each folder is listed once (not one ``stat`` per candidate name and image: a folder of
    30,000 scenes would cost 250,000 calls on every start), and names are matched without case,
    as GDAL finds them.
    """

    def __init__(self) -> None:
        self._listings: dict[Path, dict[str, list[str]]] = {}
        self._found: dict[Path, list] = {}

    def __call__(self, path: Path) -> list:
        """``[[path, size, mtime_ns], ...]`` of the sidecars of ``path`` that exist."""
        if path not in self._found:
            folder = path.parent
            listing = self._listings.get(folder)
            if listing is None:
                listing = {}
                for n in os.listdir(folder):
                    listing.setdefault(n.lower(), []).append(n)
                self._listings[folder] = listing
            found = sorted(n for want in sidecar_names(path) for n in listing.get(want, ()))
            self._found[path] = [[str(folder / n), *_stat_key(folder / n)] for n in found]
        return self._found[path]


def fingerprint_records(records: Sequence[SourceRecord]) -> str:
    """Hash of what a cache is built from: ids, paths, windows, groups, file stats, mask RLEs,
    the decoding options, and the sidecars GDAL reads with georeferenced inputs.

    Cheap (stat calls and one listing per folder of geo inputs), so it can be checked on every
    start. Any edited, replaced or re-labelled source changes it, and so does an edited, added
    or removed georeference sidecar (``.aux.xml``, world file, Shapefile part: see
    :func:`sidecar_names`), which moves burnt footprints without touching the image.
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(f"v{CACHE_FORMAT_VERSION}\n".encode())
    stats: dict[Path, list[int]] = {}
    sidecars = _Sidecars()
    for r in records:
        for p in (r.image_path, r.mask_path):
            if p is not None and p not in stats:
                stats[p] = _stat_key(p)
        entry = [
            r.img_id,
            str(r.image_path),
            stats[r.image_path],
            r.mask_rle,
            None if r.mask_path is None else [str(r.mask_path), *stats[r.mask_path]],
            r.window,
            r.group,
            r.options.key(masks=r.mask_path is not None),
        ]
        # Only where sidecars exist: a cache of inputs without any keeps its fingerprint.
        found = [s for p in _read_with_gdal(r) for s in sidecars(p)]
        if found:
            entry.append(found)
        h.update(json.dumps(entry).encode())
        h.update(b"\n")
    return h.hexdigest()


def _sample_digest(image: np.ndarray, mask: np.ndarray | None) -> str:
    """Digest of one decoded sample as the cache stores it: (H, W, 3) uint8 image and (H, W)
    uint8 mask (None: no masks)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(np.ascontiguousarray(image).data)
    if mask is not None:
        h.update(b"m")
        h.update(np.ascontiguousarray(mask).data)
    return h.hexdigest()


def _content_digest(ids: Sequence[str], groups: Sequence[str], samples: Sequence[str]) -> str:
    """What a model trained on the cache saw: ids, split groups and the decoded pixels of every
    sample (:func:`_sample_digest`), in order. Unlike the fingerprint, it holds no paths and no
    file times: the same data read from another folder, regenerated, or copied without their
    times have the same content digest."""
    # Which samples share a group, not the groups' names: a group defaults to the image's path
    first: dict[str, int] = {}
    partition = [first.setdefault(g, len(first)) for g in groups]
    h = hashlib.blake2b(digest_size=16)
    h.update(f"v{CACHE_FORMAT_VERSION}\n".encode())
    h.update(json.dumps([list(ids), partition, list(samples)]).encode())
    return h.hexdigest()


def _file_hash(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "blake2b").hexdigest()[:32]


class DatasetCache:
    """A decoded dataset, memory-mapped from a cache folder.

    Pickles as its path and fingerprint only, so a DataLoader worker or a Ray task reopens the
    maps instead of receiving a copy of the arrays; unpickling refuses a folder that another
    command has rebuilt from other data meanwhile (see :meth:`__setstate__`).

    Attributes:
        root: The cache folder.
        manifest: The parsed ``manifest.json``.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        manifest_path = self.root / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"{self.root} is not a complete bldseg cache (no manifest.json); build it with "
                "bldseg.data.ensure_cache"
            )
        self.manifest = json.loads(manifest_path.read_text())
        version = self.manifest.get("format_version")
        if version != CACHE_FORMAT_VERSION:
            raise ValueError(
                f"{self.root}: cache format {version}, this bldseg reads {CACHE_FORMAT_VERSION}; "
                "delete the folder or call ensure_cache to rebuild it"
            )
        self._open()

    def _open(self) -> None:
        self.images = np.load(self.root / "images.npy", mmap_mode="r")  # (N, H, W, 3) uint8
        masks_path = self.root / "masks.npy"
        self.masks = np.load(masks_path, mmap_mode="r") if masks_path.exists() else None
        expected = (self.manifest["n"], self.manifest["height"], self.manifest["width"], 3)
        if self.images.shape != expected:
            raise ValueError(
                f"{self.root}: images.npy has shape {self.images.shape}, manifest says "
                f"{expected}; the cache is damaged, rebuild it"
            )

    def __getstate__(self) -> dict:
        return {"root": str(self.root), "fingerprint": self.fingerprint}

    def __setstate__(self, state: dict) -> None:
        """Reopens the folder, which must still hold the build that was pickled.

        A worker started by spawn or forkserver (or a Ray task) opens the folder anew, while the
        process that pickled this keeps the maps of the build it opened. Had another command
        rebuilt the folder from other data in between (an edited mask, a replaced image), the
        workers would feed one model data the parent does not score it on, without a word.

        Raises:
            ValueError: The folder holds a cache of other sources than when it was pickled.
        """
        self.__init__(state["root"])
        expected = state.get("fingerprint")  # absent from a pickle of an older bldseg
        if expected is None:
            return
        # Read again once the maps are open: a rebuild swapped in between the manifest and the
        # maps would otherwise pair the old manifest with the new arrays.
        now = json.loads((self.root / "manifest.json").read_text()).get("fingerprint")
        if self.fingerprint != expected or now != expected:
            raise ValueError(
                f"{self.root} was rebuilt from other data since this run opened it (its source "
                "files changed and another command prepared them again); this run's workers "
                "would read other samples than it did. Run it again, and give runs that use "
                "data that is being edited their own --data-root"
            )

    def __len__(self) -> int:
        return self.manifest["n"]

    def __repr__(self) -> str:
        m = self.manifest
        return (
            f"DatasetCache({str(self.root)!r}, n={m['n']}, size={m['height']}x{m['width']}, "
            f"masks={m['has_masks']})"
        )

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of every cached image."""
        return self.manifest["height"], self.manifest["width"]

    @property
    def fingerprint(self) -> str:
        """Fingerprint of the sources the cache was built from."""
        return self.manifest["fingerprint"]

    @property
    def read_options(self) -> dict | None:
        """The :class:`~bldseg.data.readers.ReadOptions` the samples were decoded with, as
        ``dataclasses.asdict`` gives them (JSON lists for tuples); None for a cache built before
        they were recorded, or from records decoded with different options."""
        return self.manifest.get(READ_OPTIONS_KEY)

    @cached_property
    def content(self) -> str:
        """Digest of what training reads: ids, split groups and decoded pixels
        (:func:`_content_digest`), independent of where the files lie and of their times. Kept
        in the manifest; a cache built before it was kept is hashed here, once per process."""
        if self.manifest.get("content"):
            return self.manifest["content"]
        samples = [
            _sample_digest(self.images[i], None if self.masks is None else self.masks[i])
            for i in range(len(self))
        ]
        return _content_digest(self.ids, self.groups, samples)

    @cached_property
    def sources(self) -> list[dict]:
        """Per-sample provenance: img_id, path, window, size, mtime_ns, content hash."""
        return json.loads((self.root / "sources.json").read_text())

    @cached_property
    def groups(self) -> list[str]:
        """Split group of every sample: the CSV's group column, else the source image path
        (tiles cut from one scene share it)."""
        return [s.get("group") or s["path"] for s in self.sources]

    @cached_property
    def ids(self) -> list[str]:
        """Sample ids in cache order."""
        return [s["img_id"] for s in self.sources]


def _read_options_record(records: Sequence[SourceRecord]) -> dict | None:
    """The records' shared read options as the manifest keeps them; None when they differ."""
    options = records[0].options
    if any(r.options != options for r in records):
        return None
    return asdict(options)


def _record_read_options(cache_dir: Path, records: Sequence[SourceRecord]) -> None:
    """Adds the read options to the manifest of a cache built before they were recorded.

    Its fingerprint includes every read option (:meth:`ReadOptions.key`), so a current cache was
    decoded with the records' options. Such a cache was also built before mask GeoTIFFs were
    checked against their images' grids: they are checked now (headers only), as a build does,
    and a mask labelling another place is refused. Replaced atomically: readers see the old or
    new file.
    """
    path = cache_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    if READ_OPTIONS_KEY in manifest:
        return
    _check_mask_grids(records)
    manifest[READ_OPTIONS_KEY] = _read_options_record(records)
    tmp = cache_dir / f".manifest.json.{uuid.uuid4().hex[:8]}.tmp"
    try:
        tmp.write_text(json.dumps(manifest, indent=2))
        os.replace(tmp, path)
    except OSError:
        # The cache is complete and usable without the record (a model trained from it records
        # no image reading, as before); a read-only data root must not stop the run.
        tmp.unlink(missing_ok=True)


def _check_mask_grids(records: Sequence[SourceRecord]) -> None:
    """:func:`~bldseg.data.readers.check_mask_grid` of every image with a mask file (once per
    pair), naming the sample as a build's decoding does."""
    seen = set()
    for r in records:
        if r.mask_path is None or (r.image_path, r.mask_path) in seen:
            continue
        seen.add((r.image_path, r.mask_path))
        if Path(r.mask_path).suffix.lower() in geo.VECTOR_SUFFIXES:
            continue
        try:
            check_mask_grid(r.image_path, r.mask_path)
        except ValueError as e:
            raise ValueError(f"{r.img_id} ({r.image_path}): {e}") from e


def _is_current(cache_dir: Path, fingerprint: str) -> bool:
    try:
        manifest = json.loads((cache_dir / "manifest.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return (
        manifest.get("format_version") == CACHE_FORMAT_VERSION
        and manifest.get("fingerprint") == fingerprint
    )


def build_cache(
    records: Sequence[SourceRecord],
    cache_dir: str | os.PathLike,
    *,
    num_threads: int | None = None,
    progress: bool = True,
    mixed_sizes_hint: str = TILE_SIZE_HINT,
) -> DatasetCache:
    """Decodes every record once into a new cache folder, replacing any old one atomically.

    Args:
        records: What to decode (see :mod:`bldseg.data.readers`). All must have the same image
            size, and either all or none must carry a mask.
        cache_dir: Destination folder.
        num_threads: Decoding threads (OpenCV releases the GIL); default: the CPU count.
        progress: Show a progress bar.
        mixed_sizes_hint: What the error about images of different sizes advises.

    Returns:
        The opened cache.

    Raises:
        ValueError: No records, mixed labelled/unlabelled records, images of different sizes
            (naming the first offender), or any decoding error from the readers.
    """
    if not records:
        raise ValueError("no records to cache")
    with_masks = records[0].has_mask
    for r in records:
        if r.has_mask != with_masks:
            raise ValueError(
                f"{r.img_id}: mixes labelled and unlabelled samples in one cache "
                f"({records[0].img_id} has_mask={with_masks})"
            )
    cache_dir = Path(cache_dir)
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    fingerprint = fingerprint_records(records)
    t0 = time.perf_counter()

    # Tiles of one scene are decoded together: one decode per scene, not per tile.
    runs = source_runs(records)
    # The first record fixes the size every other one must have.
    first_run = decode_records([records[i] for i in runs[0]])
    h, w = first_run[0].image.shape[:2]
    n = len(records)

    tmp = cache_dir.parent / f".{cache_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        images = np.lib.format.open_memmap(
            tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(n, h, w, 3)
        )
        masks = (
            np.lib.format.open_memmap(tmp / "masks.npy", mode="w+", dtype=np.uint8, shape=(n, h, w))
            if with_masks
            else None
        )
        reserve_space([tmp / "images.npy", *([tmp / "masks.npy"] if with_masks else [])], cache_dir)
        hashes: dict[Path, str] = {}
        not_binary: set[Path] = set()  # mask files binarised at the threshold
        positive: list[int] = []  # a sample with a building pixel, if any (set-wide check)

        def store(i: int, decoded: DecodedRecord) -> dict:
            r = records[i]
            image, mask = decoded.image, decoded.mask
            if image.shape[:2] != (h, w):
                raise ValueError(
                    f"{r.img_id} ({r.image_path}): image is {image.shape[0]}x{image.shape[1]}, "
                    f"expected {h}x{w} like {records[0].img_id}; every sample of one cache must "
                    f"have the same size: {mixed_sizes_hint}"
                )
            images[i] = image
            if masks is not None:
                masks[i] = mask
                if not decoded.mask_binary and r.mask_path is not None:
                    not_binary.add(r.mask_path)
                if not positive and mask.any():
                    positive.append(i)
            # Tiles of one scene share a file: hash it once. The dict race between threads is
            # benign (same value written twice).
            if r.image_path not in hashes:
                hashes[r.image_path] = _file_hash(r.image_path)
            return {
                "img_id": r.img_id,
                "path": str(r.image_path),
                "window": r.window,
                "mask_path": None if r.mask_path is None else str(r.mask_path),
                "size": r.image_path.stat().st_size,
                "mtime_ns": r.image_path.stat().st_mtime_ns,
                "blake2b": hashes[r.image_path],
                "group": r.group if r.group is not None else str(r.image_path),
                # what training reads of it (hashing releases the GIL: the threads share it)
                "content": _sample_digest(image, mask if masks is not None else None),
            }

        def decode(run: list[int]) -> list[dict]:
            # One worker holds one decoded scene at a time; its tiles are views into it.
            decoded = decode_records([records[i] for i in run])
            return [store(i, d) for i, d in zip(run, decoded, strict=True)]

        with tqdm(
            total=n, desc=f"caching {cache_dir.name}", unit="img", disable=not progress
        ) as bar:
            sources = [store(i, d) for i, d in zip(runs[0], first_run, strict=True)]
            del first_run
            bar.update(len(sources))
            workers = num_threads or os.cpu_count() or 1
            with ThreadPoolExecutor(workers) as pool:
                for done in pool.map(decode, runs[1:]):
                    sources.extend(done)
                    bar.update(len(done))
        images.flush()
        if masks is not None:
            masks.flush()
            _check_masks(records, not_binary, bool(positive))
        (tmp / "sources.json").write_text(json.dumps(sources))
        manifest = {
            "format_version": CACHE_FORMAT_VERSION,
            "n": n,
            "height": h,
            "width": w,
            "has_masks": with_masks,
            "fingerprint": fingerprint,
            "content": _content_digest(
                [e["img_id"] for e in sources],
                [e["group"] for e in sources],
                [e["content"] for e in sources],
            ),
            "masks_not_binary": sorted(str(p) for p in not_binary),
            READ_OPTIONS_KEY: _read_options_record(records),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "build_seconds": round(time.perf_counter() - t0, 3),
        }
        # Written last: its presence is what makes the folder a valid cache.
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        _swap_into_place(tmp, cache_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return DatasetCache(cache_dir)


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


#: What ``fallocate(2)`` fails with where the filesystem cannot reserve space (NFSv3, some
#: FUSE filesystems) or the system has no such call; the free space is compared instead.
_NO_FALLOCATE = {errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS}


def _fallocate(fd: int, length: int) -> None:
    """Linux ``fallocate(2)`` of ``length`` bytes from 0: blocks reserved by the filesystem,
    or an OSError (``EOPNOTSUPP`` where it cannot; ``ENOSYS`` off Linux). Not
    ``os.posix_fallocate``, which glibc emulates there by writing every block."""
    import ctypes

    if not sys.platform.startswith("linux"):  # (CDLL(None) is not even allowed on Windows)
        raise OSError(errno.ENOSYS, "fallocate is Linux only")
    libc = ctypes.CDLL(None, use_errno=True)
    call = getattr(libc, "fallocate64", None) or getattr(libc, "fallocate", None)
    if call is None:  # a C library without it
        raise OSError(errno.ENOSYS, "this C library has no fallocate")
    call.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if call(fd, 0, 0, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def reserve_space(files: Sequence[Path], cache_dir: Path) -> None:
    """Allocates the disk blocks of freshly created (sparse) cache files before they are filled.

    The files are filled through memory maps, and a write into a map that finds the disk full
    is no Python error: the kernel ends the process with SIGBUS ("Bus error", no message, the
    half-built folder left behind). Reserved first, a full disk is an OSError here, before
    anything is decoded, which the commands report as "the disk is full" (and
    :func:`build_cache` removes the half-built folder). Without Linux's ``fallocate(2)``
    (macOS), or where the filesystem cannot reserve (NFSv3, where glibc's ``posix_fallocate``
    would instead write a byte into every block of a 30 GB cache), the free space is
    compared instead.

    Args:
        files: The cache's files, created at their full size.
        cache_dir: The cache they are built for (named in the error).

    Raises:
        OSError: ``errno.ENOSPC`` (or ``EDQUOT``, a quota) naming the cache, the space it
            needs and the space that was free.
    """
    need = sum(p.stat().st_size for p in files)
    free = shutil.disk_usage(files[0].parent).free

    def full(code: int) -> OSError:
        room = (
            "more than your disk quota leaves"
            if code == errno.EDQUOT
            else f"{_size(free)} is free there"
        )
        return OSError(
            code, f"the cache needs {_size(need)} for its images and masks, {room}", str(cache_dir)
        )

    reserved = True
    for path in files:
        fd = os.open(path, os.O_RDWR)
        try:
            _fallocate(fd, path.stat().st_size)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise full(e.errno) from e
            if e.errno not in _NO_FALLOCATE:
                raise
            reserved = False
            break
        finally:
            os.close(fd)
    if not reserved and need > free:
        raise full(errno.ENOSPC)


def _check_masks(records: Sequence[SourceRecord], not_binary: set[Path], any_positive: bool):
    """Set-wide mask checks: an all-empty mask set is an error, binarised files a warning."""
    if not any_positive:
        first = records[0]
        where = first.mask_path.parent if first.mask_path is not None else first.image_path.parent
        colours = first.options.mask_colors
        if colours is not None and first.mask_path is not None:
            # --mask-values cannot name a colour: say which colours the masks do draw (as the
            # flag takes them: several separated by ';', quoted for the shell)
            named = ";".join(",".join(str(v) for v in c) for c in colours)
            raise ValueError(
                f"no pixel of the {len(records)} masks has the colour(s) --mask-colors '{named}' "
                f"(first: {first.mask_path}, in {where}; its most frequent colours, RGB: "
                f"{_mask_top_colours(first.mask_path)}): wrong mask folder, or name the "
                "building colour with --mask-colors R,G,B"
            )
        raise ValueError(
            f"every one of the {len(records)} masks is empty (first: "
            f"{first.mask_path or first.img_id}, in {where}): wrong mask folder, or buildings "
            "stored as values these options do not read (name them with --mask-values)"
        )
    if not_binary:
        files = {r.mask_path for r in records if r.mask_path is not None}
        example = sorted(not_binary)[0]
        how = (
            f"binarised at {records[0].options.mask_threshold:g} of their range "
            "(--mask-threshold to change)"
        )
        if records[0].options.mask_colors is not None:
            # --mask-threshold does not apply: colours are matched, not thresholded
            how = (
                "each pixel read as its nearest class colour (save the masks as PNG at their "
                "own size to read them exactly)"
            )
        warnings.warn(
            f"{len(not_binary)} of {len(files)} mask files were not binary (antialiased edges "
            f"or JPEG artefacts), e.g. {example}; {how}",
            stacklevel=3,
        )


def _mask_top_colours(path: Path) -> list[list[int]] | str:
    """The most frequent RGB colours of a mask file, for a message (grey as (v, v, v))."""
    m = _imread(path)
    if m is None or m.dtype != np.uint8:
        return "unreadable as 8-bit"
    if m.ndim == 2:
        m = np.repeat(m[..., None], 3, axis=2)
    return _top_colours(np.ascontiguousarray(m[..., :3]))


def _swap_into_place(tmp: Path, cache_dir: Path) -> None:
    """Renames ``tmp`` to ``cache_dir``, moving an old cache aside first."""
    old = None
    if cache_dir.exists():
        old = cache_dir.parent / f".{cache_dir.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(cache_dir, old)
    os.replace(tmp, cache_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def ensure_cache(
    records: Sequence[SourceRecord],
    cache_dir: str | os.PathLike,
    *,
    progress: bool = True,
    mixed_sizes_hint: str = TILE_SIZE_HINT,
) -> DatasetCache:
    """Opens ``cache_dir`` if it was built from exactly these sources, else (re)builds it.

    A current cache built before the read options were recorded gains them in its manifest
    (:attr:`DatasetCache.read_options`) instead of being rebuilt.

    Safe to call from many processes at once: a file lock beside the folder serialises builds,
    and a process that waited finds the cache the first one built. ``progress`` and
    ``mixed_sizes_hint`` are passed to :func:`build_cache`.
    """
    cache_dir = Path(cache_dir)
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    fingerprint = fingerprint_records(records)
    if _is_current(cache_dir, fingerprint):
        cache = DatasetCache(cache_dir)
        # A read-only data root keeps an older cache as it is: taking the lock would fail there.
        if READ_OPTIONS_KEY in cache.manifest or not os.access(cache_dir.parent, os.W_OK):
            return cache
    # bldseg.io.file_lock: a data root on NFS without a lock daemon must not end the run
    with file_lock(cache_dir.parent / f".{cache_dir.name}.lock"):
        if _is_current(cache_dir, fingerprint):
            # one built by an older bldseg gains its record (and its masks' grid check),
            # instead of a rebuild
            _record_read_options(cache_dir, records)
            return DatasetCache(cache_dir)
        # Builds killed outside Python (SIGKILL, out of memory, a preempted machine) leave their
        # hidden folders, as large as the cache; under the lock no build of this cache runs.
        for stale in [
            *cache_dir.parent.glob(f".{cache_dir.name}.tmp-*"),
            *cache_dir.parent.glob(f".{cache_dir.name}.old-*"),
        ]:
            shutil.rmtree(stale, ignore_errors=True)
        return build_cache(records, cache_dir, progress=progress, mixed_sizes_hint=mixed_sizes_hint)

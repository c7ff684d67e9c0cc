import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bldseg.data import cache as cache_module
from bldseg.data import readers
from bldseg.data.cache import DatasetCache, build_cache, ensure_cache
from bldseg.data.readers import load_record, read_competition_csv, read_folder_dataset
from tests.data.test_readers import make_competition, write_png


def test_build_and_open(tmp_path):
    csv, truth = make_competition(tmp_path / "ds", n=4, size=32)
    cache = build_cache(read_competition_csv(csv), tmp_path / "cache", progress=False)
    assert len(cache) == 4 and cache.image_size == (32, 32)
    assert isinstance(cache.images, np.memmap) and cache.images.shape == (4, 32, 32, 3)
    for i, (img, mask) in enumerate(truth):
        np.testing.assert_array_equal(cache.images[i], img)
        np.testing.assert_array_equal(cache.masks[i], mask)
    assert cache.ids == ["TRAIN_0000", "TRAIN_0001", "TRAIN_0002", "TRAIN_0003"]
    src = cache.sources[0]
    assert src["size"] > 0 and len(src["blake2b"]) == 32
    # nothing temporary is left beside the cache
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "ds"]


def test_pickles_as_path_and_reopens(tmp_path):
    csv, _ = make_competition(tmp_path / "ds")
    cache = build_cache(read_competition_csv(csv), tmp_path / "cache", progress=False)
    blob = pickle.dumps(cache)
    assert len(blob) < 500  # the arrays are not in the pickle
    again = pickle.loads(blob)
    np.testing.assert_array_equal(again.images[1], cache.images[1])


def _no_rebuild(*args, **kwargs):
    raise AssertionError("a current cache was rebuilt")


def test_ensure_cache_reuses_then_rebuilds_when_stale(tmp_path, monkeypatch):
    csv, _ = make_competition(tmp_path / "ds")
    first = ensure_cache(read_competition_csv(csv), tmp_path / "cache", progress=False)
    created = first.manifest["created"]
    manifest = (tmp_path / "cache" / "manifest.json").stat()
    # the same sources: opened as it is, nothing decoded or written again
    with monkeypatch.context() as m:
        m.setattr(cache_module, "build_cache", _no_rebuild)
        again = ensure_cache(read_competition_csv(csv), tmp_path / "cache", progress=False)
    assert again.manifest["fingerprint"] == first.fingerprint
    now = (tmp_path / "cache" / "manifest.json").stat()
    assert (now.st_ino, now.st_mtime_ns) == (manifest.st_ino, manifest.st_mtime_ns)

    # relabel one image: the fingerprint changes and the cache is rebuilt with the new mask
    df = pd.read_csv(csv, dtype=str)
    df.loc[0, "mask_rle"] = "1 5"
    df.to_csv(csv, index=False)
    rebuilt = ensure_cache(read_competition_csv(csv), tmp_path / "cache", progress=False)
    assert rebuilt.fingerprint != first.fingerprint
    assert rebuilt.masks[0].reshape(-1)[:6].tolist() == [1, 1, 1, 1, 1, 0]
    assert rebuilt.manifest["created"] >= created

    # replace an image file: detected by size/mtime
    p = tmp_path / "ds" / "train_img" / "TRAIN_0002.png"
    write_png(p, np.full((32, 32, 3), 7, np.uint8))
    os.utime(p, ns=(time.time_ns(), time.time_ns() + 10**9))
    rebuilt2 = ensure_cache(read_competition_csv(csv), tmp_path / "cache", progress=False)
    assert (rebuilt2.images[2] == 7).all()


def test_a_process_that_waited_for_the_lock_opens_the_cache_built_meanwhile(tmp_path, monkeypatch):
    # Another process holds the lock and builds the cache while this one waits: once inside,
    # this one must open that cache, not build (and replace) it a second time.
    csv, _ = make_competition(tmp_path / "ds", n=3)
    records = read_competition_csv(csv)
    built = []

    class OtherProcessBuilds:
        def __init__(self, path):
            pass

        def __enter__(self):
            built.append(build_cache(records, tmp_path / "cache", progress=False))

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(cache_module, "file_lock", OtherProcessBuilds)
    monkeypatch.setattr(cache_module, "build_cache", _no_rebuild)
    cache = ensure_cache(records, tmp_path / "cache", progress=False)
    assert len(built) == 1 and cache.manifest == built[0].manifest


def test_interrupted_build_leaves_no_valid_cache(tmp_path):
    csv, _ = make_competition(tmp_path / "ds", n=3)
    bad = tmp_path / "ds" / "train_img" / "TRAIN_0002.png"
    bad.write_bytes(b"garbage")  # decoding fails part-way through the build
    with pytest.raises(ValueError, match=r"TRAIN_0002\.png: cannot decode"):
        build_cache(read_competition_csv(csv), tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]
    with pytest.raises(FileNotFoundError, match="not a complete bldseg cache"):
        DatasetCache(tmp_path / "cache")


def test_a_build_killed_outside_python_is_cleaned_up_by_the_next(tmp_path):
    # SIGKILL or an out-of-memory kill leaves the hidden build folder (as large as the cache)
    csv, _ = make_competition(tmp_path / "ds", n=3)
    for leftover in (".cache.tmp-0badc0de", ".cache.old-0badc0de"):
        (tmp_path / leftover).mkdir()
        (tmp_path / leftover / "images.npy").write_bytes(b"\0" * 1024)
    other = tmp_path / ".other.tmp-0badc0de"  # another cache's build: not ours to remove
    other.mkdir()
    cache = ensure_cache(read_competition_csv(csv), tmp_path / "cache", progress=False)
    assert len(cache) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".cache.lock",
        ".other.tmp-0badc0de",
        "cache",
        "ds",
    ]


def test_failed_rebuild_keeps_the_old_cache(tmp_path):
    csv, _ = make_competition(tmp_path / "ds", n=3)
    good = ensure_cache(read_competition_csv(csv), tmp_path / "cache", progress=False)
    before = np.array(good.images)
    (tmp_path / "ds" / "train_img" / "TRAIN_0001.png").write_bytes(b"garbage")
    with pytest.raises(ValueError):
        ensure_cache(read_competition_csv(csv), tmp_path / "cache", progress=False)
    np.testing.assert_array_equal(DatasetCache(tmp_path / "cache").images, before)


def test_mismatched_sizes_name_the_file(tmp_path):
    write_png(tmp_path / "images" / "a.png", np.zeros((16, 16, 3), np.uint8))
    write_png(tmp_path / "images" / "b.png", np.zeros((16, 24, 3), np.uint8))
    with pytest.raises(ValueError, match=r"b \(.*b.png\): image is 16x24, expected 16x16 like a"):
        build_cache(read_folder_dataset(tmp_path / "images"), tmp_path / "c", progress=False)


def test_version_mismatch_is_explained(tmp_path):
    csv, _ = make_competition(tmp_path / "ds")
    cache = build_cache(read_competition_csv(csv), tmp_path / "cache", progress=False)
    manifest = json.loads((cache.root / "manifest.json").read_text())
    manifest["format_version"] = 999
    (cache.root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="cache format 999"):
        DatasetCache(cache.root)


def test_unlabelled_cache(tmp_path):
    csv, _ = make_competition(tmp_path / "ds")
    cache = build_cache(read_competition_csv(csv, with_masks=False), tmp_path / "c", progress=False)
    assert cache.masks is None and not cache.manifest["has_masks"]


def test_tiles_of_a_scene_are_decoded_once(tmp_path, monkeypatch):
    # --tile-size decoded the whole scene (and its mask) once per tile.
    rng = np.random.default_rng(2)
    for name in ("s1", "s2"):
        write_png(tmp_path / "images" / f"{name}.png", rng.integers(0, 256, (64, 96, 3), np.uint8))
        write_png(tmp_path / "masks" / f"{name}.png", (rng.random((64, 96)) > 0.5) * np.uint8(255))
    records = read_folder_dataset(tmp_path / "images", tmp_path / "masks", tile_size=32)
    assert len(records) == 2 * 2 * 3
    expected = [load_record(r) for r in records]
    decoded: list[str] = []
    for name in ("read_image", "read_mask_image"):
        real = getattr(readers, name)

        def counted(path, *args, _real=real, **kwargs):
            decoded.append(Path(path).name)
            return _real(path, *args, **kwargs)

        monkeypatch.setattr(readers, name, counted)
    cache = build_cache(records, tmp_path / "cache", num_threads=2, progress=False)
    assert sorted(decoded) == ["s1.png", "s1.png", "s2.png", "s2.png"]  # image + mask, once each
    assert cache.ids == [r.img_id for r in records]
    for i, (img, mask) in enumerate(expected):
        np.testing.assert_array_equal(cache.images[i], img)
        np.testing.assert_array_equal(cache.masks[i], mask)


def test_ensure_cache_where_the_filesystem_cannot_lock(tmp_path, monkeypatch):
    # a data root on NFS without a lock daemon: flock says ENOLCK, and the run ended there
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    csv, _ = make_competition(tmp_path / "ds")
    records = read_competition_csv(csv)
    cache = ensure_cache(records, tmp_path / "cache", progress=False)
    assert len(cache) == len(records) and cache.masks is not None


def test_rle_caches_are_keyed_by_image_rules_only(tmp_path, monkeypatch):
    # The mask rules (DECODE_RULES) decide how mask files decode; RLE masks never meet them.
    # Keyed by them, each bump rebuilt competition caches (22 GB at 7,140 images of 1024²) and
    # refused every search and pipeline on them to resume, with nothing decoded differently.
    from bldseg.data.prepare import DataOptions, prepare_data

    csv, _ = make_competition(tmp_path / "ds")
    folder = tmp_path / "folder"
    write_png(folder / "images" / "a.png", np.zeros((32, 32, 3), np.uint8))
    write_png(folder / "masks" / "a.png", np.zeros((32, 32), np.uint8))

    def keys():
        rle = cache_module.fingerprint_records(read_competition_csv(csv))
        files = cache_module.fingerprint_records(
            read_folder_dataset(folder / "images", folder / "masks")
        )
        return rle, files, DataOptions().key(masks=False), DataOptions().key()

    before = keys()
    monkeypatch.setattr(readers, "DECODE_RULES", readers.DECODE_RULES + 1)
    after = keys()
    assert after[0] == before[0] and after[2] == before[2]  # RLE: fingerprint, cache folder
    assert after[1] != before[1] and after[3] != before[3]  # mask files: both change
    monkeypatch.setattr(readers, "IMAGE_RULES", readers.IMAGE_RULES + 1)
    assert keys()[0] != before[0] and keys()[2] != before[2]  # image rules reach RLE data too
    # prepare_data after a bump of the mask rules alone: the same competition cache, reused
    monkeypatch.setattr(readers, "IMAGE_RULES", readers.IMAGE_RULES - 1)
    first = prepare_data(csv.parent, data_root=tmp_path / "root", progress=False)
    monkeypatch.setattr(readers, "DECODE_RULES", readers.DECODE_RULES + 1)
    monkeypatch.setattr(cache_module, "build_cache", _no_rebuild)
    again = prepare_data(csv.parent, data_root=tmp_path / "root", progress=False)
    assert again.train.root == first.train.root
    assert again.train.fingerprint == first.train.fingerprint


# --- a full disk ----------------------------------------------------------------------------


def _no_space(fd, length):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_is_an_error_before_decoding_and_leaves_nothing(tmp_path, monkeypatch):
    # The cache is filled through memory maps: a disk found full while writing into one is a
    # SIGBUS that kills the process ("Bus error", no message, the build folder left behind).
    csv, _ = make_competition(tmp_path / "ds", n=3)
    old = ensure_cache(read_competition_csv(csv), tmp_path / "cache", progress=False)
    before = np.array(old.images)
    (tmp_path / "ds" / "train_img" / "TRAIN_0001.png").touch()  # stale: a rebuild is due
    monkeypatch.setattr(cache_module, "_fallocate", _no_space)
    decoded = []
    real_decode = cache_module.decode_records
    monkeypatch.setattr(
        cache_module, "decode_records", lambda rs: decoded.extend(rs) or real_decode(rs)
    )
    with pytest.raises(OSError, match=r"the cache needs 0\.0 MiB for its images and masks, ") as e:
        ensure_cache(read_competition_csv(csv), tmp_path / "cache", progress=False)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "cache")
    assert len(decoded) == 1  # only the first image, for the size: nothing else was decoded
    # no half-built folder left; the old cache is still there, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cache.lock", "cache", "ds"]
    np.testing.assert_array_equal(DatasetCache(tmp_path / "cache").images, before)


def test_a_full_disk_is_named_by_the_prepare_command(tmp_path, monkeypatch, capsys):
    from bldseg.commands.prepare import main

    write_png(tmp_path / "ds" / "images" / "a.png", np.zeros((32, 32, 3), np.uint8))
    write_png(tmp_path / "ds" / "masks" / "a.png", np.full((32, 32), 255, np.uint8))
    monkeypatch.setattr(cache_module, "_fallocate", _no_space)
    root = tmp_path / "root"
    assert main(["--data", str(tmp_path / "ds"), "--data-root", str(root)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: --data-root {root}: the disk is full ([Errno 28] the cache ")
    assert "free space and run the command again" in err
    assert not [p for p in (root / "cache").rglob("*") if ".tmp-" in p.name]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fallocate(2) is Linux's")
def test_fallocate_reserves_the_blocks_of_a_sparse_file(tmp_path):
    path = tmp_path / "sparse.npy"
    with open(path, "wb") as f:
        f.truncate(1 << 20)  # what open_memmap creates: a size, no blocks
    fd = os.open(path, os.O_RDWR)
    try:
        cache_module._fallocate(fd, 1 << 20)
    except OSError as e:
        if e.errno != errno.EOPNOTSUPP:
            raise
        pytest.skip(f"{tmp_path}'s filesystem cannot reserve blocks")
    finally:
        os.close(fd)
    assert path.stat().st_blocks * 512 >= 1 << 20 and path.stat().st_size == 1 << 20


def test_without_fallocate_the_free_space_is_compared(tmp_path, monkeypatch):
    # macOS has no fallocate, some filesystems cannot reserve (NFSv3): the sizes are compared
    import shutil
    from collections import namedtuple

    csv, _ = make_competition(tmp_path / "ds", n=3)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 5000, 5000))
    for unsupported in (errno.ENOSYS, errno.EOPNOTSUPP):

        def cannot(fd, length, code=unsupported):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(cache_module, "_fallocate", cannot)
        with pytest.raises(OSError, match=r"needs 0\.0 MiB for its images and masks, 0\.0 MiB is"):
            build_cache(read_competition_csv(csv), tmp_path / "cache", progress=False)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 0, 10**9))
    assert len(build_cache(read_competition_csv(csv), tmp_path / "cache", progress=False)) == 3


def _can_mount_tmpfs() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("mount") is not None


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="mounting a small tmpfs needs root")
def test_a_really_full_disk_ends_prepare_with_a_message(tmp_path):
    # The reviewer's repro: 24 images of 64x64 (400 KB of cache) on a 256 KB tmpfs.
    for i in range(24):
        img = np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        write_png(tmp_path / "ds" / "images" / f"t{i}.png", img)
        write_png(tmp_path / "ds" / "masks" / f"t{i}.png", np.full((64, 64), 255, np.uint8))
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        data = ["--data", str(tmp_path / "ds"), "--data-root", str(small)]
        run = subprocess.run(
            [sys.executable, "-m", "bldseg", "prepare", *data],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 1, (run.returncode, run.stderr[-2000:])  # not -7: SIGBUS
        assert "the disk is full" in run.stderr and "the cache needs 0.4 MiB" in run.stderr
        assert not [p for p in small.rglob("*") if ".tmp-" in p.name]
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


# --- reopening in workers -------------------------------------------------------------------


def test_a_worker_refuses_a_cache_rebuilt_from_other_data(tmp_path):
    # spawn/forkserver DataLoader workers and Ray tasks unpickle the cache: they reopen the
    # folder, while the parent keeps the maps of the build it opened
    csv, _ = make_competition(tmp_path / "ds")
    cache = ensure_cache(read_competition_csv(csv), tmp_path / "cache", progress=False)
    blob = pickle.dumps(cache)
    # rebuilt by another command from the same sources: the same data, reopened as it is
    shutil.rmtree(tmp_path / "cache")
    ensure_cache(read_competition_csv(csv), tmp_path / "cache", progress=False)
    np.testing.assert_array_equal(pickle.loads(blob).masks[0], cache.masks[0])
    # rebuilt from a relabelled image: the parent's maps and the folder disagree
    df = pd.read_csv(csv, dtype=str)
    df.loc[0, "mask_rle"] = "-1"
    df.to_csv(csv, index=False)
    ensure_cache(read_competition_csv(csv), tmp_path / "cache", progress=False)
    with pytest.raises(ValueError, match=r"cache was rebuilt from other data since this run"):
        pickle.loads(blob)
    assert cache.masks[0].any()  # the parent still reads what it opened
    # a pickle without the fingerprint (an older bldseg) opens the folder as before
    old = DatasetCache.__new__(DatasetCache)
    old.__setstate__({"root": str(tmp_path / "cache")})
    assert not old.masks[0].any()


# --- georeference sidecars ------------------------------------------------------------------


def _touch(path: Path, text: str = "x", later_s: int = 0) -> None:
    path.write_text(text)
    t = time.time_ns() + later_s * 10**9
    os.utime(path, ns=(t, t))


def test_georeference_sidecars_are_part_of_the_fingerprint(tmp_path):
    # Footprints are burnt through the image's georeference, which GDAL may read from files
    # beside it: moving it there moved every mask, and the cache went on serving the old ones.
    (tmp_path / "images").mkdir()
    (tmp_path / "fp").mkdir()
    image, polygons = tmp_path / "images" / "a.png", tmp_path / "fp" / "a.shp"
    image.write_bytes(b"png")
    polygons.write_bytes(b"shp")
    record = readers.SourceRecord("a", image, mask_path=polygons)
    seen = {cache_module.fingerprint_records([record])}

    def changed() -> bool:
        fp = cache_module.fingerprint_records([record])
        new = fp not in seen
        seen.add(fp)
        return new

    _touch(tmp_path / "images" / "a.png.aux.xml", "<PAMDataset/>")  # added
    assert changed()
    _touch(tmp_path / "images" / "a.png.aux.xml", "<PAMDataset>!</PAMDataset>", 5)  # edited
    assert changed()
    for name in ("a.wld", "a.PGW", "a.pngw", "a.png.msk"):  # any case, as GDAL finds them
        _touch(tmp_path / "images" / name)
        assert changed(), name
    for name in ("a.dbf", "a.prj", "a.shx", "a.CPG"):  # the Shapefile's other parts
        _touch(tmp_path / "fp" / name)
        assert changed(), name
    (tmp_path / "images" / "a.wld").unlink()  # removed
    assert changed()
    # files GDAL does not read with them change nothing
    for unrelated in ("b.png.aux.xml", "a.jpg.aux.xml", "a.prj", "a.txt"):
        _touch(tmp_path / "images" / unrelated)
    _touch(tmp_path / "fp" / "b.dbf")
    assert not changed()


def test_sidecars_count_only_where_gdal_reads_the_file(tmp_path):
    # A PNG decoded by OpenCV ignores them: a viewer's .aux.xml of statistics beside a training
    # tile must not rebuild a 30 GB cache. A TIFF is read with rasterio: nodata, masks.
    write_png(tmp_path / "images" / "a.png", np.zeros((8, 8, 3), np.uint8))
    write_png(tmp_path / "masks" / "a.png", np.zeros((8, 8), np.uint8))
    (tmp_path / "images" / "b.tif").write_bytes(b"tif")
    plain = readers.SourceRecord(
        "a", tmp_path / "images" / "a.png", mask_path=tmp_path / "masks" / "a.png"
    )
    tiff = readers.SourceRecord("b", tmp_path / "images" / "b.tif", mask_rle="-1")
    before = [cache_module.fingerprint_records([r]) for r in (plain, tiff)]
    _touch(tmp_path / "images" / "a.png.aux.xml")
    _touch(tmp_path / "masks" / "a.png.aux.xml")
    _touch(tmp_path / "images" / "b.tif.aux.xml")
    after = [cache_module.fingerprint_records([r]) for r in (plain, tiff)]
    assert after[0] == before[0] and after[1] != before[1]


def test_sidecar_names_follow_gdal():
    names = cache_module.sidecar_names
    assert set(names(Path("d/S.TIF"))) == {
        "s.tif.aux.xml",
        "s.tif.msk",
        "s.tif.aux",
        "s.aux",
        "s.wld",
        "s.tab",
        "s.tifw",
        "s.tfw",
    }
    assert "a.jgw" in names(Path("a.jpeg")) and "a.jpegw" in names(Path("a.jpeg"))
    assert names(Path("fp.gpkg")) == ("fp.gpkg-wal",)  # edits not yet checkpointed
    assert names(Path("fp.geojson")) == ()


# --- content digest -------------------------------------------------------------------------


def test_the_content_digest_follows_the_pixels_not_the_files(tmp_path):
    # A run records it to tell a resume on other data (masks fixed) from the same data read
    # from another folder, regenerated, or copied without their times (other fingerprints).
    csv, _ = make_competition(tmp_path / "a", n=3)
    first = build_cache(read_competition_csv(csv), tmp_path / "ca", progress=False)
    copied = shutil.copytree(tmp_path / "a", tmp_path / "b", copy_function=shutil.copy)
    second = build_cache(read_competition_csv(copied / csv.name), tmp_path / "cb", progress=False)
    assert first.fingerprint != second.fingerprint
    assert first.content == second.content and len(first.content) == 32

    # a cache built before the digest was kept computes the same one from its arrays
    manifest = json.loads((second.root / "manifest.json").read_text())
    del manifest["content"]
    (second.root / "manifest.json").write_text(json.dumps(manifest))
    assert DatasetCache(second.root).content == first.content

    # one mask pixel edited: another digest
    from bldseg.data.rle import rle_decode, rle_encode

    frame = pd.read_csv(copied / csv.name)
    mask = rle_decode(frame.loc[0, "mask_rle"], (32, 32))
    mask[0, 0] ^= 1
    frame.loc[0, "mask_rle"] = rle_encode(mask)
    frame.to_csv(copied / csv.name, index=False)
    third = build_cache(read_competition_csv(copied / csv.name), tmp_path / "cc", progress=False)
    assert third.content != first.content


# --- read options ---------------------------------------------------------------------------


def test_the_manifest_records_the_read_options_and_an_older_cache_gains_them(tmp_path, monkeypatch):
    # A model trained on a cache given as --data records how its images were read from here.
    csv, _ = make_competition(tmp_path / "ds")
    options = readers.ReadOptions(alpha="fill", bands=(3, 2, 1), stretch=(10.0, 90.0))
    records = read_competition_csv(csv, options=options)
    cache = ensure_cache(records, tmp_path / "cache", progress=False)
    recorded = json.loads((cache.root / "manifest.json").read_text())["read_options"]
    assert recorded["alpha"] == "fill" and recorded["bands"] == [3, 2, 1]
    assert recorded["stretch"] == [10.0, 90.0] and cache.read_options == recorded

    # a cache built before the options were recorded: current (no rebuild), the record added
    manifest = json.loads((cache.root / "manifest.json").read_text())
    del manifest["read_options"]
    (cache.root / "manifest.json").write_text(json.dumps(manifest))
    assert DatasetCache(cache.root).read_options is None
    monkeypatch.setattr(cache_module, "build_cache", _no_rebuild)
    again = ensure_cache(records, tmp_path / "cache", progress=False)
    assert again.fingerprint == cache.fingerprint and again.content == cache.content
    assert again.read_options == recorded
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cache.lock", "cache", "ds"]
    assert sorted(p.name for p in again.root.iterdir()) == [
        "images.npy",
        "manifest.json",
        "masks.npy",
        "sources.json",
    ]


def test_records_decoded_with_different_options_record_none(tmp_path):
    csv, _ = make_competition(tmp_path / "ds")
    records = read_competition_csv(csv)
    records[1] = replace(records[1], options=readers.ReadOptions(stretch=(5.0, 95.0)))
    assert build_cache(records, tmp_path / "cache", progress=False).read_options is None

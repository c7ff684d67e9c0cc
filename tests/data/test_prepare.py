"""``--data`` for every kind of dataset, and splits that keep source scenes together."""

import json
import re
from dataclasses import asdict

import cv2
import numpy as np
import pandas as pd
import pytest

from bldseg.data import cache as cache_module
from bldseg.data.dataset import split_groups, split_indices
from bldseg.data.prepare import DataOptions, detect_data, prepare_data
from bldseg.data.readers import ReadOptions, read_folder_dataset
from bldseg.data.rle import rle_encode
from tests.data.formats import scene


def _scenes(root, sizes, seed=0):
    """images/<name>.png + masks/<name>.png for scenes of the given (h, w)."""
    for i, (h, w) in enumerate(sizes):
        s = scene(max(h, w), seed + i)
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / "images" / f"scene{i}.png"), s[0][:h, :w, ::-1])
        cv2.imwrite(str(root / "masks" / f"scene{i}.png"), s[1][:h, :w] * 255)
    return root


def _no_rebuild(*args, **kwargs):
    raise AssertionError("a current cache was rebuilt")


def test_detects_every_kind(tmp_path, small_world):
    assert detect_data(None) == "synthetic"
    assert detect_data(small_world.root) == "competition"
    assert detect_data(small_world.root / "train.csv") == "competition"
    assert detect_data(small_world.train.root) == "cache"
    assert detect_data(small_world.train.root.parent) == "cache"
    assert detect_data(_scenes(tmp_path / "f", [(32, 32)])) == "folders"
    assert detect_data(None, DataOptions(images=str(tmp_path))) == "folders"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"train.csv .*images/ \+ masks/.*--images"):
        detect_data(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        detect_data(tmp_path / "nope")


def test_folder_dataset_with_tiles_is_cached_and_described(tmp_path, capsys, monkeypatch):
    root = _scenes(tmp_path / "ds", [(64, 64), (96, 64), (64, 128), (32, 32)])
    data = prepare_data(
        root,
        options=DataOptions(tile_size=32),
        data_root=tmp_path / "work",
        progress=False,
        verbose=True,
    )
    assert data.kind == "folders" and data.test is None
    assert len(data.train) == 4 + 6 + 8 + 1 and data.train.image_size == (32, 32)
    out = capsys.readouterr().out
    assert "data (folders): image/mask folders" in out and "19 samples of 32x32 from 4" in out
    manifest = (data.train.root / "manifest.json").stat()
    monkeypatch.setattr(cache_module, "build_cache", _no_rebuild)
    # The same folder as a cache: no rebuild, same arrays.
    again = prepare_data(data.train.root, data_root=tmp_path / "work", progress=False)
    assert again.kind == "cache" and again.train.fingerprint == data.train.fingerprint
    # The same folder and options again: the cache is reused, not rebuilt.
    again = prepare_data(
        root, options=DataOptions(tile_size=32), data_root=tmp_path / "work", progress=False
    )
    assert again.train.root == data.train.root
    now = (data.train.root / "manifest.json").stat()
    assert (now.st_ino, now.st_mtime_ns) == (manifest.st_ino, manifest.st_mtime_ns)


def test_mixed_sizes_without_tiles_name_the_flag(tmp_path):
    root = _scenes(tmp_path / "ds", [(32, 32), (64, 64)])
    with pytest.raises(ValueError, match=r"scene1 .*64x64, expected 32x32 .*--tile-size"):
        prepare_data(root, data_root=tmp_path / "work", progress=False)


def _competition(root, train_sizes, test_sizes=()):
    """train.csv (+ test.csv when test_sizes) over square scenes of the given sides."""
    root.mkdir(parents=True, exist_ok=True)
    rows, test_rows = [], []
    for i, size in enumerate(train_sizes):
        rgb, m = scene(size, i)
        cv2.imwrite(str(root / f"t{i}.png"), rgb[..., ::-1])
        rows.append((f"T{i}", f"t{i}.png", rle_encode(m)))
    pd.DataFrame(rows, columns=["img_id", "img_path", "mask_rle"]).to_csv(
        root / "train.csv", index=False
    )
    for i, size in enumerate(test_sizes):
        cv2.imwrite(str(root / f"s{i}.png"), scene(size, 10 + i)[0][..., ::-1])
        test_rows.append((f"S{i}", f"s{i}.png"))
    if test_rows:
        pd.DataFrame(test_rows, columns=["img_id", "img_path"]).to_csv(
            root / "test.csv", index=False
        )
    return root


def test_competition_mixed_sizes_give_advice_that_works(tmp_path):
    # --tile-size cuts only folder layouts: advising it for train.csv sent users in a circle.
    root = _competition(tmp_path, [32, 64])
    with pytest.raises(ValueError) as e:
        prepare_data(root, data_root=tmp_path / "w", progress=False)
    msg = str(e.value)
    assert "T1 " in msg and "train.csv: the competition layout caches each image whole" in msg
    assert "pass --tile-size (tile_size=)" not in msg
    # and --tile-size itself is refused there (it was ignored without a word)
    with pytest.raises(ValueError) as e:
        prepare_data(root, options=DataOptions(tile_size=16), data_root=tmp_path / "w")
    msg = str(e.value)
    assert msg.startswith("--tile-size: only image/mask folder layouts") and str(root) in msg
    assert "images/NAME.png + masks/NAME.png" in msg
    # A test.csv of mixed sizes gets the prediction advice, as prediction itself gives.
    _competition(tmp_path, [32, 32], test_sizes=[32, 48])
    with pytest.raises(ValueError, match=r"S1 .*test\.csv is predicted one image per tile"):
        prepare_data(root, data_root=tmp_path / "w", progress=False)


def test_explicit_folders_and_options(tmp_path):
    root = _scenes(tmp_path / "ds", [(32, 32), (32, 32)])
    (root / "masks").rename(root / "gt")
    opts = DataOptions(images=str(root / "images"), masks=str(root / "gt"))
    data = prepare_data(None, options=opts, data_root=tmp_path / "work", progress=False)
    assert len(data.train) == 2
    with pytest.raises(FileNotFoundError, match="no labels for training"):
        prepare_data(root, data_root=tmp_path / "work", progress=False)


def test_split_never_puts_one_scene_on_both_sides(tmp_path):
    sizes = [(64, 96)] * 5 + [(32, 32)] * 6 + [(96, 96)] * 3
    root = _scenes(tmp_path / "ds", sizes)
    cache = prepare_data(
        root, options=DataOptions(tile_size=32), data_root=tmp_path / "w", progress=False
    ).train
    groups = split_groups(cache)
    assert len(set(groups)) == len(sizes)
    for seed in range(10):
        tr, va = split_indices(len(cache), 0.2, seed, groups)
        assert len(tr) + len(va) == len(cache) and len(va) > 0
        assert not {groups[i] for i in tr} & {groups[i] for i in va}
        # close to the asked share although whole scenes (up to 9 tiles) move together
        assert abs(len(va) / len(cache) - 0.2) < 0.2


def test_split_by_image_is_unchanged_without_groups():
    for n in (3, 24, 100):
        perm = np.random.default_rng(7).permutation(n)
        n_val = min(n - 1, max(1, round(n * 0.2)))
        _, va = split_indices(n, 0.2, 7)
        np.testing.assert_array_equal(va, np.sort(perm[:n_val]))
        _, va_groups = split_indices(n, 0.2, 7, [f"g{i}" for i in range(n)])
        np.testing.assert_array_equal(va_groups, va)
    with pytest.raises(ValueError, match="at least 2 split groups"):
        split_indices(4, 0.5, 0, ["a"] * 4)


def test_split_group_pattern_keeps_map_blocks_together(tmp_path):
    # Map tiles x120..x139: the pattern captures the x block of ten.
    root = tmp_path / "tiles"
    names = [f"tile_x{x}_y5" for x in range(120, 140)]
    for i, n in enumerate(names):
        s = scene(32, i)
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / "images" / f"{n}.png"), s[0][..., ::-1])
        cv2.imwrite(str(root / "masks" / f"{n}.png"), s[1] * 255)
    cache = prepare_data(root, data_root=tmp_path / "w", progress=False).train
    groups = split_groups(cache, r"x(\d+)\d_")
    assert sorted(set(groups)) == ["12", "13"]
    _, va = split_indices(len(cache), 0.3, 0, groups)
    assert len(va) == 10 and len({groups[i] for i in va}) == 1
    with pytest.raises(ValueError, match=r"does not match .*tile_x120_y5"):
        split_groups(cache, r"zz(\d)")
    # worked out once per cache and pattern (a search's start-up check splits the data for
    # every sample and fold), and a caller's copy cannot change what the next one gets
    import bldseg.data.dataset as dataset

    calls = []
    real = dataset._pattern_groups
    dataset._pattern_groups = lambda *a: calls.append(a) or real(*a)
    try:
        first = split_groups(cache, r"x(\d+)\d_")
        first.append("changed")
        assert split_groups(cache, r"x(\d+)\d_") == groups
    finally:
        dataset._pattern_groups = real
    assert len(calls) == 0  # computed by the first call above, before the stand-in


def test_competition_group_column(tmp_path):
    rows = []
    for i in range(6):
        rgb, m = scene(32, i)
        cv2.imwrite(str(tmp_path / f"t{i}.png"), rgb[..., ::-1])
        rows.append((f"T{i}", f"t{i}.png", rle_encode(m), f"area{i // 2}"))
    df = pd.DataFrame(rows, columns=["img_id", "img_path", "mask_rle", "group"])
    df.to_csv(tmp_path / "train.csv", index=False)
    cache = prepare_data(tmp_path, data_root=tmp_path / "w", progress=False).train
    assert cache.groups == ["area0", "area0", "area1", "area1", "area2", "area2"]
    df.rename(columns={"group": "city"}).to_csv(tmp_path / "train.csv", index=False)
    opts = DataOptions(group_column="city")
    cache = prepare_data(tmp_path, options=opts, data_root=tmp_path / "w", progress=False).train
    assert cache.groups[0] == "area0"
    with pytest.raises(ValueError, match=r"missing column.*'region'"):
        prepare_data(tmp_path, options=DataOptions(group_column="region"), data_root=tmp_path / "w")


def test_read_options_are_part_of_the_folder_cache(tmp_path):
    root = _scenes(tmp_path / "ds", [(32, 32), (32, 32)])
    a = read_folder_dataset(root / "images", root / "masks")
    b = read_folder_dataset(root / "images", root / "masks", options=ReadOptions(alpha="fill"))
    assert a[0].options != b[0].options


def test_jobs_with_other_decoding_options_keep_their_own_caches(tmp_path, monkeypatch):
    # Two searches on one dataset with other decoding flags run side by side: neither may
    # rebuild (and delete) the cache the other's trials are reading.
    root = _scenes(tmp_path / "ds", [(32, 32), (32, 32)])
    w = tmp_path / "w"
    plain = prepare_data(root, data_root=w, progress=False).train
    other = DataOptions(read=ReadOptions(mask_threshold=0.3))
    soft = prepare_data(root, options=other, data_root=w, progress=False).train
    assert soft.root != plain.root
    with monkeypatch.context() as patch:
        patch.setattr(cache_module, "build_cache", _no_rebuild)  # each job's cache is reused
        again = prepare_data(root, data_root=w, progress=False).train
        assert again.root == plain.root and again.fingerprint == plain.fingerprint
        assert prepare_data(root, options=other, data_root=w, progress=False).train.root == (
            soft.root
        )
    # the competition layout too: its group column and decoding options
    rows = []
    for i in range(2):
        rgb, m = scene(32, i)
        cv2.imwrite(str(tmp_path / f"t{i}.png"), rgb[..., ::-1])
        rows.append((f"T{i}", f"t{i}.png", rle_encode(m)))
    pd.DataFrame(rows, columns=["img_id", "img_path", "mask_rle"]).to_csv(
        tmp_path / "train.csv", index=False
    )
    a = prepare_data(tmp_path, data_root=w, progress=False).train
    # an image option: the CSV's RLE masks read no mask flag (refused there)
    filled = DataOptions(read=ReadOptions(alpha="fill"))
    b = prepare_data(tmp_path, options=filled, data_root=w, progress=False).train
    assert a.root != b.root and a.root.is_dir() and b.root.is_dir()


def test_a_cache_given_as_the_data_keeps_the_read_options_it_was_built_with(tmp_path):
    # Training records them in best.pt; prediction reads new images alike. A cache built with
    # --stretch 10 90 --bands 3,2,1 trained a model that predicted with 2 98 and bands 1,2,3.
    root = _scenes(tmp_path / "ds", [(32, 32), (32, 32)])
    read = ReadOptions(alpha="fill", bands=(3, 2, 1), stretch=(10.0, 90.0))
    built = prepare_data(
        root, options=DataOptions(tile_size=16, read=read), data_root=tmp_path / "w", progress=False
    )
    cached = prepare_data(built.train.root, data_root=tmp_path / "w", progress=False)
    assert cached.kind == "cache" and cached.options.read == read
    # the layout is the cache's own: its tiles are already cut
    assert cached.options.tile_size is None and cached.options.images is None
    # the folder holding train/ (and test/), as a competition layout's caches lie
    rows = []
    for i in range(2):
        rgb, m = scene(32, i)
        cv2.imwrite(str(tmp_path / f"t{i}.png"), rgb[..., ::-1])
        rows.append((f"T{i}", f"t{i}.png", rle_encode(m)))
    frame = pd.DataFrame(rows, columns=["img_id", "img_path", "mask_rle"])
    frame.to_csv(tmp_path / "train.csv", index=False)
    frame.drop(columns="mask_rle").to_csv(tmp_path / "test.csv", index=False)
    competition = prepare_data(
        tmp_path, options=DataOptions(read=read), data_root=tmp_path / "w", progress=False
    )
    both = prepare_data(competition.train.root.parent, data_root=tmp_path / "w", progress=False)
    assert both.test is not None and both.options.read == read

    # a cache built before the options were recorded: not known, as before
    manifest_path = built.train.root / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["read_options"]
    manifest_path.write_text(json.dumps(manifest))
    assert prepare_data(built.train.root, data_root=tmp_path / "w", progress=False).options is None
    # a record these options refuse names the manifest
    manifest["read_options"] = {**asdict(read), "stretch": [90.0, 10.0]}
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=rf"{re.escape(str(manifest_path))}: .*stretch.*prepare"):
        prepare_data(built.train.root, data_root=tmp_path / "w", progress=False)


def test_builtin_world_is_regenerated_with_new_parameters(tmp_path, capsys):
    small = dict(n_train=3, train_size=48, n_test=4, test_size=16, test_scene_size=32, seed=1)
    a = prepare_data(None, data_root=tmp_path, synthetic=small, progress=False)
    # the test split's groups are the tiles' source scenes (4 tiles per 32-px scene)
    assert a.test.groups == ["scene_0000"] * 4
    # Other parameters (an older default, a newer generator): the built-in folder is replaced
    # with a message, not refused, and the cache follows the new images.
    b = prepare_data(None, data_root=tmp_path, synthetic={**small, "n_train": 4}, progress=True)
    assert "replacing the synthetic world made with other parameters" in capsys.readouterr().out
    assert len(b.train) == 4 and b.train.fingerprint != a.train.fingerprint
    # A folder there that is not a world of ours is still never overwritten.
    other = tmp_path / "other"
    (other / "synthetic").mkdir(parents=True)
    (other / "synthetic" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a synthetic world"):
        prepare_data(None, data_root=other, synthetic=small, progress=False)
    assert (other / "synthetic" / "notes.txt").read_text() == "mine"


def test_mask_nonzero_flag_reads_instance_masks(tmp_path):
    import argparse
    from dataclasses import asdict

    from bldseg.data.prepare import add_data_arguments, data_options

    parser = argparse.ArgumentParser()
    add_data_arguments(parser)
    assert data_options(parser.parse_args([])).read.mask_nonzero is False
    opts = data_options(parser.parse_args(["--mask-nonzero"]))
    assert opts.read.mask_nonzero is True
    assert DataOptions.from_dict(asdict(opts)) == opts
    with pytest.raises(SystemExit, match="mask_values or mask_nonzero"):
        data_options(parser.parse_args(["--mask-nonzero", "--mask-values", "2"]))
    # Instance ids 1..N: refused without the flag, every building kept with it.
    root = _scenes(tmp_path / "ds", [(32, 32), (32, 32)])
    for i in range(2):
        m = cv2.imread(str(root / "masks" / f"scene{i}.png"), cv2.IMREAD_UNCHANGED)
        # 16-bit ids numbered by 8-row bands: several ids per scene, all far below 32768.
        ids = (m > 0) * (1 + np.arange(32)[:, None] // 8)
        assert len(np.unique(ids)) > 2
        cv2.imwrite(str(root / "masks" / f"scene{i}.png"), ids.astype(np.uint16))
    with pytest.raises(ValueError, match="--mask-nonzero"):
        prepare_data(root, data_root=tmp_path / "work", progress=False)
    data = prepare_data(root, options=opts, data_root=tmp_path / "work", progress=False)
    truth = [cv2.imread(str(root / "masks" / f"scene{i}.png"), -1) > 0 for i in range(2)]
    np.testing.assert_array_equal(np.asarray(data.train.masks) > 0, np.stack(truth))


def test_layout_flags_the_data_kind_does_not_read_are_refused(tmp_path):
    # each was ignored without a word: the run trained on something else than asked
    (tmp_path / "c").mkdir()
    comp = _competition(tmp_path / "c", [32, 32])
    folders = _scenes(tmp_path / "ds", [(32, 32), (32, 32)])
    work = tmp_path / "w"
    cases = [
        (comp, DataOptions(masks=str(tmp_path)), r"^--masks: only image/mask folder"),
        (comp, DataOptions(recursive=False, mask_pattern="{stem}_m.png"), "--mask-pattern, --no"),
        (None, DataOptions(tile_size=16), r"^--tile-size: .*the built-in synthetic world"),
        (folders, DataOptions(group_column="city"), r"^--group-column: only a competition"),
    ]
    for data, opts, said in cases:
        with pytest.raises(ValueError, match=said):
            prepare_data(data, options=opts, data_root=work, progress=False)
    # a cache: already cut and decoded
    prepare_data(folders, options=DataOptions(tile_size=32), data_root=work, progress=False)
    (cache,) = {p.parent.parent for p in work.rglob("manifest.json")}
    with pytest.raises(ValueError, match=r"^--tile-size, --group-column: .*bldseg cache"):
        prepare_data(cache, options=DataOptions(tile_size=32, group_column="g"), data_root=work)
    assert len(prepare_data(cache, data_root=work, progress=False).train) == 2


def test_recorded_flags_the_data_did_not_read_are_left_out_with_a_warning(tmp_path):
    from bldseg.data.prepare import without_unread_options

    comp = _competition(tmp_path, [32, 32])
    recorded = DataOptions(tile_size=64, recursive=False, group_column="city")
    with pytest.warns(UserWarning, match=r"the search s was started with --tile-size, --no-rec"):
        kept = without_unread_options(comp, recorded, "the search s")
    assert kept == DataOptions(group_column="city")  # the competition layout reads that one
    folders = _scenes(tmp_path / "ds", [(32, 32)])
    assert without_unread_options(folders, DataOptions(tile_size=32), "x").tile_size == 32


def test_each_training_csv_of_a_folder_has_its_own_cache(tmp_path, monkeypatch):
    # train.csv and train_clean.csv (the built-in world ships both) shared one cache: each
    # switch rebuilt it, a running search's trials failed its fingerprint check, and a pickled
    # handle (a DataLoader worker's, a Ray trial's) reopened with the other CSV's masks
    import pickle

    from bldseg.data.prepare import _cache_dir

    root = _competition(tmp_path / "c", [32, 32], test_sizes=[32])
    df = pd.read_csv(root / "train.csv", dtype=str, keep_default_na=False)
    df["mask_rle"] = "1 100"
    df.to_csv(root / "train_relabel.csv", index=False)
    work = tmp_path / "w"
    a = prepare_data(root, data_root=work, progress=False)
    # train.csv keeps the cache name existing caches, searches and pipelines point at
    plain = _cache_dir(work.resolve(), root.resolve(), DataOptions().key(masks=False)) / "train"
    assert a.train.root == plain
    handle = pickle.dumps(a.train)
    b = prepare_data(root / "train_relabel.csv", data_root=work, progress=False)
    assert b.train.root == plain.with_name("train-train_relabel")
    assert b.test.root == a.test.root  # one test.csv, one test cache
    assert int(np.asarray(b.train.masks).sum()) == 2 * 100
    masks_a = np.asarray(a.train.masks).copy()
    assert int(masks_a.sum()) != 2 * 100
    np.testing.assert_array_equal(np.asarray(pickle.loads(handle).masks), masks_a)
    # switching back and forth rebuilds neither, and each keeps its fingerprint
    monkeypatch.setattr(cache_module, "build_cache", _no_rebuild)
    for data, was in ((root, a.train), (root / "train_relabel.csv", b.train)):
        again = prepare_data(data, data_root=work, progress=False).train
        assert (again.root, again.fingerprint) == (was.root, was.fingerprint)
    assert a.train.fingerprint != b.train.fingerprint


def test_mask_flags_are_refused_where_no_mask_image_is_decoded(tmp_path):
    # a competition CSV's masks are RLE: --mask-values/--mask-threshold there were ignored
    # without a word, and each value built one more full copy of the cache
    import argparse

    from bldseg.commands import prepare as prepare_cmd
    from bldseg.data.prepare import add_data_arguments, data_options

    comp = _competition(tmp_path / "c", [32, 32])
    work = tmp_path / "w"
    parser = argparse.ArgumentParser()
    add_data_arguments(parser)
    for flags in (
        ["--mask-values", "2"],
        ["--mask-nonzero"],
        ["--mask-colors", "0,0,255"],
        ["--mask-threshold", "0.9"],
    ):
        opts = data_options(parser.parse_args(flags))
        for data, said in (
            (comp, rf"^{flags[0]}: only image/mask folder .*competition layout .*mask_rle"),
            (None, rf"^{flags[0]}: .*built-in synthetic world .*mask_rle"),
        ):
            with pytest.raises(ValueError, match=said):
                prepare_data(data, options=opts, data_root=work, progress=False)
    assert not work.exists()  # refused before the world or any cache is made
    code = prepare_cmd.main(
        ["--data", str(comp), "--data-root", str(work), "--mask-values", "2",
         "--mask-threshold", "0.9"]
    )  # fmt: skip
    assert code == 1 and not work.exists()
    # a cache: its masks were decoded when it was built
    prepare_data(comp, data_root=work, progress=False)
    (cache,) = {p.parent.parent for p in work.rglob("manifest.json")}
    opts = data_options(parser.parse_args(["--mask-nonzero", "--mask-threshold", "0.3"]))
    with pytest.raises(ValueError, match=r"^--mask-nonzero, --mask-threshold: .*bldseg cache"):
        prepare_data(cache, options=opts, data_root=work)
    # and its images too: --bands/--stretch/--alpha on a cache trained what it held, unsaid
    opts = data_options(parser.parse_args(["--bands", "3,2,1", "--alpha", "fill"]))
    with pytest.raises(ValueError, match=r"^--alpha, --bands: .*bldseg cache"):
        prepare_data(cache, options=opts, data_root=work)
    # a competition CSV's images are decoded from files: read
    assert prepare_data(comp, options=opts, data_root=work, progress=False).options == opts
    # image/mask folders read them
    folders = _scenes(tmp_path / "ds", [(32, 32)])
    opts = data_options(parser.parse_args(["--mask-threshold", "0.9"]))
    assert len(prepare_data(folders, options=opts, data_root=work, progress=False).train) == 1


def test_recorded_mask_flags_are_left_out_and_recorded_defaults_kept(tmp_path):
    # the search and pipeline resumes re-apply their recorded data options through
    # without_unread_options: the defaults every record holds must pass untouched, silently
    import json
    import warnings
    from dataclasses import asdict

    from bldseg.data.prepare import without_unread_options

    comp = _competition(tmp_path / "c", [32, 32])
    work = tmp_path / "w"
    folders = _scenes(tmp_path / "ds", [(32, 32)])
    prepare_data(comp, data_root=work, progress=False)
    (cache,) = {p.parent.parent for p in work.rglob("manifest.json")}
    recorded = DataOptions.from_dict(json.loads(json.dumps(asdict(DataOptions()))))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for data in (comp, comp / "train.csv", cache, folders):
            assert without_unread_options(data, recorded, "the search s") == DataOptions()
    # recorded mask flags on RLE masks: left out with a warning, and the data then prepare
    soft = DataOptions(group_column=None, read=ReadOptions(mask_values=(2,), alpha="fill"))
    with pytest.warns(UserWarning, match=r"started with --mask-values, .*fingerprint"):
        kept = without_unread_options(comp, soft, "the pipeline p")
    assert kept == DataOptions(read=ReadOptions(alpha="fill"))  # an image option is read
    assert len(prepare_data(comp, options=kept, data_root=work, progress=False).train) == 2
    with pytest.warns(UserWarning, match=r"--mask-threshold, which .*\(cache\) .*now$"):
        kept = without_unread_options(cache, DataOptions(read=ReadOptions(mask_threshold=0.3)), "x")
    assert kept == DataOptions()
    threshold = DataOptions(read=ReadOptions(mask_threshold=0.3))
    assert without_unread_options(folders, threshold, "x") == threshold


def test_a_training_csv_stands_for_the_test_split_beside_it(tmp_path, capsys):
    # predict --data comp/train_relabel.csv predicted the training images and called them a
    # test split: only a file named exactly train.csv was sent to test.csv
    from bldseg.data.prepare import prepare_test_data

    root = _competition(tmp_path / "c", [32, 32], test_sizes=[32])
    df = pd.read_csv(root / "train.csv", dtype=str, keep_default_na=False)
    df.to_csv(root / "train_relabel.csv", index=False)
    df[["img_id", "img_path"]].to_csv(root / "subset.csv", index=False)
    work = tmp_path / "w"
    for name in ("train.csv", "train_relabel.csv"):
        got = prepare_test_data(root / name, data_root=work, progress=False, verbose=True)
        assert got.test.ids == ["S0"] and got.test.root.name == "test"
        out = capsys.readouterr().out
        assert f"--data {name} is a training CSV" in out and "beside it, test.csv" in out
    # a CSV of images without masks is predicted itself, as before
    got = prepare_test_data(root / "subset.csv", data_root=work, progress=False, verbose=True)
    assert got.test.ids == ["T0", "T1"] and "training CSV" not in capsys.readouterr().out
    # no test.csv beside it: refused naming the CSV, before anything is cached
    (root / "test.csv").unlink()
    other = tmp_path / "w2"
    for name in ("train.csv", "train_relabel.csv"):
        with pytest.raises(FileNotFoundError, match=rf"^--data {root / name}: a training CSV"):
            prepare_test_data(root / name, data_root=other, progress=False)
    assert not other.exists()


@pytest.mark.parametrize(
    ("stems", "hint"),
    [
        (["austin1_0", "austin1_1", "austin1_10", "chicago1_2", "chicago1_3"], True),
        (["TRAIN_0000", "TRAIN_0001", "TRAIN_0002", "TRAIN_0003"], False),  # one prefix
        (["a_0", "a_1", "b_0", "c_0"], False),  # b and c: one file each
        (["a_0", "a_1", "b_0", "b_x"], False),  # b_x is no tile name
    ],
)
def test_tile_names_of_larger_scenes_get_a_split_group_hint(tmp_path, capsys, stems, hint):
    # Inria tiles austin1_10, chicago1_3 were split tile by tile (each file its own scene)
    # without a word: validation then holds tiles of the scenes it trains on.
    for folder in ("images", "masks"):
        (tmp_path / "data" / folder).mkdir(parents=True)
    for stem in stems:
        img, mask = scene(32, seed=len(stem))
        cv2.imwrite(str(tmp_path / "data" / "images" / f"{stem}.png"), img)
        cv2.imwrite(str(tmp_path / "data" / "masks" / f"{stem}.png"), mask * 255)
    data = prepare_data(tmp_path / "data", data_root=tmp_path / "root", verbose=True)
    said = "file names look like tiles of 2 larger scenes (austin1_*, chicago1_*)"
    assert (said in data.split_hint) == hint, data.split_hint
    assert (said in capsys.readouterr().out) == hint  # on the data line
    if hint:
        pattern = re.search(r"--split-group '([^']+)'", data.split_hint).group(1)
        groups = split_groups(data.train, pattern)
        assert sorted(set(groups)) == ["austin1", "chicago1"]
        # a run that groups them already is not told to
        prepare_data(tmp_path / "data", data_root=tmp_path / "root", verbose=True,
                     split_group=pattern)  # fmt: skip
        out = capsys.readouterr().out
        assert said not in out
        # the line counts source files as scenes; the split's groups are said beside them
        assert (
            f"from 5 source scene(s), with masks, 2 split group(s) by --split-group {pattern!r}"
            in out
        )

"""Training does not cache a competition folder's test split.

Training (``bldseg train``, a search's driver) also built the test split's cache: at the
competition's size 60,640 tiles, ~9 GB and about a minute, although no training run reads it.
Now they call ``prepare_data(test_split=False)``; what reads the test split (the pipeline's
test maps and submission, ``bldseg prepare``, prediction) builds the same cache as before.
"""

import json

import numpy as np
import pytest

from bldseg.commands import prepare as prepare_cmd
from bldseg.commands import train as train_cmd
from bldseg.data import cache as cache_module
from bldseg.data.cache import ensure_cache
from bldseg.data.prepare import DataOptions, _cache_dir, prepare_data, prepare_test_data
from bldseg.data.readers import read_competition_csv
from tests.test_predict_data_default import TEST_IDS, write_competition


def _test_cache(comp, data_root):
    """Where the test cache of ``comp`` lives under ``data_root`` (built or not)."""
    key = DataOptions().key(masks=False)
    return _cache_dir(data_root.resolve(), comp.resolve(), key) / "test"


def _no_build(*args, **kwargs):
    raise AssertionError("a cache was built")


def test_training_leaves_no_test_cache(tmp_path, capsys):
    comp = write_competition(tmp_path / "comp")
    work = tmp_path / "data"
    argv = ["--data", str(comp), "--data-root", str(work), "--out", str(tmp_path / "run")]
    for s in ("aug.crop_size=32", "batch_size=8", "samples_per_epoch=16", "epochs=1"):
        argv += ["--set", s]
    assert train_cmd.main([*argv, "--set", "impl=compiled"]) == 0
    out = capsys.readouterr().out
    assert "; test.csv not read (training only)" in out
    assert (_test_cache(comp, work).parent / "train" / "manifest.json").is_file()
    assert not _test_cache(comp, work).exists()


def test_a_search_hands_its_trials_no_test_split(tmp_path, monkeypatch):
    # the driver's data go to every trial as the caches' folders (_data_paths): reading the
    # test split there built its cache before the first trial
    from bldseg.tune import runner
    from tests.tune.test_runner import BASE

    comp = write_competition(tmp_path / "comp")
    work = tmp_path / "data"
    handed = []

    class Prepared(Exception):
        pass

    def prepare_and_stop(*args, **kwargs):
        handed.append(runner._data_paths(prepare_data(*args, **kwargs)))
        raise Prepared

    monkeypatch.setattr(runner, "prepare_data", prepare_and_stop)
    spec = runner.SearchSpec(
        space="augmentation",
        base={**BASE, "aug.crop_size": 32},
        trials=1,
        epochs=1,
        scheduler="fifo",
        storage=str(tmp_path / "runs"),
        data=str(comp),
        data_root=str(work),
        project_dir=str(tmp_path),
    )
    with pytest.raises(Prepared):
        runner.run_search(spec)
    assert handed[0]["test"] is None and handed[0]["train"]
    assert not _test_cache(comp, work).exists()


def test_what_reads_the_test_split_builds_the_same_cache_as_before(tmp_path, monkeypatch):
    from bldseg import pipeline

    comp = write_competition(tmp_path / "comp")
    work = tmp_path / "data"
    prepare_data(comp, data_root=work, progress=False, test_split=False)  # a training run
    where = _test_cache(comp, work)
    assert not where.exists()
    data = prepare_data(comp, data_root=work, progress=False)  # the pipeline's call
    # the pipeline's test maps: truth in test-cache order, the split's fingerprint
    truth = pipeline.test_truth(data)
    assert (where / "manifest.json").is_file() and data.test.root == where
    assert truth.shape == (len(TEST_IDS), 32, 32) and truth.any()
    assert pipeline.fingerprint_test_split(data) is not None
    # as prepare_data built it before: the same arrays, ids, groups, fingerprint and content
    before = ensure_cache(
        read_competition_csv(comp / "test.csv", with_masks=False),
        tmp_path / "eager" / "test",
        progress=False,
    )
    assert data.test.ids == before.ids == TEST_IDS and data.test.groups == before.groups
    assert data.test.fingerprint == before.fingerprint
    assert data.test.content == before.content
    np.testing.assert_array_equal(np.asarray(data.test.images), np.asarray(before.images))
    assert data.test.masks is None and before.masks is None
    # prediction opens the same cache, without building it again
    monkeypatch.setattr(cache_module, "build_cache", _no_build)
    predicted = prepare_test_data(comp, data_root=work, progress=False)
    assert predicted.test.root == where and predicted.test.fingerprint == before.fingerprint


def test_prepare_command_still_caches_the_test_split(tmp_path, capsys):
    comp = write_competition(tmp_path / "comp")
    work = tmp_path / "data"
    assert prepare_cmd.main(["--data", str(comp), "--data-root", str(work)]) == 0
    manifest = json.loads((_test_cache(comp, work) / "manifest.json").read_text())
    assert manifest["n"] == len(TEST_IDS) and not manifest["has_masks"]
    assert f"test cache:  DatasetCache('{_test_cache(comp, work)}'" in capsys.readouterr().out


def test_bad_test_images_do_not_stop_training_and_are_refused_where_read(tmp_path):
    from tests.test_predict_folder import noise_image, write_png

    comp = write_competition(tmp_path / "comp")
    write_png(comp / "test" / "1.png", noise_image(48, 48, seed=1))  # not 32x32 like T0
    data = prepare_data(comp, data_root=tmp_path / "data", progress=False, test_split=False)
    assert len(data.train) == 8 and data.test is None
    with pytest.raises(ValueError, match=r"T1 .*test\.csv is predicted one image per tile"):
        prepare_data(comp, data_root=tmp_path / "data", progress=False)


def test_a_caller_can_leave_the_test_split_out(tmp_path, small_world):
    comp = write_competition(tmp_path / "comp")
    work = tmp_path / "data"
    left_out = prepare_data(comp, data_root=work, progress=False, test_split=False)
    assert left_out.test is None and not _test_cache(comp, work).exists()
    # a bldseg cache given as the data likewise (its test/ is only opened)
    cache = prepare_data(small_world.train.root.parent, progress=False, test_split=False)
    assert cache.test is None and cache.train.fingerprint == small_world.train.fingerprint

import numpy as np
import pytest

from bldseg.ensemble.library import find_runs, load_library, split_by_image
from bldseg.ensemble.synthetic import fake_library, write_runs


@pytest.fixture
def runs(tmp_path):
    lib = fake_library(3, 8, 8, seed=0)
    return lib, write_runs(lib, tmp_path / "results")


def test_load_from_results_folder_round_trips(runs, tmp_path):
    lib, folders = runs
    found = find_runs(tmp_path / "results")
    assert found == folders
    got = load_library(found, root=tmp_path / "results")
    assert got.names == ["trial_model00", "trial_model01", "trial_model02"]
    np.testing.assert_array_equal(got.probs, lib.probs)
    np.testing.assert_array_equal(got.truth, lib.truth)
    assert [c.name for c in got.checkpoints] == ["best.pt"] * 3


def test_tiles_in_another_order_are_realigned(runs):
    lib, folders = runs
    f = folders[1] / "val_probs.npz"
    z = dict(np.load(f))
    perm = np.random.default_rng(0).permutation(8)
    np.savez(f, **{k: v[perm] for k, v in z.items()})
    got = load_library(folders)
    np.testing.assert_array_equal(got.probs[1], lib.probs[1])


def _edit(folder, **change):
    f = folder / "val_probs.npz"
    z = dict(np.load(f))
    z.update(change)
    np.savez(f, **z)


def test_missing_tile_names_model_and_tile(runs):
    _lib, folders = runs
    z = dict(np.load(folders[2] / "val_probs.npz"))
    np.savez(folders[2] / "val_probs.npz", **{k: v[1:] for k, v in z.items()})
    with pytest.raises(ValueError, match=r"model 'trial_model02' has no tile 'tile00000'"):
        load_library(folders)


def test_different_truth_names_model_and_tile(runs):
    lib, folders = runs
    truth = lib.truth.astype(np.uint8)
    truth[3, 0, 0] ^= 1
    _edit(folders[1], truth=truth)
    with pytest.raises(ValueError, match=r"'trial_model01'.*ground truth of tile 'tile00003'"):
        load_library(folders)


def test_renamed_tile_and_wrong_dtype(runs):
    lib, folders = runs
    ids = lib.tile_ids.copy()
    ids[5] = "elsewhere"
    _edit(folders[1], tile_ids=ids)
    with pytest.raises(ValueError, match=r"'trial_model01' has no tile 'tile00005'"):
        load_library(folders)
    _edit(folders[1], tile_ids=lib.tile_ids, probs=lib.probs[1].astype(np.float32))
    with pytest.raises(ValueError, match="must be uint8"):
        load_library(folders)


def test_missing_file_and_duplicates(runs, tmp_path):
    _, folders = runs
    with pytest.raises(FileNotFoundError, match=r"val_probs\.npz"):
        load_library([tmp_path])
    with pytest.raises(ValueError, match="more than once"):
        load_library([folders[0], folders[0] / "val_probs.npz"])
    with pytest.raises(FileNotFoundError, match="no run folder"):
        find_runs(tmp_path / "results" / "trial_model00" / "..", file_name="nothing.npz")


def test_unreadable_member_is_named(runs):
    # a garbage or truncated val_probs.npz: a ValueError naming the model (the command's one
    # line and status 2), not a zipfile traceback
    _, folders = runs
    f = folders[1] / "val_probs.npz"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"model .*: cannot read it \(BadZipFile"):
        load_library(folders)
    f.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read it"):
        load_library(folders)


def test_split_by_image_keeps_images_whole():
    ids = np.repeat(np.array([f"img{i}" for i in range(10)]), 3)
    sel, chk = split_by_image(ids, 0.5, seed=1)
    assert len(sel) == len(chk) == 15
    assert not set(ids[sel]) & set(ids[chk])
    assert sorted([*sel, *chk]) == list(range(30))
    assert (split_by_image(ids, 0.5, seed=1)[0] == sel).all()
    with pytest.raises(ValueError, match="at least two source images"):
        split_by_image(np.array(["a", "a"]))

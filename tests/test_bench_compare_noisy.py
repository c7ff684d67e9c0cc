"""experiments/compare_noisy.py: its run folders belong to one world and one config."""

import sys
from pathlib import Path

from bldseg.data.prepare import prepare_data
from bldseg.train import RunConfig
from bldseg.tune.cli import fixed_config

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import compare_noisy  # noqa: E402

SMALL = {"n_train": 6, "train_size": 64, "n_test": 4, "test_size": 32, "test_scene_size": 64}


def test_another_world_gets_its_own_run_folders(tmp_path):
    # two --data-root worlds: clean masks, and 60% noisy ones from another seed
    a = prepare_data(None, data_root=tmp_path / "a", synthetic={**SMALL, "noise_fraction": 0.0})
    b = prepare_data(
        None, data_root=tmp_path / "b", synthetic={**SMALL, "noise_fraction": 0.6, "seed": 2}
    )
    assert a.train.fingerprint != b.train.fingerprint
    flat = RunConfig.from_flat({**fixed_config(None, sets=["epochs=1"]), "seed": 0}).to_flat()
    out = tmp_path / "runs"
    in_a = compare_noisy.run_folder(out, "bce", flat, a.train.fingerprint)
    # the first world's folder is not the second's: fit() would have resumed, or (finished)
    # reused, world a's model for world b
    assert compare_noisy.run_folder(out, "bce", flat, b.train.fingerprint) != in_a
    # the same world and config find their run again (a re-run continues it) ...
    assert compare_noisy.run_folder(out, "bce", dict(flat), a.train.fingerprint) == in_a
    assert in_a.parent == out / "bce" and in_a.name.startswith("seed0-")
    # ... and another config (here a seed) has its own
    other = compare_noisy.run_folder(out, "bce", {**flat, "seed": 1}, a.train.fingerprint)
    assert other != in_a and other.name.startswith("seed1-")

"""A K-fold run's ``folds.json``: it records the config its folds train (the crop fitted to the
images, which prediction slides its windows at), is written only once the data has accepted
the config, and a manifest whose folds never trained does not refuse the corrected command."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from bldseg.commands import train as train_cmd
from bldseg.predict import default_window
from bldseg.train import folds as folds_module
from bldseg.train.config import RunConfig
from bldseg.train.engine import RUN_LOCK_FILE
from bldseg.train.folds import fit_folds
from tests.train.test_folds import SCENES
from tests.train.test_run_folder_lock import HOLD

BASE = {"batch_size": 8, "samples_per_epoch": 16, "epochs": 1, "impl": "compiled"}
# The CPU defaults' crop on images smaller than it (the tiny world's are 96 px): fitted to 96.
FIT = {"aug.crop_size": 128, "aug.crop_fit": True}


def kfold(**kw) -> RunConfig:
    return RunConfig.from_flat({**BASE, "folds": 2, "split_group": SCENES, **kw})


def manifest(run):
    return json.loads((run / "folds.json").read_text())


@pytest.fixture(scope="module")
def fitted_run(small_world, tmp_path_factory):
    """A 2-fold run of a 128-px crop with aug.crop_fit on the 96-px tiny world."""
    run = tmp_path_factory.mktemp("fitted") / "run"
    assert fit_folds(kfold(**FIT), run, data=small_world).status == "completed"
    return run


def test_the_manifest_records_the_crop_the_folds_trained(fitted_run):
    # folds.json said 192 while every fold trained and validated on 128-px tiles, and
    # prediction slid the manifest's 192-px windows over a K-fold member.
    cfg = RunConfig.from_flat(manifest(fitted_run)["config"])
    assert cfg.aug.crop_size == 96
    for f in (0, 1):
        best = torch.load(fitted_run / f"fold{f}" / "best.pt", weights_only=True)
        assert RunConfig.from_flat(best["config"]).aug.crop_size == 96
    assert np.load(fitted_run / "val_probs.npz")["probs"].shape[1:] == (96, 96)
    assert default_window(cfg) == 96


def test_a_manifest_of_the_asked_crop_resumes(fitted_run, small_world, tmp_path, capsys):
    # folds.json written before the fitted crop was recorded holds the crop asked for: the
    # same config as the folds' (they trained the fitted crop), so the run continues.
    run = shutil.copytree(fitted_run, tmp_path / "run")
    old = manifest(run)
    old["config"]["aug.crop_size"] = 128
    (run / "folds.json").write_text(json.dumps(old))
    trained = (run / "fold0" / "best.pt").stat().st_mtime_ns
    for asked in (FIT, {**FIT, "aug.crop_size": 96}):  # the crop asked for, or the one used
        assert fit_folds(kfold(**asked), run, data=small_world).status == "completed"
        assert manifest(run)["config"]["aug.crop_size"] == 96  # rewritten as trained
        (run / "folds.json").write_text(json.dumps(old))
    assert (run / "fold0" / "best.pt").stat().st_mtime_ns == trained  # nothing trained again
    # another crop is another config, refused before anything is written
    with pytest.raises(ValueError, match=r"different config \(aug.crop_size: 96 -> 64\)"):
        fit_folds(kfold(**{**FIT, "aug.crop_size": 64}), run, data=small_world)
    assert manifest(run) == old


def train(world, out, *sets: str) -> int:
    argv = ["--data", str(world.root), "--data-root", str(world.root.parent), "--out", str(out)]
    argv += ["--split-group", SCENES, "--folds", "2"]
    for s in [*(f"{k}={v}" for k, v in BASE.items()), *sets]:
        argv += ["--set", s]
    return train_cmd.main(argv)


@pytest.mark.parametrize(
    ("bad", "said"),
    [
        (["aug.crop_size=128"], "aug.crop_size=128 is larger than the cached images (96x96)"),
        (["aug.crop_size=64", "val_tile=128"], "val_tile=128 is larger than the images (96x96)"),
        (["aug.crop_size=64", "samples_per_epoch=1"], "no training step in an epoch"),
    ],
)
def test_a_config_the_data_refuses_writes_no_manifest(small_world, tmp_path, capsys, bad, said):
    # The manifest was written before the first fold's fit checked the config: the failed
    # command left a folds.json (status running) that refused the corrected one.
    run = tmp_path / "run"
    assert train(small_world, run, *bad) == 1
    assert said in capsys.readouterr().err
    assert not (run / "folds.json").exists() and not (run / "fold0").exists()
    assert train(small_world, run, "aug.crop_size=64") == 0
    assert manifest(run)["status"] == "completed"


class OutOfMemory(RuntimeError):
    """A first epoch that fails after the manifest is written (no fold checkpoint yet)."""


def fail_in_first_epoch(monkeypatch):
    def fit(*args, **kw):
        raise OutOfMemory

    monkeypatch.setattr(folds_module, "fit", fit)


def test_a_manifest_whose_folds_never_trained_is_replaced(small_world, tmp_path, monkeypatch):
    run = tmp_path / "run"
    fail_in_first_epoch(monkeypatch)
    with pytest.raises(OutOfMemory):
        fit_folds(kfold(**{"aug.crop_size": 64, "batch_size": 16}), run, data=small_world)
    assert manifest(run)["status"] == "running"
    monkeypatch.undo()
    # the corrected command (a smaller batch) trains, and the manifest is its own
    r = fit_folds(kfold(**{"aug.crop_size": 64, "batch_size": 4}), run, data=small_world)
    assert r.status == "completed"
    assert manifest(run)["status"] == "completed" and manifest(run)["config"]["batch_size"] == 4


@pytest.fixture
def holder():
    """Holds a lock file from another process (as a running fit does) until the test ends."""
    procs = []

    def hold(path):
        cmd = [sys.executable, "-c", HOLD, str(path)]
        p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout.readline().strip() == "held"

    yield hold
    for p in procs:
        p.stdin.close()
        p.wait(timeout=30)


def test_a_fold_training_now_keeps_its_manifest(small_world, tmp_path, monkeypatch, holder):
    # --fold 0 of one config in its first epoch (no checkpoint yet) and --fold 1 of another
    # started beside it: the second must not take the run over.
    run = tmp_path / "run"
    fail_in_first_epoch(monkeypatch)
    with pytest.raises(OutOfMemory):
        fit_folds(kfold(**{"aug.crop_size": 64}), run, data=small_world, only=0)
    monkeypatch.undo()
    before = (run / "folds.json").read_bytes()
    (run / "fold0").mkdir()
    holder(run / "fold0" / RUN_LOCK_FILE)
    with pytest.raises(ValueError, match=r"different config \(aug.crop_size: 64 -> 32\)"):
        fit_folds(kfold(**{"aug.crop_size": 32}), run, data=small_world, only=1)
    assert (run / "folds.json").read_bytes() == before and not (run / "fold1").exists()

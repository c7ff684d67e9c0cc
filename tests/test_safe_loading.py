"""Checkpoints load without unpickling objects; ensemble specs name missing members."""

import json
import random

import numpy as np
import pytest
import torch

from bldseg.predict import EnsembleSpec, load_checkpoint
from bldseg.train import engine
from bldseg.train.config import RunConfig
from bldseg.train.engine import fit, load_state

BASE = {
    "aug.crop_size": 64,
    "batch_size": 8,
    "val_fraction": 0.25,
    "samples_per_epoch": 16,
    "impl": "compiled",
}


class Payload:
    """Unpickling this creates the file ``path``: what a hostile checkpoint could do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _hostile(path, marker, **entries):
    torch.save({**entries, "extra": Payload(marker)}, path)
    assert not marker.exists()
    return path


def test_load_checkpoint_refuses_pickled_objects(tmp_path):
    marker = tmp_path / "created_by_unpickling"
    cfg = RunConfig.from_flat(BASE).to_flat()
    path = _hostile(tmp_path / "best.pt", marker, config=cfg, model={}, epoch=1)
    with pytest.raises(ValueError, match=r"best\.pt holds a pickled .*open.*will not be unpickled"):
        load_checkpoint(path)
    assert not marker.exists()


def test_resume_refuses_pickled_objects(small_world, tmp_path):
    marker = tmp_path / "created_by_unpickling"
    cfg = RunConfig.from_flat({**BASE, "epochs": 1})
    run = tmp_path / "run"
    run.mkdir()
    _hostile(run / "last.pt", marker, config=cfg.to_flat(), epoch=0)
    with pytest.raises(ValueError, match=r"last\.pt holds a pickled .*will not be unpickled"):
        fit(cfg, run, data=small_world, resume=True)
    assert not marker.exists()


def test_not_a_checkpoint_is_named(tmp_path):
    path = tmp_path / "best.pt"
    path.touch()
    with pytest.raises(ValueError, match=r"best\.pt is not a readable PyTorch checkpoint"):
        load_checkpoint(path)


def test_fit_writes_only_tensors_and_plain_data(small_world, tmp_path):
    cfg = RunConfig.from_flat({**BASE, "epochs": 1})
    fit(cfg, tmp_path, data=small_world, resume=False)
    for name in ("best.pt", "last.pt"):
        # weights_only=True is what loads them; _check_plain is what they were written under
        engine._check_plain(torch.load(tmp_path / name, weights_only=True), name)


def test_rng_state_round_trips_through_a_safe_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)  # noqa: NPY002  (the global state fit saves)
    torch.manual_seed(3)
    np.random.standard_normal()  # noqa: NPY002  (leaves a cached gaussian in the state)
    engine._save_atomic({"rng": engine._rng_state()}, tmp_path / "rng.pt")
    expected = (random.random(), np.random.random(4), torch.rand(4))  # noqa: NPY002
    random.seed(9)
    np.random.seed(9)  # noqa: NPY002
    torch.manual_seed(9)
    engine._set_rng_state(load_state(tmp_path / "rng.pt")["rng"])
    got = (random.random(), np.random.random(4), torch.rand(4))  # noqa: NPY002
    assert got[0] == expected[0]
    np.testing.assert_array_equal(got[1], expected[1])
    assert torch.equal(got[2], expected[2])


def test_saving_a_non_plain_value_names_it(tmp_path):
    with pytest.raises(TypeError, match=r"last\.pt\['metrics'\]\['lr'\] is a numpy\.float64"):
        engine._save_atomic({"metrics": {"lr": np.float64(0.1)}}, tmp_path / "last.pt")
    assert not (tmp_path / "last.pt").exists() and not (tmp_path / "last.pt.tmp").exists()


def test_ensemble_spec_names_a_missing_member(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "best.pt").touch()
    spec = tmp_path / "best_ensemble.json"
    members = [{"checkpoint": "a/best.pt"}, {"checkpoint": "b/best.pt", "weight": 2.0}]
    spec.write_text(json.dumps({"members": members, "threshold": 0.4}))
    with pytest.raises(FileNotFoundError) as err:
        EnsembleSpec.load(spec)
    message = str(err.value)
    assert str(spec) in message and str(tmp_path / "b" / "best.pt") in message
    assert "member 1" in message

    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "best.pt").touch()
    loaded = EnsembleSpec.load(spec)
    assert loaded.checkpoints == [str(tmp_path / m / "best.pt") for m in "ab"]
    assert loaded.weights == [1.0, 2.0] and loaded.threshold == 0.4


def test_ensemble_spec_member_without_checkpoint(tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"members": [{"weight": 1.0}]}))
    with pytest.raises(ValueError, match=r"spec\.json: member 0 has no 'checkpoint' entry"):
        EnsembleSpec.load(spec)


@pytest.mark.parametrize(
    "content, says",
    [
        # not "(KeyError: 106)" or "(EOFError: )": torch's bare key says nothing to a user
        (b"junk\n", r"not a readable PyTorch checkpoint \(torch.load could not unpickle it\)"),
        (b"", r"not a readable PyTorch checkpoint \(torch.load could not unpickle it\)"),
        (bytes(range(256)) * 8, "not a readable PyTorch checkpoint"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n", "Git LFS pointer"),
        (b"<!DOCTYPE html><html><body>login</body></html>", "web page"),
    ],
)
def test_a_file_that_is_no_checkpoint_is_named(tmp_path, content, says):
    # torch's readers fail on foreign bytes with a KeyError naming no file, and call a text
    # file "pickled objects"
    path = tmp_path / "best.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"best\.pt .*{says}"):
        load_state(path)


@pytest.mark.parametrize("mmap", [False, True])
def test_a_truncated_checkpoint_is_named(tmp_path, mmap):
    # torch's zip reader fails on files cut at some lengths with OSError(22, 'Invalid
    # argument') that names no file: it was re-raised as "a missing file says so itself"
    whole = tmp_path / "whole.pt"
    torch.save({"model": {"w": torch.zeros(64, 64)}, "config": {}}, whole)
    data = whole.read_bytes()
    path = tmp_path / "best.pt"
    for cut in (len(data) // 4, len(data) // 2):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=r"best\.pt is not a readable PyTorch checkpoint"):
            load_state(path, mmap=mmap)
    # an OSError that names its file still says so itself
    with pytest.raises(FileNotFoundError) as err:
        load_state(tmp_path / "missing.pt", mmap=mmap)
    assert err.value.filename == str(tmp_path / "missing.pt")


def test_a_checkpoint_damaged_inside_a_tensor_is_refused(tmp_path):
    # torch.load does not check the archive's checksums: predict and resume used damaged weights
    w = torch.arange(4096, dtype=torch.float32)
    path = tmp_path / "best.pt"
    torch.save({"model": {"w": w}, "config": {}}, path)
    data = bytearray(path.read_bytes())
    at = bytes(data).find(w.numpy().tobytes()[:64])
    data[at + 200 : at + 208] = bytes(8)
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"best\.pt is damaged: the checksum of its member"):
        load_state(path)
    assert load_state(path, mmap=True)["config"] == {}  # metadata reads do not read the tensors

"""What a search's specs name and where its outputs go: one checkpoint per model, each spec's
TTA from its own members, an unusable --out or an unreachable Ray head refused before Ray
starts (bldseg.ensemble.library, bldseg.ensemble.run, bldseg.commands.ensemble)."""

import shutil
import socket
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from bldseg.commands import ensemble as ensemble_cmd
from bldseg.ensemble.library import find_runs, load_library
from bldseg.ensemble.run import SearchConfig, run_search
from bldseg.ensemble.synthetic import fake_library, write_runs
from bldseg.predict import EnsembleSpec, member_config
from bldseg.train.config import RunConfig
from tests.conftest import free_port


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Four tiny run folders, each holding val_probs.npz and a best.pt stand-in."""
    root = tmp_path_factory.mktemp("ens_members")
    write_runs(fake_library(4, 16, 16, seed=7, tiles_per_image=2), root / "results")
    return root / "results"


class _RayStarted(Exception):
    """Raised by the stand-in for init_ray: the command got as far as starting Ray."""


@pytest.fixture
def ray_calls(monkeypatch):
    """Addresses ray.init was called with (through bldseg's init_ray and its checks); the call
    stops the command there."""
    import ray

    calls = []

    def fake_ray_init(address=None, **kwargs):
        calls.append(address)
        raise _RayStarted(address)

    monkeypatch.setattr(ray, "init", fake_ray_init)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return calls


def _flat(runs: Path, tmp_path: Path, test_file: bool = False) -> list[Path]:
    """The runs' npz files copied into one folder, next to one best.pt."""
    flat = tmp_path / "flat"
    flat.mkdir()
    npz = []
    for m, run in enumerate(find_runs(runs)):
        npz.append(shutil.copy(run / "val_probs.npz", flat / f"m{m}.npz"))
    (flat / "best.pt").touch()
    if test_file:
        shutil.copy(npz[0], flat / "test_probs.npz")
    return [Path(f) for f in npz]


# --- 1. one checkpoint per model ---------------------------------------------------------


def test_npz_files_of_one_folder_are_refused_naming_both(runs, tmp_path):
    # each would predict with the folder's one best.pt: the spec listed it k times and
    # predict ran one model k times
    npz = _flat(runs, tmp_path)
    with pytest.raises(ValueError) as exc:
        load_library(npz)
    msg = str(exc.value)
    assert f"models {npz[0]} and {npz[1]} lie in one folder" in msg
    assert str(tmp_path / "flat" / "best.pt") in msg
    assert "pass each model's own run folder" in msg


@pytest.mark.parametrize("test_file", [False, True], ids=["val only", "with test_probs.npz"])
def test_cli_refuses_npz_files_sharing_a_checkpoint(runs, tmp_path, capsys, test_file):
    # with a test_probs.npz in the folder, the message was "model(s) given more than once:
    # [.../test_probs.npz]", which named neither the cause nor the fix
    npz = _flat(runs, tmp_path, test_file=test_file)
    out = tmp_path / "out"
    argv = ["--models", *map(str, npz), "-k", "2", "--workers", "0", "--no-progress"]
    assert ensemble_cmd.main([*argv, "--out", str(out)], prog="bldseg ensemble") == 2
    err = capsys.readouterr().err
    assert f"bldseg ensemble: error: models {npz[0]} and {npz[1]} lie in one folder" in err
    assert "more than once" not in err
    assert not (out / "submit.json").exists()


def test_npz_files_of_their_own_run_folders_load(runs):
    npz = [run / "val_probs.npz" for run in find_runs(runs)]
    lib = load_library(npz)
    assert [c.parent for c in lib.checkpoints] == [f.parent for f in npz]


# --- 2. each spec's TTA from its own members ---------------------------------------------


def _tta_runs(root: Path, flags: list[bool | None], worst: int | None = None) -> list[Path]:
    """Three or four runs whose best.pt says tta=flag (None: no best.pt at all); model
    ``worst`` predicts the inverse of the truth, so no search chooses it."""
    lib = fake_library(len(flags), 16, 16, seed=5, tiles_per_image=2)
    if worst is not None:
        lib.probs[worst] = np.where(lib.truth, 0, 255).astype(np.uint8)
    folders = write_runs(lib, root)
    for run, flag in zip(folders, flags, strict=True):
        if flag is None:
            (run / "best.pt").unlink()
        else:
            state = {"config": RunConfig(tta=flag).to_flat(), "model": {}, "metrics": {}}
            torch.save(state, run / "best.pt")
    return folders


def _spec_members(out: Path, folders: list[Path]) -> dict[str, list[int]]:
    """Spec file name -> its members' model indices."""
    index = {str((run / "best.pt").resolve()): m for m, run in enumerate(folders)}
    return {
        f.name: [index[str(Path(c).resolve())] for c in EnsembleSpec.load(f).checkpoints]
        for f in sorted(out.glob("*.json"))
        if f.name != "summary.json"
    }


def test_fake_runs_hold_the_run_config_the_search_reads(tmp_path):
    # the fakes' best.pt were empty files: every chosen member was warned about ("cannot read
    # its run config") and every spec predicted without TTA, whatever the runs validated with
    lib = fake_library(3, 8, 16, seed=5, tiles_per_image=2)
    folders = write_runs(lib, tmp_path / "runs", config=RunConfig(tta=True))
    # a test library written beside keeps the checkpoints, and their config
    write_runs(lib, tmp_path / "runs", file_name="test_probs.npz")
    assert all(member_config(run)[0].tta for run in folders)
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        run_search(SearchConfig(runs=str(tmp_path / "runs"), k=[2], out=str(out), progress=False))
    for name in ("best_ensemble.json", "best_single.json", "submit.json"):
        assert EnsembleSpec.load(out / name).tta is True, name
    plain = write_runs(lib, tmp_path / "plain")
    assert [member_config(run)[0].tta for run in plain] == [False] * 3


def test_an_unchosen_runs_missing_checkpoint_leaves_the_specs_tta(tmp_path):
    # every chosen member validated with TTA: the specs said "tta": false because an unchosen
    # run had no best.pt (and a fourth validated without TTA)
    folders = _tta_runs(tmp_path / "runs", [True, True, True, None], worst=3)
    out = tmp_path / "out"
    cfg = SearchConfig(
        runs=str(tmp_path / "runs"), k=[2], out=str(out), progress=False, rules=["mean", "vote"]
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_search(cfg)
    members = _spec_members(out, folders)
    assert "best_ensemble_vote.json" in members and "submit.json" in members
    assert all(3 not in m for m in members.values()), members  # the test's premise
    for name in members:
        assert EnsembleSpec.load(out / name).tta is True, name
    assert not [w for w in caught if "flip TTA" in str(w.message)]


def test_a_chosen_member_without_a_readable_config_is_warned_by_file(tmp_path):
    # it fell back to "tta": false for the whole library without a word
    folders = _tta_runs(tmp_path / "runs", [True, True])
    (folders[1] / "best.pt").write_bytes(b"not a checkpoint")
    out = tmp_path / "out"
    cfg = SearchConfig(runs=str(tmp_path / "runs"), k=[2], out=str(out), progress=False)
    with pytest.warns(UserWarning, match="cannot read its run config") as caught:
        run_search(cfg)
    unread = [str(w.message) for w in caught if "cannot read its run config" in str(w.message)]
    assert len(unread) == 1  # once per file, however many specs hold it
    assert "'trial_model01'" in unread[0] and str(folders[1] / "best.pt") in unread[0]
    assert 'set "tta": true there' in unread[0]
    for name, m in _spec_members(out, folders).items():
        # the unreadable one without TTA, the other as it validated
        assert EnsembleSpec.load(out / name).member_ttas() == [i == 0 for i in m], name


def test_each_spec_predicts_each_member_with_tta_as_it_validated(tmp_path):
    # a library mixing both: a spec mixing both predicted all its members without TTA (with a
    # warning), so the TTA-validated member's maps were not those the search had scored
    flags = [True, False, True]
    folders = _tta_runs(tmp_path / "runs", flags)
    out = tmp_path / "out"
    cfg = SearchConfig(runs=str(tmp_path / "runs"), k=[3], out=str(out), progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_search(cfg)
    members = _spec_members(out, folders)
    assert any(len({flags[i] for i in m}) > 1 for m in members.values())  # the test's premise
    for name, m in members.items():
        spec = EnsembleSpec.load(out / name)
        assert spec.member_ttas() == [flags[i] for i in m], name
        assert spec.tta is all(flags[i] for i in m), name  # what older bldseg versions read
    assert not [w for w in caught if "TTA" in str(w.message)]


def test_a_mixed_tta_ensemble_predicts_the_maps_the_search_scored(tmp_path, monkeypatch):
    # The spec said "tta": false for the whole ensemble: predict ran the TTA-validated member
    # without TTA, and the warning's --tta would have run the other member with it.
    import bldseg.predict as P

    flags = [True, False]
    _tta_runs(tmp_path / "runs", flags)
    out = tmp_path / "out"
    run_search(SearchConfig(runs=str(tmp_path / "runs"), k=[2], out=str(out), progress=False))
    spec = EnsembleSpec.load(out / "best_ensemble.json")
    lib = load_library(find_runs(tmp_path / "runs"), root=tmp_path / "runs")
    ckpts = [str(c.resolve()) for c in lib.checkpoints]
    assert spec.checkpoints == ckpts  # both members, in the library's order
    # A stand-in network per model: its validation maps when predicted with the TTA its run
    # validated with, other maps (the inverse) when predicted otherwise.
    maps = {}
    for m, ckpt in enumerate(ckpts):
        maps[ckpt, flags[m]] = lib.probs[m]  # (T, S, S) uint8
        maps[ckpt, not flags[m]] = 255 - lib.probs[m]

    class Tiles:
        image_size = lib.probs.shape[2:]

        def __len__(self) -> int:
            return lib.n_tiles

    monkeypatch.setattr(P, "image_loader", lambda cache, batch_size=16, indices=None: indices)
    monkeypatch.setattr(P, "load_member", lambda ckpt, device="cpu": (ckpt, RunConfig(), {}))
    monkeypatch.setattr(
        P, "predict_probs", lambda model, idx, dev, amp, tta, on_batch: maps[model, tta][list(idx)]
    )
    pred = P.predict_cache(spec, Tiles(), progress=False, chunk=5)
    np.testing.assert_array_equal(pred, P.combine_members(lib.probs, spec))


# --- 3. --out ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "reason"),
    [("file", "a file, not a folder"), ("under a file", "cannot create it (Not a directory")],
)
def test_an_unusable_out_is_refused_before_ray(runs, tmp_path, capsys, ray_calls, make, reason):
    # it was a FileExistsError / NotADirectoryError traceback (status 1), after Ray started
    afile = tmp_path / "afile"
    afile.write_text("x")
    out = afile if make == "file" else afile / "sub"
    argv = ["--runs", str(runs), "-k", "2", "--workers", "2", "--no-progress", "--out", str(out)]
    assert ensemble_cmd.main(argv, prog="bldseg ensemble") == 2
    assert f"bldseg ensemble: error: --out {out}: {reason}" in capsys.readouterr().err
    assert ray_calls == []
    assert afile.read_text() == "x"


def test_run_search_names_an_unusable_out(runs, tmp_path):
    afile = tmp_path / "afile"
    afile.touch()
    cfg = SearchConfig(runs=str(runs), k=[2], out=str(afile / "sub"), progress=False)
    with pytest.raises(ValueError, match=r"--out .*afile/sub: cannot create it"):
        run_search(cfg)


# --- 4. the Ray head and the flags checked before Ray ----------------------------------------


@pytest.mark.parametrize("source", ["--address", "RAY_ADDRESS"])
def test_an_unreachable_ray_head_is_refused_at_once(
    runs, tmp_path, capsys, monkeypatch, ray_calls, source
):
    # ray.init retried it for minutes
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    argv = ["--runs", str(runs), "-k", "2", "--no-progress", "--out", str(tmp_path / "out")]
    if source == "--address":
        argv += ["--address", address]
    else:
        monkeypatch.setenv("RAY_ADDRESS", address)
    assert ensemble_cmd.main(argv, prog="bldseg ensemble") == 2
    err = capsys.readouterr().err
    assert f"bldseg ensemble: error: {source} {address}: no Ray head answers there" in err
    assert ray_calls == []


@pytest.mark.parametrize("form", ["host:port", "auto"])
def test_a_listening_head_or_an_address_without_a_port_goes_to_ray(runs, tmp_path, ray_calls, form):
    with socket.socket() as head:
        head.bind(("127.0.0.1", 0))
        head.listen()
        address = f"127.0.0.1:{head.getsockname()[1]}" if form == "host:port" else "auto"
        argv = ["--runs", str(runs), "-k", "2", "--address", address, "--no-progress"]
        with pytest.raises(_RayStarted):
            ensemble_cmd.main([*argv, "--out", str(tmp_path / "out")])
    assert ray_calls == [address]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--k-range", "3", "2"], "--k-range 3 2: the sizes KMIN..KMAX need 1 <= KMIN <= KMAX"),
        (["--k-range", "0", "2"], "--k-range 0 2: the sizes KMIN..KMAX need 1 <= KMIN <= KMAX"),
        (["-k", "0"], "-k must be at least 1, got 0"),
        (["--workers", "-3"], "--workers must be 0 (no Ray) or more, got -3"),
    ],
)
def test_sizes_and_workers_are_checked_before_ray(
    runs, tmp_path, capsys, ray_calls, flags, message
):
    # --k-range 3 2 started Ray before it said "give at least one ensemble size k", and
    # --workers -3 was taken
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        ensemble_cmd.main(["--runs", str(runs), "--out", str(out), *flags], prog="bldseg ensemble")
    assert exc.value.code == 2
    assert f"bldseg ensemble: error: {message}" in capsys.readouterr().err
    assert ray_calls == []
    assert not out.exists()

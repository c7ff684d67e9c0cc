"""Runs whose status.json says the trial failed are no models of a library (bldseg.ensemble.library,
bldseg.commands.ensemble): a search's failed trials keep the best.pt and val_probs.npz of the
epochs they trained, and the search used them without a word."""

import json
import warnings

import pytest

from bldseg.commands import ensemble as ensemble_cmd
from bldseg.ensemble.library import (
    USABLE_STATUSES,
    find_runs,
    load_library,
    run_status,
    unusable_runs,
)
from bldseg.ensemble.run import SearchConfig, run_search
from bldseg.ensemble.synthetic import fake_library, write_runs

# model index -> what its status.json says (None: no status.json, e.g. an older version's run)
STATUSES = {0: "completed", 1: "error", 2: "early-stopped", 3: None, 4: "diverged", 5: "running"}
USABLE = ["trial_model00", "trial_model02", "trial_model03"]


def _status(run, status, **more):
    (run / "status.json").write_text(json.dumps({"status": status, "message": "m", **more}))


@pytest.fixture
def search(tmp_path):
    """A search's results folder: six models, three of them of trials that did not end well."""
    root = tmp_path / "results"
    runs = write_runs(fake_library(6, 24, 16, seed=3, tiles_per_image=2), root)
    for m, status in STATUSES.items():
        if status is not None:
            _status(runs[m], status, final=status != "running")
    return root


def _left_out_warnings(record):
    return [str(w.message) for w in record if "left out" in str(w.message)]


def test_find_runs_leaves_out_failed_runs_with_one_warning(search):
    with pytest.warns(UserWarning) as record:
        found = find_runs(search)
    assert [r.name for r in found] == USABLE  # sorted, as before
    (msg,) = _left_out_warnings(record)
    assert "left out 3 of the 6 run folders" in msg
    for name in ("trial_model01 (error)", "trial_model04 (diverged)", "trial_model05 (running)"):
        assert name in msg
    assert "--include-failed" in msg
    # the kept runs keep their names
    assert load_library(found, root=search).names == USABLE


def test_include_failed_takes_every_run_without_a_warning(search):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        found = find_runs(search, include_failed=True)
    assert [r.name for r in found] == [f"trial_model{m:02d}" for m in range(6)]


def test_no_usable_run_is_an_error_naming_each_and_why(tmp_path):
    root = tmp_path / "results"
    runs = write_runs(fake_library(3, 8, 8, seed=0), root)
    _status(runs[0], "error")
    _status(runs[1], "stopped")  # a K-fold run whose other folds were still to train
    (runs[2] / "status.json").write_text('{"status": "compl')  # cut off: says nothing
    with pytest.raises(FileNotFoundError) as exc:
        find_runs(root)
    msg = str(exc.value)
    assert "no usable model under" in msg and "each of its 3 run folder(s)" in msg
    assert "trial_model00 (error)" in msg and "trial_model01 (stopped)" in msg
    assert "trial_model02 (unreadable)" in msg and "--include-failed" in msg


def test_run_status_reads_a_run_folder_or_a_file_in_it(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "val_probs.npz").write_bytes(b"")
    assert run_status(run) is None  # no status.json: kept, as before
    assert run_status(tmp_path / "missing") is None
    _status(run, "early-stopped")
    assert run_status(run) == run_status(run / "val_probs.npz") == "early-stopped"
    (run / "status.json").write_text('["completed"]')
    assert run_status(run) == "unreadable"
    assert unusable_runs([run]) == [(run, "unreadable")]


def test_usable_statuses_are_the_tuners():
    from bldseg.tune.runner import USABLE as tuner_usable

    assert tuple(USABLE_STATUSES) == tuple(tuner_usable)


def test_search_over_a_results_folder_takes_only_usable_models(search, tmp_path):
    # the pipeline's call: run_search(SearchConfig(runs=<storage>))
    out = tmp_path / "ens"
    cfg = SearchConfig(runs=str(search), k=[2], workers=0, out=str(out), progress=False)
    with pytest.warns(UserWarning, match="left out 3 of the 6"):
        s = run_search(cfg)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_models"] == 3
    members = [m for row in (s.best, s.best_single) for m in row["members"].split("+")]
    assert set(members) <= set(USABLE)


def _cli(argv, out):
    return ensemble_cmd.main(
        [*argv, "-k", "1", "--workers", "0", "--no-progress", "--out", str(out)],
        prog="bldseg ensemble",
    )


def test_cli_leaves_failed_runs_out_and_warns_once(search, tmp_path, recwarn):
    out = tmp_path / "out"
    assert _cli(["--runs", str(search)], out) == 0
    assert len(_left_out_warnings(recwarn)) == 1  # not once more for the check before Ray
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_models"] == 3
    submit = json.loads((out / "submit.json").read_text())
    assert all("model01" not in m["checkpoint"] for m in submit["members"])


def test_cli_without_a_usable_run_fails_before_the_search(tmp_path, capsys):
    root = tmp_path / "results"
    for run in write_runs(fake_library(2, 8, 8, seed=0), root):
        _status(run, "error", final=True)
    out = tmp_path / "out"
    assert _cli(["--runs", str(root)], out) == 2
    err = capsys.readouterr().err
    assert "bldseg ensemble: error: no usable model under" in err
    assert "trial_model00 (error): m; trial_model01 (error): m" in err  # why each failed
    assert not out.exists()


def test_trials_that_all_failed_before_validating_are_named_with_why(tmp_path, capsys):
    # every trial failed before its first validation (no val_probs.npz anywhere): the error
    # said only that no run folder held one, though each status.json said why
    root = tmp_path / "allfail"
    reasons = {
        "trial_a": ("error", "RuntimeError: CUDA out of memory\nTraceback (most recent call last)"),
        "trial_b": ("diverged", "the loss became non-finite at epoch 1"),
    }
    for trial, (status, message) in reasons.items():
        (root / trial / "run").mkdir(parents=True)
        _status(root / trial / "run", status, message=message, final=True)
    (root / "trial_c" / "run").mkdir(parents=True)
    _status(root / "trial_c" / "run", "running", final=False)  # still going: not a reason
    out = tmp_path / "out"
    assert _cli(["--runs", str(root)], out) == 2
    err = capsys.readouterr().err
    assert f"no run folder under {root} holds val_probs.npz: the status.json of 2 run" in err
    assert "trial_a/run (error): RuntimeError: CUDA out of memory; " in err  # its first line
    assert "trial_b/run (diverged): the loss became non-finite at epoch 1" in err
    assert "trial_c" not in err and "Traceback" not in err
    assert not out.exists()
    # a folder of no search at all keeps the message that says where to point --runs
    (tmp_path / "empty").mkdir()
    assert _cli(["--runs", str(tmp_path / "empty")], out) == 2
    assert "point --runs at a search's results folder" in capsys.readouterr().err


def test_cli_include_failed_takes_them_and_says_so(search, tmp_path, capsys):
    out = tmp_path / "out"
    assert _cli(["--runs", str(search), "--include-failed"], out) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_models"] == 6 and summary["config"]["runs"] == str(search)
    assert summary["config"]["include_failed"] is True and summary["config"]["models"] == []
    err = capsys.readouterr().err
    assert "bldseg ensemble: warning: 3 of the 6 models did not complete" in err
    assert "trial_model01 (error)" in err and "--include-failed" in err


def test_cli_keeps_failed_models_given_by_name_with_a_warning(search, tmp_path, capsys):
    out = tmp_path / "out"
    models = [str(search / "trial_model00"), str(search / "trial_model01" / "val_probs.npz")]
    assert _cli(["--models", *models], out) == 0
    assert json.loads((out / "summary.json").read_text())["n_models"] == 2
    err = capsys.readouterr().err
    assert "warning: 1 of the 2 models did not complete" in err
    assert f"{models[1]} (error)" in err and "trial_model00" not in err


def test_cli_refuses_include_failed_with_models(search, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        _cli(["--models", str(search / "trial_model00"), "--include-failed"], tmp_path / "o")
    assert exc.value.code == 2
    assert "--include-failed takes the failed runs found under --runs" in capsys.readouterr().err

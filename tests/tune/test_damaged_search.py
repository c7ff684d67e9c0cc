"""A search whose saved files are damaged (truncated by a full disk, a copy cut short): a resume
or a --from names the file and exits 2; nothing but Ctrl-C (or SIGTERM) makes a search exit
130."""

import json
import os
import shutil
import signal
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from bldseg.data.prepare import DataOptions
from bldseg.tune import runner
from bldseg.tune.runner import META_FILE, run_search
from tests.tune.test_resumed_search import _fail_if_reached
from tests.tune.test_runner import spec_for


@pytest.fixture(scope="module")
def finished(small_world, ray_session, tmp_path_factory):
    """A finished search of 2 one-epoch trials (each test puts back what it damages)."""
    tmp = tmp_path_factory.mktemp("damaged")
    spec = spec_for(small_world, tmp, name="half", trials=2, epochs=1, max_concurrent=1)
    result = run_search(spec)
    assert result.n_completed == 2
    return spec


def _resume(spec, capsys) -> tuple[int, str]:
    """``bldseg tune aug --resume`` of ``spec``'s search: its exit status and stderr."""
    from bldseg.commands.tune import main

    argv = ["--resume", "--name", spec.name, "--storage", spec.storage]
    status = main("aug", argv)
    return status, capsys.readouterr().err


@pytest.mark.parametrize(
    "damaged",
    [
        "searcher-state-*.pkl",
        "experiment_state-*.json",
        "search_gen_state-*.json",
        "tuner.pkl",
    ],
)
def test_a_resume_with_damaged_tune_state_is_refused_naming_the_file(
    finished, damaged, monkeypatch, capsys
):
    # Tune, failing to read its experiment or searcher state, started the search again from
    # nothing: one new trial, the finished ones dropped, exit 130 "interrupted" at every
    # resume. An unreadable tuner.pkl ended in a traceback, the record rewritten first.
    exp_dir = Path(finished.storage) / finished.name
    (path,) = sorted(exp_dir.glob(damaged))
    kept, record = path.read_bytes(), (exp_dir / META_FILE).read_bytes()
    table = exp_dir / "trials.csv"
    path.write_bytes(kept[:50])
    _fail_if_reached(monkeypatch)  # refused before the tracking store, Ray or the data
    try:
        status, err = _resume(finished, capsys)
        assert status == 2 and "Traceback" not in err, err
        (line,) = err.strip().splitlines()
        assert line.startswith("error: --resume half: Ray Tune's saved state of the search is ")
        assert f"{path} cannot be read (" in line
        assert "without its 2 trial(s), so it cannot be continued" in line
        assert f"run folders are kept ({exp_dir}/trial_*/run)" in line
        assert "start a new search (another --name)" in line
        # a finished search has its trial table: a new one can start from its best trial
        assert line.endswith(f"(--from {exp_dir})")
        assert (exp_dir / META_FILE).read_bytes() == record  # nothing rewritten
        # killed before its trial table was written: no --from to offer
        table.rename(table.with_suffix(".kept"))
        status, err = _resume(finished, capsys)
        assert status == 2 and err.strip().endswith("start a new search (another --name)"), err
    finally:
        path.write_bytes(kept)
        if table.with_suffix(".kept").exists():
            table.with_suffix(".kept").rename(table)


@pytest.mark.parametrize(
    "damaged", ["experiment_state-*.json", "search_gen_state-*.json", "searcher-state-*.pkl"]
)
def test_the_newest_of_tunes_state_files_is_checked(finished, damaged, tmp_path):
    # Each session (the first, every resume) saves its own state files, stamped with its start;
    # Tune reads the newest. A damaged newest one beside an intact older one is refused too.
    exp_dir = tmp_path / finished.name
    shutil.copytree(Path(finished.storage) / finished.name, exp_dir)
    (newest,) = exp_dir.glob(damaged)
    older = exp_dir / damaged.replace("*", "2000-01-01_00-00-00")  # an earlier session's
    shutil.copyfile(newest, older)
    newest.write_bytes(newest.read_bytes()[:50])
    with pytest.raises(ValueError, match="saved state of the search is damaged") as e:
        runner.check_resumed_state(exp_dir)
    assert f"{newest} cannot be read (" in str(e.value)
    assert str(older) not in str(e.value)
    # the other way round: an earlier session's damaged file is not Tune's to read
    newest.write_bytes(older.read_bytes())
    older.write_bytes(b"")
    runner.check_resumed_state(exp_dir)


def test_a_resume_without_tunes_state_is_refused(finished, monkeypatch, tmp_path):
    # without tuner.pkl Tune cannot restore, and a new Tuner started the search again beside
    # its trials; without an experiment state Tune restarts it too
    exp_dir = Path(finished.storage) / finished.name
    _fail_if_reached(monkeypatch)
    for name in ("tuner.pkl", "experiment_state-*.json"):
        (path,) = exp_dir.glob(name)
        shutil.move(path, tmp_path / path.name)
        try:
            with pytest.raises(ValueError, match="saved state of the search is damaged") as e:
                run_search(replace(finished, resume=True))
            assert f"{exp_dir / name} is missing" in str(e.value)
        finally:
            shutil.move(tmp_path / path.name, path)


def _damaged_record(tmp_path) -> Path:
    exp_dir = tmp_path / "runs" / "hc1"
    exp_dir.mkdir(parents=True)
    whole = json.dumps({"base": {"data": None}, "spec": {"space": "augmentation"}}, indent=1)
    (exp_dir / META_FILE).write_text(whole[:30])
    return exp_dir / META_FILE


def test_a_damaged_search_record_is_named(small_world, tmp_path, monkeypatch, capsys):
    # json's error alone ("Unterminated string starting at: line 4 column 17") named no file
    from bldseg.commands.tune import main

    record = _damaged_record(tmp_path)
    _fail_if_reached(monkeypatch)
    spec = spec_for(small_world, tmp_path, resume=True)
    with pytest.raises(ValueError, match="is damaged") as e:
        run_search(replace(spec, name="hc1"))
    assert str(e.value).startswith(f"{record} is damaged (")
    assert "put back a copy of it" in str(e.value)
    # the latest of the space: the damaged one may be it, so it is not guessed past
    with pytest.raises(ValueError, match="looks for the latest augmentation search") as e:
        run_search(spec)
    assert f"{record} is damaged (" in str(e.value) and "Pass --name" in str(e.value)
    storage = str(tmp_path / "runs")
    with pytest.raises(SystemExit) as e:  # argparse's error, as every --from refusal
        main("sched", ["--from", "hc1", "--storage", storage])
    err = " ".join(capsys.readouterr().err.split())
    assert e.value.code == 2 and f"error: --from hc1: {record} is damaged (" in err, err
    # valid JSON, but no record
    record.write_text("[]")
    with pytest.raises(ValueError, match=f"{record} is damaged: it is the search's record"):
        run_search(replace(spec, name="hc1"))


def test_images_without_labels_are_refused_before_the_tracking_store(small_world, tmp_path):
    # the tracking store was opened first: mlflow.db and its lock were left in the current
    # folder by a command that refused its data
    images = tmp_path / "photos"
    images.mkdir()
    spec = spec_for(small_world, tmp_path, name="nolabels", data=None)
    spec = replace(spec, data_options=DataOptions(images=str(images)))
    with pytest.raises(FileNotFoundError, match=f"{images}: no labels for training"):
        run_search(spec)
    assert not list(tmp_path.glob("mlflow.db*"))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        run_search(replace(spec, data=str(tmp_path / "nowhere"), data_options=DataOptions()))
    assert not list(tmp_path.glob("mlflow.db*"))


def _driver(caught: bool, unfinished, created: int):
    return SimpleNamespace(
        sigint=SimpleNamespace(caught=caught), unfinished=unfinished, n_trials=created
    )


def test_only_a_signal_makes_a_search_interrupted():
    # Tune ending with fewer trials than asked (it restarted a search it could not restore)
    # was taken for Ctrl-C: exit 130, and every --resume ended alike, training nothing
    grid = SimpleNamespace(num_terminated=1, num_errors=0)
    assert not runner._interrupted(_driver(False, [], 1), grid, 2)
    assert not runner._interrupted(_driver(False, ["a"], 2), grid, 2)
    assert runner._interrupted(_driver(True, [], 1), grid, 2)
    assert runner._interrupted(_driver(True, ["a"], 2), grid, 2)
    assert not runner._interrupted(_driver(True, [], 2), grid, 2)  # Ctrl-C after the end


def test_ctrl_c_while_tune_restores_counts(monkeypatch):
    # Tune's handler is in place from the start of fit(); the callback wraps it only at
    # setup(), after the restore: a Ctrl-C in between put the handler from before back
    sigint = runner._TuneSigint()
    monkeypatch.delenv("TUNE_DISABLE_SIGINT_HANDLER", raising=False)
    with sigint.around_fit():
        sigint.wrap_tunes_handler()  # the handler from before is in place: Tune's has fired
    assert sigint.caught
    # with Tune's handler disabled, the one from before is in place all along
    monkeypatch.setenv("TUNE_DISABLE_SIGINT_HANDLER", "1")
    sigint = runner._TuneSigint()
    with sigint.around_fit():
        sigint.wrap_tunes_handler()
    assert not sigint.caught
    # Tune's handler in place: wrapped, no signal yet
    monkeypatch.delenv("TUNE_DISABLE_SIGINT_HANDLER")
    sigint = runner._TuneSigint()
    with sigint.around_fit():
        signal.signal(signal.SIGINT, lambda *a: None)
        sigint.wrap_tunes_handler()
    assert not sigint.caught


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="no SIGUSR1 (Windows)")
@pytest.mark.parametrize("disabled", ["0", "1"])
def test_sigusr1_while_tune_restores_counts(disabled, monkeypatch):
    # With TUNE_DISABLE_SIGINT_HANDLER=1 the SIGINT handler from before is in place all along,
    # and a SIGUSR1 (kill -USR1, Slurm's --signal=USR1@...) during the restore went unnoticed:
    # Tune ended the loop, the search was recorded finished with exit 0 and a false "--resume
    # would train no other" warning.
    import time

    from ray.tune.tune import _setup_signal_catching

    monkeypatch.setenv("TUNE_DISABLE_SIGINT_HANDLER", disabled)
    sigint = runner._TuneSigint()
    with sigint.around_fit():
        stops = _setup_signal_catching()  # what Tune's fit() does first
        os.kill(os.getpid(), signal.SIGUSR1)  # during the restore
        deadline = time.monotonic() + 5
        while not stops.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stops.is_set()  # Tune ends the loop
        sigint.wrap_tunes_handler()  # the callback's setup()
    assert sigint.caught
    # no signal: Tune's handlers are wrapped, nothing caught
    sigint = runner._TuneSigint()
    with sigint.around_fit():
        _setup_signal_catching()
        sigint.wrap_tunes_handler()
    assert not sigint.caught


def test_a_search_tune_restarts_is_not_interrupted(finished, monkeypatch, caplog):
    # What the refusal above prevents, let through: Tune cannot read its searcher state and
    # starts the search again. Nobody pressed Ctrl-C: no SearchInterrupted (exit 130), whose
    # message sent the user to a --resume that ended alike. Last: it replaces the state.
    exp_dir = Path(finished.storage) / finished.name
    (path,) = exp_dir.glob("searcher-state-*.pkl")
    path.write_bytes(path.read_bytes()[:50])
    monkeypatch.setattr(runner, "check_resumed_state", lambda exp_dir: None, raising=False)
    with caplog.at_level("WARNING", logger="bldseg.tune.runner"):
        result = run_search(replace(finished, resume=True))
    assert result.name == "half"
    (said,) = [r.getMessage() for r in caplog.records if "though it was not" in r.getMessage()]
    assert said.startswith("Ray Tune ended search half when ")


def test_the_latest_search_is_found_past_an_older_damaged_record(tmp_path):
    # another search's damaged record refused `--resume` without --name, naming that file as
    # if it were the search being resumed
    from bldseg.tune.runner import _latest

    storage = tmp_path / "runs"
    for name, text in (("old", '{"spec": {"space": "sch'), ("mine", '{"spec": {"space": "x"}}')):
        (storage / name).mkdir(parents=True)
        (storage / name / META_FILE).write_text(text)
    os.utime(storage / "old" / META_FILE, (1_000_000, 1_000_000))  # the older one
    assert _latest(storage, "x") == storage / "mine"
    os.utime(storage / "old" / META_FILE)  # now the newer: it may be the latest x search
    with pytest.raises(ValueError, match=r"old/bldseg_search\.json is damaged.*Pass --name"):
        _latest(storage, "x")

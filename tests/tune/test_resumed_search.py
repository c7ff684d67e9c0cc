"""A resumed search is one search: its wall time over every session, its one MLflow store."""

import json
import shlex
from dataclasses import replace
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from bldseg.data import readers
from bldseg.data.prepare import prepare_data
from bldseg.tune import runner
from bldseg.tune.runner import META_FILE, SearchInterrupted, run_search
from tests.tune.test_runner import spec_for


def interrupted_search(spec, monkeypatch) -> dict:
    """Runs ``spec`` to the end of its trials, then ends the session as Ctrl-C does (Tune's
    SIGINT handler cannot be sent in-process); returns the search's record."""
    with monkeypatch.context() as m:
        m.setattr(runner, "_interrupted", lambda *a: True)
        with pytest.raises(SearchInterrupted, match="--resume --name"):
            run_search(spec)
    return json.loads((Path(spec.storage) / spec.name / META_FILE).read_text())


def parent_metrics(uri: str, name: str) -> dict[str, float]:
    client = MlflowClient(uri)
    exp_id = client.get_experiment_by_name("bldseg").experiment_id
    (parent,) = client.search_runs([exp_id], f"tags.`bldseg.search` = '{name}'")
    return parent.data.metrics


def test_resumed_search_reports_the_wall_time_of_every_session(
    small_world, ray_session, tmp_path, monkeypatch
):
    # The epochs of the session before Ctrl-C are in train_s: the wall time must hold that
    # session too (it counted only the resume's, and the overhead came out as 0% or negative).
    spec = spec_for(small_world, tmp_path, name="twice", trials=1, epochs=1)
    record = interrupted_search(spec, monkeypatch)
    (first,) = record["sessions"]
    assert first["end"] == "interrupted" and first["wall_s"] > 0

    result = run_search(replace(spec, resume=True))
    sessions = json.loads((result.path / META_FILE).read_text())["sessions"]
    assert [s["end"] for s in sessions] == ["interrupted", "finished"]
    assert result.sessions == 2
    assert result.wall_s == pytest.approx(sum(s["wall_s"] for s in sessions))
    assert result.wall_s > first["wall_s"] >= result.train_s > 0
    assert 0 < result.overhead < 1
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    metrics = parent_metrics(uri, "twice")
    assert metrics["wall_s"] == pytest.approx(result.wall_s, rel=1e-5)
    assert metrics["sessions"] == 2

    # A resume of the finished search trains nothing: the recorded figures stay as they were
    # (they were overwritten by the seconds of that resume alone).
    again = run_search(replace(spec, resume=True))
    assert (again.wall_s, again.sessions, again.slots) == (result.wall_s, 2, result.slots)
    assert again.overhead == pytest.approx(result.overhead)
    assert json.loads((result.path / META_FILE).read_text())["sessions"] == sessions
    assert parent_metrics(uri, "twice")["wall_s"] == pytest.approx(result.wall_s, rel=1e-5)


def half_failing_space(trial):
    """Every other trial fails as it starts (module level: Tune pickles the searcher)."""
    from tests.tune.test_exits import MISSING

    trial.suggest_float("aug.vflip_p", 0.0, 0.5)
    return [{}, {"pretrained": MISSING}][trial.number % 2]


def test_a_resume_of_a_finished_search_retries_its_errored_trials_and_says_so(
    small_world, ray_session, tmp_path, monkeypatch, capsys
):
    # Tune's resume_errored trains the trials that ended in an error again (a search whose
    # trials all failed, resumed, trained them again and exited 0) while the texts said a
    # resume of a finished search trains nothing: the resume now names the trials it retries.
    from bldseg import tune_spaces
    from tests.tune.test_exits import NOT_FOUND, tune_failures

    monkeypatch.setitem(tune_spaces.SPACES, "augmentation", half_failing_space)
    spec = spec_for(
        small_world, tmp_path, name="errs", trials=2, epochs=1, max_concurrent=1, search="random"
    )
    result = run_search(spec)
    status = dict(zip(result.table["trial_id"], result.table["status"], strict=True))
    assert sorted(status.values()) == ["completed", "error"]
    (failed,) = [t for t, s in status.items() if s == "error"]
    (done,) = [t for t, s in status.items() if s == "completed"]
    capsys.readouterr()

    again = run_search(replace(spec, resume=True))
    out = capsys.readouterr().out
    (said,) = [line for line in out.splitlines() if line.startswith("--resume: retrying")]
    assert said.startswith(
        f"--resume: retrying 1 trial(s) of search errs that ended in an error: trial {failed} ("
    )
    assert NOT_FOUND in said and done not in said
    # the errored trial ran (and failed) again; the completed one was left as it was
    assert tune_failures(result.path, failed) == 2
    assert dict(zip(again.table["trial_id"], again.table["status"], strict=True)) == status
    assert again.sessions == 2  # it trained: a session of its own


def test_resume_logs_to_the_searchs_recorded_mlflow_store(
    small_world, ray_session, tmp_path, monkeypatch
):
    # Resumed from another folder without --tracking-uri: the default would be that folder's
    # mlflow.db, a second store with a second parent run.
    spec = spec_for(small_world, tmp_path, name="moved", trials=1, epochs=1)
    record = interrupted_search(spec, monkeypatch)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert record["tracking_uri"] == uri
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    other = f"sqlite:///{elsewhere}/other.db"
    resumed = replace(spec, resume=True, project_dir=str(elsewhere))
    # another store named on the command line is refused, naming both
    with pytest.raises(ValueError, match="--resume: search moved logs to MLflow at ") as e:
        run_search(replace(resumed, tracking_uri=other))
    assert uri in str(e.value) and other in str(e.value)
    assert not (elsewhere / "other.db").exists()
    result = run_search(resumed)
    assert result.tracking_uri == uri and not (elsewhere / "mlflow.db").exists()
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("bldseg").experiment_id])
    assert len(runs) == 2  # the one parent run and its trial's
    # the recorded store, given again relative to the current folder, is the same store
    monkeypatch.chdir(elsewhere)
    again = run_search(replace(resumed, tracking_uri="sqlite:///../mlflow.db"))
    assert again.parent_run_id == result.parent_run_id


def test_resume_after_a_change_of_mask_decoding_says_so(ray_session, tmp_path, monkeypatch):
    # bldseg updated between the sessions decodes masks by newer rules: the rebuilt cache's
    # fingerprint differs from the recorded one. The resume is refused, blaming the update and
    # not the user's data. A world of its own: its cache is rebuilt by the "update".
    world = prepare_data(
        None,
        data_root=tmp_path / "world",
        synthetic=dict(n_train=8, train_size=64, n_test=2, test_size=32, test_scene_size=64),
        progress=False,
    )
    spec = spec_for(world, tmp_path, name="a1", trials=1, epochs=1)
    record = interrupted_search(spec, monkeypatch)
    assert record["decode_rules"] == readers.DECODE_RULES
    assert record["data_fingerprint"] == world.train.fingerprint

    assert record["data_content"] == world.train.content
    # Where the record has the content digest, it decides: a rules change that decodes the
    # same pixels continues (tests/train/test_resume_on_changed_data.py). A record of before
    # it was kept has only the fingerprint, which holds the rules: what this test is about.
    path = Path(spec.storage) / "a1" / META_FILE
    path.write_text(
        json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "data_content"})
    )

    # the built-in world's masks are RLE, which only the image rules reach (bumped with
    # DECODE_RULES whenever image decoding changes)
    monkeypatch.setattr(readers, "DECODE_RULES", readers.DECODE_RULES + 1)
    monkeypatch.setattr(readers, "IMAGE_RULES", readers.IMAGE_RULES + 1)
    with pytest.raises(ValueError) as e:
        run_search(replace(spec, resume=True))
    assert str(e.value) == (
        f"--resume a1: bldseg's image or mask decoding changed since this search started (rules "
        f"{readers.DECODE_RULES - 1} -> {readers.DECODE_RULES}: see "
        "bldseg.data.readers.DECODE_RULES); the cache is rebuilt and decoded differently, so "
        "the search cannot continue on it: start a new search (another --name)"
    )
    # a record written before the rules were kept: both causes named
    older = {k: v for k, v in json.loads(path.read_text()).items() if k != "decode_rules"}
    path.write_text(json.dumps(older))
    with pytest.raises(
        ValueError, match=r"started on \(or bldseg's image or mask decoding changed since\)"
    ):
        run_search(replace(spec, resume=True))


def _fail_if_reached(monkeypatch) -> None:
    """The MLflow store and Ray raise if a refused resume gets as far as them."""

    def reached(*a, **k):
        raise AssertionError("the resume went on to the tracking store or Ray")

    monkeypatch.setattr(runner.tracking, "check_tracking", reached)
    monkeypatch.setattr(runner, "init_ray", reached)


def test_resume_of_a_moved_search_folder_is_refused_before_ray(small_world, tmp_path, monkeypatch):
    # Tune's saved state holds the folder the search started in: restored from a moved folder,
    # its new trials failed to set up their storage, every one, and the search exited 0.
    started_in = tmp_path / "old place" / "runs" / "s"
    spec = spec_for(small_world, tmp_path, name="s", storage=str(tmp_path / "new place" / "runs"))
    exp_dir = Path(spec.storage) / "s"
    exp_dir.mkdir(parents=True)
    meta = {"path": str(started_in), "base": {"data": str(small_world.root)}, "spec": {}}
    (exp_dir / META_FILE).write_text(json.dumps(meta))
    _fail_if_reached(monkeypatch)
    with pytest.raises(ValueError, match="--resume s: the search started in ") as e:
        run_search(replace(spec, resume=True))
    message = str(e.value)
    assert f"started in {started_in}, not in {exp_dir};" in message
    assert "Ray Tune's saved state holds that path" in message and "move the folder back" in message
    # the command to copy links the highest folder that is gone (the whole storage moved), and
    # survives the spaces in both paths
    command = message.split("new place (")[1].split("), then resume")[0]
    assert shlex.split(command) == [
        "ln",
        "-s",
        str(tmp_path / "new place"),
        str(tmp_path / "old place"),
    ]

    # linked as the message says: the old path leads to the search, which may go on
    (tmp_path / "old place").symlink_to(tmp_path / "new place")
    runner.check_resumed_folder(exp_dir, meta)
    # a copy left at the old place is another folder: resume that one, or link it
    (tmp_path / "old place").unlink()
    started_in.mkdir(parents=True)
    with pytest.raises(ValueError, match="the search is still there: resume it there") as e:
        runner.check_resumed_folder(exp_dir, meta)
    assert shlex.quote(str(started_in.parent)) in str(e.value)
    # a record from before the folder was kept is not checked (as before)
    runner.check_resumed_folder(exp_dir, {"base": {}})


def test_a_resumed_search_is_recorded_where_it_started(
    small_world, ray_session, tmp_path, monkeypatch
):
    spec = spec_for(small_world, tmp_path, name="here", trials=1, epochs=1)
    record = interrupted_search(spec, monkeypatch)
    assert record["path"] == str(Path(spec.storage).resolve() / "here")
    # moved: refused, and nothing written to the store or the folder
    moved = tmp_path / "moved runs"
    Path(spec.storage).rename(moved)
    with pytest.raises(ValueError, match=r"the search started in .*runs/here, not in .*moved runs"):
        run_search(replace(spec, resume=True, storage=str(moved)))
    assert json.loads((moved / "here" / META_FILE).read_text()) == record
    # linked back to where Tune's state says it is: the same search goes on from either path
    Path(spec.storage).symlink_to(moved)
    result = run_search(replace(spec, resume=True, storage=str(moved)))
    assert result.parent_run_id == record["parent_run_id"] and result.n_completed == 1
    assert json.loads((moved / "here" / META_FILE).read_text())["path"] == record["path"]


def test_resume_with_its_sqlite_store_gone_needs_the_new_place(
    small_world, ray_session, tmp_path, monkeypatch, caplog
):
    # Opening the recorded sqlite URI again made a new, empty database at the old path (and
    # the folder it had been moved out of): the search's runs were split over two stores.
    db = tmp_path / "old db" / "mlflow.db"
    spec = spec_for(
        small_world, tmp_path, name="db", trials=1, epochs=1, tracking_uri=f"sqlite:///{db}"
    )
    record = interrupted_search(spec, monkeypatch)
    moved = tmp_path / "new db"
    db.parent.rename(moved)
    resumed = replace(spec, resume=True, tracking_uri=None)
    with pytest.raises(ValueError, match=r"--resume: search db logs to MLflow at ") as e:
        run_search(resumed)
    assert f"but {db} no longer exists" in str(e.value) and "pass --tracking-uri" in str(e.value)
    assert not db.parent.exists()
    # its new place given: the same parent run goes on, and the record says where it is now
    new_uri = f"sqlite:///{moved}/mlflow.db"
    with caplog.at_level("WARNING", logger="bldseg.tune.runner"):
        result = run_search(replace(resumed, tracking_uri=new_uri))
    assert result.tracking_uri == new_uri and result.parent_run_id == record["parent_run_id"]
    assert json.loads((result.path / META_FILE).read_text())["tracking_uri"] == new_uri
    # MLflow still writes the experiment's artifacts at the old place: said, with the way out
    warned = [
        r.getMessage()
        for r in caplog.records
        if "beside the database's old place" in r.getMessage()
    ]
    assert (
        len(warned) == 1
        and f"ln -s {shlex.quote(str(moved))} {shlex.quote(str(db.parent))}" in warned[0]
    )
    again = run_search(resumed)
    assert again.tracking_uri == new_uri and again.parent_run_id == record["parent_run_id"]
    assert not db.exists()


def test_the_table_reads_run_folders_under_the_searchs_folder(tmp_path):
    # A restored search's results keep the paths Tune saved: the final records are read in
    # the search's folder now, not at the old path (where there is nothing).
    import pandas as pd
    from ray.tune import Result

    exp_dir = tmp_path / "now"
    runner.write_trial_record(
        runner.trial_run_dir(exp_dir, "a"),
        trial_id="a",
        status="error",
        message="RuntimeError: out of memory",
        history=[{"epoch": 1, runner.METRIC: 0.5, "val_thr_best": 0.5, "val_dice_05": 0.5}],
        max_epochs=3,
        final=True,
    )
    epoch = {"epoch": 1, runner.METRIC: 0.5, "val_thr_best": 0.5, "val_dice_05": 0.5}
    epoch |= {"diverged": 0, "epoch_s": 1.0, "timestamp": 10, "time_this_iter_s": 1.0}
    grid = [
        Result(
            metrics={"trial_id": "a"},
            checkpoint=None,
            error=None,
            path=str(tmp_path / "before" / "trial_a"),
            metrics_dataframe=pd.DataFrame([epoch]),
        )
    ]
    table = runner.trial_table(grid, max_epochs=3, exp_dir=exp_dir)
    assert list(table["status"]) == ["error"]
    assert table["message"][0] == "RuntimeError: out of memory"
    assert table["run_dir"][0] == str(runner.trial_run_dir(exp_dir, "a"))


def test_a_trial_that_failed_is_never_early_stopped(tmp_path):
    # Tune's result of a trial whose storage could not be set up has no error (Tune cannot
    # read its error file back) and no record (the trial's code never ran): the table called it
    # early-stopped, a usable model, and the search exited 0.
    import pandas as pd
    from ray.tune import Result

    epoch = {"epoch": 1, runner.METRIC: 0.5, "val_thr_best": 0.5, "val_dice_05": 0.5}
    epoch |= {"diverged": 0, "epoch_s": 1.0, "timestamp": 10, "time_this_iter_s": 1.0}

    def result(trial_id: str, epochs: list[dict]) -> Result:
        return Result(
            metrics={"trial_id": trial_id},
            checkpoint=None,
            error=None,
            path=str(tmp_path / f"trial_{trial_id}"),
            metrics_dataframe=pd.DataFrame(epochs),
        )

    grid = [result("told", [epoch]), result("silent", []), result("stopped", [epoch])]
    errors = {"told": "RuntimeError: Unable to set up cluster storage"}
    table = runner.trial_table(grid, max_epochs=3, errors=errors).set_index("trial_id")
    assert table.loc["told", "status"] == "error"
    assert table.loc["told", "message"] == errors["told"]
    assert table.loc["silent", "status"] == "error"
    assert table.loc["silent", "message"] == "the trial ended before it trained an epoch"
    # a trial the scheduler stopped after an epoch is still early-stopped
    assert table.loc["stopped", "status"] == "early-stopped"


def test_a_resume_checks_the_experiment_it_logs_to():
    # the store check and the runs both take the experiment the parent run was made in; the
    # check read the settings' name, the runs the parent's (they differ in an edited record)
    both = {"experiment": "made-in", "spec": {"experiment": "named"}}
    assert runner._recorded_experiment(both) == "made-in"
    assert runner._recorded_experiment({"spec": {"experiment": "named"}}) == "named"
    assert runner._recorded_experiment({"spec": {}}) is None
    assert runner._recorded_experiment(None) is None

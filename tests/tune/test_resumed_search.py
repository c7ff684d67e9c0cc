"""A resumed search is one search: its wall time over every session, its one MLflow store."""

import json
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
    path = Path(spec.storage) / "a1" / META_FILE
    older = {k: v for k, v in json.loads(path.read_text()).items() if k != "decode_rules"}
    path.write_text(json.dumps(older))
    with pytest.raises(
        ValueError, match=r"started on \(or bldseg's image or mask decoding changed since\)"
    ):
        run_search(replace(spec, resume=True))

"""Each job checks its tracking store for the experiment it logs to (``check_tracking``'s
``experiment=``): a sqlite store's check then looks at that experiment's artifact folder, not
at the one that holds them all, which only a new experiment needs to write. The check is
stopped right after it is called, so nothing heavy runs."""

import json
from dataclasses import replace

import pytest

from bldseg import pipeline
from bldseg.commands import ensemble as ensemble_cmd
from bldseg.ensemble.synthetic import fake_library, write_runs
from bldseg.pipeline import PipelineConfig
from bldseg.tune import tracking
from bldseg.tune.runner import META_FILE, SearchSpec, run_search


class _Checked(Exception):
    """Raised in place of the tracking check, once its arguments are recorded."""


def _record_check(monkeypatch) -> list[dict]:
    """``check_tracking`` records its URI and keyword arguments, then stops the job."""
    calls = []

    def check(uri, *args, **kwargs):
        calls.append({"uri": uri, **kwargs})
        raise _Checked

    monkeypatch.setattr(tracking, "check_tracking", check)
    return calls


def test_the_pipeline_checks_the_experiment_named_after_it(small_world, tmp_path, monkeypatch):
    # its runs go to the experiment --name names (ensure_experiment(client, cfg.name, ...))
    monkeypatch.chdir(tmp_path)
    calls = _record_check(monkeypatch)
    cfg = PipelineConfig(
        name="roofs",
        data=str(small_world.root),
        data_root=str(small_world.root.parent),
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
    )
    with pytest.raises(_Checked):
        pipeline.run_pipeline(cfg)
    assert calls == [{"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "roofs"}]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A six-model run library of 24 tiny tiles."""
    root = tmp_path_factory.mktemp("ens_callers")
    write_runs(fake_library(6, 24, 16, seed=3, tiles_per_image=2), root / "results")
    return root / "results"


@pytest.mark.parametrize("flag", [["--experiment", "roofs"], []])
def test_the_ensemble_command_checks_the_experiment_it_logs_to(runs, tmp_path, monkeypatch, flag):
    # --experiment, else the search's default (test_a_relative_sqlite_uri_is_made_absolute
    # finds its runs in ensemble_search)
    calls = _record_check(monkeypatch)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    argv = ["--runs", str(runs), "-k", "2", "--workers", "0", "--no-progress"]
    argv += ["--tracking-uri", uri, "--out", str(tmp_path / "out"), *flag]
    with pytest.raises(_Checked):
        ensemble_cmd.main(argv, prog="bldseg ensemble")
    expected = "roofs" if flag else "ensemble_search"
    assert calls == [{"uri": uri, "experiment": expected}]
    assert not (tmp_path / "out").exists()


def test_a_search_checks_its_experiment_and_a_resumed_one_its_recorded_one(tmp_path, monkeypatch):
    calls = _record_check(monkeypatch)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = SearchSpec(
        name="s",
        trials=1,
        epochs=1,
        storage=str(tmp_path / "runs"),
        project_dir=str(tmp_path),
        tracking_uri=uri,
        experiment="today",
    )
    with pytest.raises(_Checked):
        run_search(spec)
    assert calls == [{"uri": uri, "experiment": "today"}]
    # a resume logs to the experiment the search started in, whatever --experiment says now
    exp_dir = tmp_path / "runs" / "s"
    exp_dir.mkdir(parents=True)
    record = {
        "path": str(exp_dir),
        "experiment": "started",
        "base": {"epochs": 1, "data": None},
        "spec": {"experiment": "started"},
    }
    (exp_dir / META_FILE).write_text(json.dumps(record))
    calls.clear()
    with pytest.raises(_Checked):
        run_search(replace(spec, resume=True))
    assert calls == [{"uri": uri, "experiment": "started"}]
    assert sorted(p.name for p in exp_dir.iterdir()) == [META_FILE]  # nothing started

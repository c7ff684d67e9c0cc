"""Under `ray job submit`, relative output paths land in Ray's temporary copy of the working
folder: every command that writes results says so (the real job is in
tests/ensemble/test_ray_job.py; here Ray's job variable is set by hand)."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from bldseg.commands import RAY_JOB_ENV, warn_job_relative_paths
from bldseg.commands import ensemble as ensemble_cmd
from bldseg.commands import predict as predict_cmd
from bldseg.commands import train as train_cmd
from bldseg.tune import cli as tune_cli


@pytest.fixture
def in_ray_job(monkeypatch, tmp_path):
    monkeypatch.setenv(RAY_JOB_ENV, '{"runtime_env": {}}')
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_outside_a_ray_job_nothing_is_said(monkeypatch, capsys):
    monkeypatch.delenv(RAY_JOB_ENV, raising=False)
    assert warn_job_relative_paths("bldseg tune", {"--storage": "runs"}, None) == []
    assert capsys.readouterr().err == ""


def test_each_relative_path_is_named_with_where_it_lands(in_ray_job, capsys):
    lines = warn_job_relative_paths(
        "bldseg pipeline",
        {"--out": "results", "--storage": "/shared/runs", "--data-root": None},
        None,
    )
    err = capsys.readouterr().err
    assert err.splitlines() == lines and len(lines) == 2
    assert lines[0].startswith("bldseg pipeline: warning: --out results is relative")
    assert str(in_ray_job / "results") in lines[0]
    # no --tracking-uri: the default store is mlflow.db in the current folder
    assert lines[1].startswith("bldseg pipeline: warning: the MLflow store (no --tracking-uri)")
    assert str(in_ray_job / "mlflow.db") in lines[1]
    assert "/shared/runs" not in err


@pytest.mark.parametrize(
    "uri, relative",
    [
        ("sqlite:///mlflow.db", "mlflow.db"),
        ("sqlite:///db/m.db", os.path.join("db", "m.db")),
        ("mlruns", "mlruns"),
        ("file:./mlruns", "mlruns"),
        ("file:mlruns", "mlruns"),
        ("sqlite:////shared/mlflow.db", None),
        ("http://127.0.0.1:5000", None),
        ("file:///shared/mlruns", None),
        ("file:/shared/mlruns", None),
        ("databricks", None),
        ("postgresql://db:5432/mlflow", None),
    ],
)
def test_a_relative_tracking_store_is_named(in_ray_job, uri, relative):
    lines = warn_job_relative_paths("bldseg tune aug", {}, uri)
    if relative is None:
        assert lines == []
    else:
        assert len(lines) == 1 and f"--tracking-uri {uri} is relative" in lines[0]
        assert str(in_ray_job / relative) in lines[0]


def test_commands_warn_before_they_work(in_ray_job, capsys):
    # each with its defaults (relative all) and data that are not there: it warns, then fails
    assert ensemble_cmd.main(["--runs", "nowhere", "-k", "2"]) != 0
    err = capsys.readouterr().err
    assert "--out ensemble_out is relative" in err and "search results folder" in err
    assert predict_cmd.main(["--checkpoint", "missing.pt"]) != 0
    assert "--out submission.csv is relative" in capsys.readouterr().err
    assert train_cmd.main(["--out", "run", "--data", "nowhere"]) != 0
    err = capsys.readouterr().err
    assert "--out run is relative" in err and "--data-root data is relative" in err
    assert tune_cli.main("aug", "augmentation search", ["--data", "nowhere"]) != 0
    err = capsys.readouterr().err
    for said in ("--storage runs is", "--data-root data is", "MLflow store (no --tracking-uri)"):
        assert said in err
    assert not (in_ray_job / "runs").exists()  # refused before anything was written


def test_a_search_from_another_names_the_data_root_it_uses(
    in_ray_job, tmp_path, capsys, monkeypatch
):
    # --from trains on the earlier search's data (its recorded --data-root): the warning
    # named this command's default data/ instead, which nothing was written to
    from bldseg.tune.runner import META_FILE

    earlier = tmp_path / "shared" / "augmentation-1"
    earlier.mkdir(parents=True)
    record = {"base": {"epochs": 2, "data": None}, "spec": {"data_root": "/shared/data"}}
    (earlier / META_FILE).write_text(json.dumps(record))
    table = {"trial_id": ["a1"], "status": ["completed"], "val_dice_best": [0.5]}
    pd.DataFrame({**table, "config/aug.hflip_p": [0.3]}).to_csv(earlier / "trials.csv")

    def stop(spec):
        raise ValueError(f"stopped with --data-root {spec.data_root}")

    monkeypatch.setattr(tune_cli, "run_search", stop)
    argv = ["--from", str(earlier), "--storage", "/shared/runs", "--tracking-uri", "http://h"]
    assert tune_cli.main("scheduler", "schedule search", argv) == 2
    err = capsys.readouterr().err
    assert "stopped with --data-root /shared/data" in err
    assert "is relative" not in err, err  # every path it uses is absolute

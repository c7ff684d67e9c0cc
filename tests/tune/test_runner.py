"""Integration tests of the search runner: real Ray, a real MLflow server, the real op."""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest

from bldseg.tune.runner import METRIC, SEARCHER_METRIC, SearchSpec, get_space, run_search
from tests.conftest import free_port
from tests.tune.servers import (
    start_mlflow_server,
    start_ray_head,
    stop_mlflow_server,
    stop_ray_head,
)

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

BASE = {
    "model": "upernet_internimage_tiny",
    "aug.crop_size": 64,
    "batch_size": 8,
    "samples_per_epoch": 32,
    "val_fraction": 0.25,
    "impl": "compiled",
}


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 with a sqlite backend, for this module."""
    proc, url = start_mlflow_server(tmp_path_factory.mktemp("mlflow"))
    yield url
    stop_mlflow_server(proc)


def spec_for(world, tmp_path, **kw) -> SearchSpec:
    return SearchSpec(
        **{
            "space": "augmentation",
            "base": BASE,
            "trials": 2,
            "epochs": 2,
            "scheduler": "fifo",
            "storage": str(tmp_path / "runs"),
            "data": str(world.root),
            "data_root": str(world.root.parent),
            "project_dir": str(tmp_path),
            **kw,
        }
    )


def _searched_keys(space: str) -> set[str]:
    """Every key a space can set (sampled widely: some are conditional)."""
    import optuna

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    keys: set[str] = set()
    for _ in range(64):
        t = study.ask()
        constants = get_space(space)(t) or {}  # first: it suggests the params
        keys.update({**t.params, **constants})
        study.tell(t, 0.0)
    return keys


def _rounded(value: float) -> bool:
    return value == float(f"{value:.6g}")


def check_trial_records(result, client) -> dict[str, str]:
    """Each trial's folder and MLflow run agree with its history; returns {trial id: status}.

    Folder: final status.json and summary.json, the plots (worst_tiles.png included).
    MLflow: the status tag, FINISHED for a usable model and FAILED otherwise, the best epoch's
    ``best_*`` metrics (so the runs table shows the best, not the last), no ``epoch`` metric.
    """
    max_epochs = json.loads((result.path / "bldseg_search.json").read_text())["base"]["epochs"]
    statuses = {}
    for row in result.table.to_dict("records"):
        run_dir = Path(row["run_dir"])
        status = json.loads((run_dir / "status.json").read_text())
        summary = json.loads((run_dir / "summary.json").read_text())
        assert status["final"] and status["status"] == row["status"] == summary["status"], row
        path = run_dir / "history.json"
        history = json.loads(path.read_text()) if path.exists() else []  # [] if none trained
        epochs = history[-1]["epoch"] if history else 0
        if row["status"] in ("completed", "early-stopped"):
            # the truth, whatever ASHA did: all epochs trained is "completed"
            assert row["status"] == ("completed" if epochs == max_epochs else "early-stopped")
        assert summary["epochs_run"] == epochs
        run = client.search_runs(
            [client.get_run(result.parent_run_id).info.experiment_id],
            f"tags.`bldseg.trial_id` = '{row['trial_id']}'",
        )[0]
        assert run.data.tags["bldseg.status"] == row["status"]
        usable = row["status"] in ("completed", "early-stopped")
        assert run.info.status == ("FINISHED" if usable else "FAILED")
        m = run.data.metrics
        assert "epoch" not in m and all(_rounded(v) for v in m.values()), m
        if history:
            best = max(history, key=lambda h: (h[METRIC], -h["epoch"]))  # the first of equals
            assert summary["best_epoch"] == best["epoch"]
            plots = {p.name for p in (run_dir / "plots").glob("*.png")}
            assert {"curves.png", "threshold_curve.png", "worst_tiles.png"} <= plots, plots
            assert m["best_epoch"] == best["epoch"]
            # a K-fold trial's scores are its out-of-fold library's, as the table's
            scores = summary.get("oof", best)
            assert m["best_val_dice"] == pytest.approx(scores[METRIC], rel=1e-5)
            # rounded down to 6 decimals: the same level typed back
            assert 0 <= scores["val_thr_best"] - m["best_threshold"] < 1e-6
            assert m["best_val_dice"] == pytest.approx(row[METRIC], rel=1e-5)
        steps = [x.step for x in client.get_metric_history(run.info.run_id, METRIC)]
        assert sorted(steps) == [h["epoch"] for h in history]  # each epoch once, step = epoch
        # the searcher is told the best epoch so far, as the table ranks trials
        tune_results = run_dir.parent / "result.json"
        if history:
            reports = [json.loads(line) for line in tune_results.read_text().splitlines()]
            reported = [(r["epoch"], r[SEARCHER_METRIC]) for r in reports if "epoch" in r]
            running = [max(h[METRIC] for h in history[:i]) for i in range(1, len(history) + 1)]
            assert reported == [(h["epoch"], m) for h, m in zip(history, running, strict=True)]
        statuses[row["trial_id"]] = row["status"]
    return statuses


def test_search_is_logged_to_mlflow_server(small_world, ray_session, mlflow_server, tmp_path):
    result = run_search(
        spec_for(small_world, tmp_path, name="it", experiment="proj", tracking_uri=mlflow_server)
    )
    assert len(result.table) == 2 and set(result.table["status"]) == {"completed"}
    assert result.experiment == "proj"
    api = mlflow_server + "/api/2.0/mlflow"
    exp = _get(f"{api}/experiments/get-by-name?experiment_name=proj")["experiment"]
    # the UI opens it on its training runs, not on the GenAI traces page
    assert {t["key"]: t["value"] for t in exp["tags"]}["mlflow.experimentKind"] == (
        "custom_model_development"
    )
    runs = _post(f"{api}/runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
    assert len(runs) == 3  # the parent and one child per trial, no duplicates
    tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
    parents = [r for r, t in zip(runs, tags, strict=True) if t.get("bldseg.kind") == "search"]
    assert len(parents) == 1
    parent, parent_tags = parents[0], tags[runs.index(parents[0])]
    parent_id = parent["info"]["run_id"]
    assert parent["info"]["status"] == "FINISHED" and parent["info"]["run_name"] == "it"
    assert parent_tags["bldseg.search"] == "it"
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert parent_tags["mlflow.source.git.commit"] == commit
    assert parent_tags["mlflow.source.type"] == "LOCAL" and parent_tags["mlflow.source.name"]
    searched = _searched_keys("augmentation")
    assert "aug.scale_limit" in searched and "aug.crop_size" not in searched
    # the constants once, on the parent; the searched values only on the children
    parent_params = {p["key"]: p["value"] for p in parent["data"]["params"]}
    assert parent_params["aug.crop_size"] == "64" and parent_params["batch_size"] == "8"
    assert parent_params["search.space"] == "augmentation"
    assert not searched & set(parent_params)
    children = [
        (r, t) for r, t in zip(runs, tags, strict=True) if t.get("mlflow.parentRunId") == parent_id
    ]
    assert len(children) == 2
    for run, t in children:
        rid = run["info"]["run_id"]
        assert run["info"]["status"] == "FINISHED" and t["bldseg.status"] == "completed"
        assert t["model"] == "upernet_internimage_tiny" and t["data_fingerprint"]
        assert t["mlflow.source.git.commit"] == commit
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        assert "aug.scale_limit" in params and set(params) <= searched, params
        for value in params.values():  # rounded: 0.219525, not 0.21952540157092992
            assert len(value.replace("-", "").replace(".", "").lstrip("0")) <= 6, value
        metrics = {m["key"] for m in run["data"]["metrics"]}
        assert "epoch" not in metrics and {"best_val_dice", "best_threshold"} <= metrics
        hist = _get(f"{api}/metrics/get-history?run_id={rid}&metric_key=val_dice_best")
        assert sorted(m["step"] for m in hist["metrics"]) == [1, 2]
        for key in ("train_loss", "lr", "val_dice_05", "val_dice_youden", "val_thr_best"):
            assert (
                len(_get(f"{api}/metrics/get-history?run_id={rid}&metric_key={key}")["metrics"])
                == 2
            ), key
        files = {f["path"] for f in _get(f"{api}/artifacts/list?run_id={rid}")["files"]}
        assert {
            "augmentation.json",
            "history.json",
            "best.pt",
            "val_probs.npz",
            "summary.json",
            "status.json",
            "plots",
        } <= files
        plots = {f["path"] for f in _get(f"{api}/artifacts/list?run_id={rid}&path=plots")["files"]}
        assert {
            "plots/threshold_curve.png",
            "plots/roc.png",
            "plots/curves.png",
            "plots/worst_tiles.png",
        } <= plots
    assert (result.path / "trials.csv").exists() and (result.path / "trials.png").exists()

    # a second search goes into the same experiment, as another parent run
    again = run_search(
        spec_for(
            small_world,
            tmp_path,
            name="it2",
            experiment="proj",
            tracking_uri=mlflow_server,
            trials=1,
            epochs=1,
        )
    )
    runs = _post(f"{api}/runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
    assert len(runs) == 5 and again.experiment == "proj"


def test_asha_trials_leave_records_however_they_end(small_world, ray_session, tmp_path, capfd):
    """Under ASHA a trial ends inside its last report (stopped at a rung, or at its last epoch):
    every trial still has its records, plots and a truthful MLflow status."""
    from mlflow.tracking import MlflowClient

    result = run_search(
        spec_for(
            small_world,
            tmp_path,
            name="asha",
            scheduler="asha",
            grace_period=1,
            trials=4,
            epochs=2,
            # one at a time: ASHA's decisions then follow from the (seeded) trials' scores
            # alone; the first trial always runs to the end, later ones below the median stop
            max_concurrent=1,
        )
    )
    statuses = check_trial_records(result, MlflowClient(f"sqlite:///{tmp_path}/mlflow.db"))
    assert set(statuses.values()) == {"completed", "early-stopped"}, statuses
    assert result.n_completed == 4
    # ASHA compares the epoch's Dice; Tune's console named its own "best trial" by the last
    # epoch's, beside bldseg's table ranking by the best epoch: it names none now, and its
    # trial table shows each trial's best epoch so far first
    out = capfd.readouterr().out
    assert "Current best trial" not in out
    assert SEARCHER_METRIC in out


def test_unreachable_tracking_server_fails_fast(small_world, tmp_path):
    spec = spec_for(small_world, tmp_path, tracking_uri=f"http://127.0.0.1:{free_port()}")
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"not reachable.*The search was not started"):
        run_search(spec)
    assert time.perf_counter() - t0 < 60
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"trials": 0}, r"trials=0.*--trials"),
        ({"epochs": 0}, r"epochs=0.*--epochs"),
        ({"scheduler": "asha", "reduction_factor": 1}, r"reduction_factor=1.*--reduction-factor"),
        ({"tracking_timeout_s": 0.0}, r"tracking_timeout_s=0\.0.*--tracking-timeout"),
    ],
)
def test_invalid_search_options_are_named(small_world, tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        run_search(spec_for(small_world, tmp_path, **kw))
    assert not (tmp_path / "runs").exists()


def test_invalid_base_is_rejected_before_trials(small_world, tmp_path):
    spec = spec_for(small_world, tmp_path, base={**BASE, "aug.scale_p": 3.0})
    with pytest.raises(ValueError, match=r"scale_p=3\.0"):
        run_search(spec)
    assert not (tmp_path / "runs").exists()


def faulty_space(trial):
    """Module level: Tune pickles the searcher with its space."""
    trial.suggest_float("aug.vflip_p", 0.0, 0.5)
    # trial 0 trains normally (its crop shrunk to the 96-px images); trial 1 diverges (absurd
    # weight decay); trial 2 errors as it starts (its checkpoint file is not there: the search
    # checks only a fixed one before it starts), and is not retried (its error would recur)
    return [
        {"aug.crop_size": 128, "aug.crop_fit": True},
        {"optim.weight_decay": 1e6, "optim.lr": 0.5, "sched.name": "constant"},
        {"pretrained": str(Path(__file__).parent / "no-such-checkpoint.pt")},
    ][trial.number % 3]  # validate_space samples more than 3


def test_erroring_and_diverging_trials(small_world, ray_session, tmp_path, monkeypatch):
    from bldseg import tune_spaces

    monkeypatch.setitem(tune_spaces.SPACES, "augmentation", faulty_space)
    result = run_search(
        spec_for(small_world, tmp_path, trials=3, max_concurrent=1, search="random")
    )
    from mlflow.tracking import MlflowClient

    status = dict(zip(result.table["trial_id"], result.table["status"], strict=True))
    assert sorted(status.values()) == ["completed", "diverged", "error"]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert check_trial_records(result, client) == status
    by_status = {r["status"]: r for r in result.table.to_dict("records")}
    summary = json.loads((Path(by_status["diverged"]["run_dir"]) / "summary.json").read_text())
    assert summary["status"] == "diverged" and "became nan" in summary["message"]
    # the error happens before any epoch: its record says why
    record = json.loads((Path(by_status["error"]["run_dir"]) / "status.json").read_text())
    assert "pretrained checkpoint not found" in record["message"]
    # MLflow shows the crop a shrunk trial trained with beside the one searched
    params = {
        r["status"]: client.search_runs(
            [client.get_run(result.parent_run_id).info.experiment_id],
            f"tags.`bldseg.trial_id` = '{r['trial_id']}'",
        )[0].data.params
        for r in by_status.values()
    }
    assert (params["completed"]["aug.crop_size"], params["completed"]["aug.crop_size_used"]) == (
        "128",
        "96",
    )
    assert "aug.crop_size_used" not in params["error"]
    from bldseg.train.engine import load_state

    state = load_state(Path(by_status["completed"]["run_dir"]) / "best.pt", mmap=True)
    assert state["config"]["aug.crop_size"] == 96


def _reported(exp: Path) -> list[Path]:
    """Run folders of trials that reported an epoch (each writes status.json before it does)."""
    return sorted(exp.glob("trial_*/run/status.json"))


def test_trial_refuses_a_cache_rebuilt_from_other_data(small_world):
    from bldseg.tune.runner import _data_paths, _open_data

    paths = _data_paths(small_world)
    assert _open_data(paths).train.fingerprint == small_world.train.fingerprint
    with pytest.raises(ValueError, match="was rebuilt from other data since the search started"):
        _open_data({**paths, "fingerprint": "0" * 32})


def test_a_trial_on_a_node_without_the_drivers_cache_names_the_data_root(small_world, tmp_path):
    # On a cluster whose --data-root is the driver's local disk, every trial said the cache was
    # "not a complete bldseg cache ... build it", a cache that was complete on the driver.
    from bldseg.tune.runner import _data_paths, _open_data

    paths = _data_paths(small_world)
    elsewhere = tmp_path / "data" / "cache" / "x" / "train"  # not on this node
    with pytest.raises(FileNotFoundError, match=r"not on this node .*--data-root must be shared"):
        _open_data({**paths, "train": str(elsewhere)})


def test_resume_on_other_data_is_refused(small_world, tmp_path):
    # A search's trials are compared with each other: resuming it on changed data would mix
    # models of two datasets in one table. Refused before Ray starts, naming both.
    from bldseg.io import write_json
    from bldseg.tune.runner import META_FILE

    spec = spec_for(small_world, tmp_path, name="moved", resume=True)
    write_json(
        tmp_path / "runs" / "moved" / META_FILE,
        {
            "base": {**BASE, "epochs": 2, "data": str(small_world.root)},
            "spec": {"trials": 2, "data_options": None},
            "data_fingerprint": "0123456789abcdef",
        },
    )
    with pytest.raises(ValueError, match="--resume moved: the training data differ") as e:
        run_search(spec)
    assert small_world.train.fingerprint in str(e.value) and "0123456789abcdef" in str(e.value)


def test_resume_after_a_change_of_bldseg_mask_decoding_blames_bldseg_not_the_data():
    # A bldseg update that decodes masks differently (DECODE_RULES) changes the cache's
    # fingerprint: refusing the resume is right, saying that the user's data changed is not.
    from bldseg.data.readers import DECODE_RULES
    from bldseg.tune.runner import check_resumed_data

    now, then = "a" * 32, "b" * 32
    record = {"data_fingerprint": then, "decode_rules": DECODE_RULES - 2}
    with pytest.raises(ValueError) as e:
        check_resumed_data("a1", record, now, "/data/inria")
    assert str(e.value) == (
        "--resume a1: bldseg's image or mask decoding changed since this search started (rules "
        f"{DECODE_RULES - 2} -> {DECODE_RULES}: see bldseg.data.readers.DECODE_RULES); the cache "
        "is rebuilt and decoded differently, so the search cannot continue on it: start a new "
        "search (another --name)"
    )
    # the same rules: the data themselves changed
    with pytest.raises(ValueError) as e:
        check_resumed_data("a1", {**record, "decode_rules": DECODE_RULES}, now, "/data/inria")
    assert str(e.value).startswith(
        "--resume a1: the training data differ from those the search started on (fingerprint "
        f"{now}, recorded {then}; data /data/inria)"
    )
    # a record from before the rules were kept cannot tell: it names both causes
    with pytest.raises(ValueError) as e:
        check_resumed_data("a1", {"data_fingerprint": then}, now, None)
    assert str(e.value).startswith(
        "--resume a1: the training data differ from those the search started on (or bldseg's "
        f"image or mask decoding changed since) (fingerprint {now}, recorded {then}; data built-in "
        "synthetic)"
    )
    # the same fingerprint, or none recorded (an older record): resumed
    check_resumed_data("a1", record, then, None)
    check_resumed_data("a1", {}, now, None)


def test_resume_names_what_it_ignores_and_keeps_the_recorded_resources(tmp_path, caplog):
    # A resumed search trains on with the config, data and trial resources it started with:
    # every flag of the new command that differs is named, once, in one warning.
    from bldseg.data.prepare import DataOptions
    from bldseg.tune.runner import resumed_spec

    meta = {
        "base": {**BASE, "folds": 2, "epochs": 2, "data": str(tmp_path / "world")},
        "spec": {"trials": 2, "cpus_per_trial": 2.0, "gpus_per_trial": 0.5, "data_options": None},
    }
    spec = SearchSpec(
        base={**BASE, "batch_size": 4, "split_group": "x"},
        trials=2,
        epochs=2,
        data=str(tmp_path / "other"),
        data_options=DataOptions(tile_size=64),
        cpus_per_trial=1.0,
        resume=True,
    )
    with caplog.at_level(logging.WARNING, logger="bldseg.tune.runner"):
        resumed = resumed_spec(spec, meta)
    assert (resumed.cpus_per_trial, resumed.gpus_per_trial) == (2.0, 0.5)
    (said,) = [r.getMessage() for r in caplog.records]
    assert said.startswith("--resume continues the search as it was started: ")
    for change in (
        "batch_size=8 (not 4)",
        "folds=2 (not unset)",
        "split_group=unset (not 'x')",
        f"data={str(tmp_path / 'world')!r} (not {str(tmp_path / 'other')!r})",
        "data_options.tile_size=None (not 64)",
        "cpus_per_trial=2.0 (not 1.0)",
        "gpus_per_trial=0.5 (not 0.0)",
    ):
        assert change in said, change
    assert "model" not in said and "epochs" not in said and "trials" not in said
    # a record from before the resources were recorded resumes with this command's
    caplog.clear()
    old = {"base": {**spec.base, "epochs": 2, "data": str(tmp_path / "other")}, "spec": {}}
    with caplog.at_level(logging.WARNING, logger="bldseg.tune.runner"):
        resumed = resumed_spec(replace(spec, data_options=DataOptions()), old)
    assert resumed.cpus_per_trial == 1.0 and not caplog.records


def test_a_resume_compares_folders_as_absolute_paths(tmp_path, monkeypatch, caplog):
    # New searches record --images/--masks absolute (--from and --resume may run elsewhere):
    # the same command resumed with the folders typed relative differs in nothing.
    from bldseg.data.prepare import DataOptions
    from bldseg.tune.runner import resumed_spec

    monkeypatch.chdir(tmp_path)
    meta = {
        "base": {**BASE, "epochs": 2, "data": None},
        "spec": {"data_options": {"images": str(tmp_path / "imgs"), "masks": "msk"}},
    }
    spec = SearchSpec(base=BASE, epochs=2, data_options=DataOptions(images="imgs", masks="msk"))
    with caplog.at_level(logging.WARNING, logger="bldseg.tune.runner"):
        resumed_spec(spec, meta)
    assert not caplog.records
    # other folders are still named
    with caplog.at_level(logging.WARNING, logger="bldseg.tune.runner"):
        resumed_spec(replace(spec, data_options=DataOptions(images="other")), meta)
    (said,) = [r.getMessage() for r in caplog.records]
    assert (
        f"data_options.images={str(tmp_path / 'imgs')!r} (not {str(tmp_path / 'other')!r})" in said
    )


def test_ctrl_c_stops_the_search_and_resume_finishes_it(small_world, tmp_path):
    """Ctrl-C once a trial has reported: the script says how to continue and exits non-zero,
    its MLflow runs are KILLED; --resume finishes every trial without training an epoch twice."""
    from mlflow.tracking import MlflowClient

    db = f"sqlite:///{tmp_path}/mlflow.db"
    args = [
        sys.executable,
        str(REPO / "experiments" / "tune_aug.py"),
        # relative, and the resume below starts in another folder: recorded absolute
        "--data",
        os.path.relpath(small_world.root, tmp_path),
        "--trials",
        "2",
        "--epochs",
        "2",
        "--scheduler",
        "fifo",
        "--max-concurrent",
        "1",
        "--name",
        "resumable",
        "--storage",
        str(tmp_path / "runs"),
        "--tracking-uri",
        db,
    ]
    for k, v in BASE.items():
        args += ["--set", f"{k}={json.dumps(v)}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # its own Ray: a subprocess cannot join the test session's in-process Ray. Its own process
    # group, signalled as a terminal signals the foreground job on Ctrl-C.
    proc = subprocess.Popen(
        args,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    exp = tmp_path / "runs" / "resumable"
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not _reported(exp) and proc.poll() is None:
            time.sleep(0.2)
        assert _reported(exp), "no trial reported in time"
        os.killpg(proc.pid, signal.SIGINT)
        # a bound on a hang (Tune saves its state and stops the trials), not a speed test
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted" in err and "--resume --name resumable" in err, err[-3000:]
    meta = json.loads((exp / "bldseg_search.json").read_text())
    assert meta["data_fingerprint"] == small_world.train.fingerprint
    client = MlflowClient(db)
    exp_id = client.get_experiment_by_name("bldseg").experiment_id
    (parent,) = client.search_runs([exp_id], "tags.`bldseg.search` = 'resumable'")
    assert parent.info.status == "KILLED"
    assert "RUNNING" not in {r.info.status for r in client.search_runs([exp_id])}
    first = {
        p.parent.parent.name: json.loads((p.parent / "history.json").read_text())
        for p in _reported(exp)
        if (p.parent / "history.json").exists()
    }
    assert first, "no epoch was trained before Ctrl-C"

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = subprocess.run(
        [*args, "--resume"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # the figures are the whole search's: the epochs before Ctrl-C, and the wall time too
    sessions = json.loads((exp / "bldseg_search.json").read_text())["sessions"]
    assert [s["end"] for s in sessions] == ["interrupted", "finished"]
    wall = sum(s["wall_s"] for s in sessions)
    said = re.search(r"wall ([\d.]+) s in 2 sessions; trial epochs ([\d.]+) s", out.stdout)
    assert said and float(said[1]) == pytest.approx(wall, abs=0.06), out.stdout[-2000:]
    assert float(said[1]) >= float(said[2])  # one slot: the epochs fit in the wall time
    statuses = {p.parent.parent.name: json.loads(p.read_text())["status"] for p in _reported(exp)}
    assert list(statuses.values()) == ["completed"] * 2, statuses
    # the epochs trained before Ctrl-C were kept, not trained again
    for trial, history in first.items():
        after = json.loads((exp / trial / "run" / "history.json").read_text())
        assert after[: len(history)] == history
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["wall_s"] == pytest.approx(wall, rel=1e-5)
    assert parent.data.metrics["wall_s"] >= parent.data.metrics["train_s"]
    runs = client.search_runs([exp_id])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and len(runs) == 3  # the same parent, no duplicate runs
    for r in children:
        assert r.info.status == "FINISHED" and r.data.tags["bldseg.status"] == "completed"
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "val_dice_best")]
        assert sorted(steps) == [1, 2], steps  # each epoch logged once


def test_runner_joins_a_real_local_cluster(small_world, tmp_path):
    """`ray start --head` on 127.0.0.1, then the script connects with --address."""
    head, port, env, temp = start_ray_head(tmp_path)
    try:
        args = [
            sys.executable,
            str(REPO / "experiments" / "tune_aug.py"),
            "--data",
            str(small_world.root),
            "--trials",
            "1",
            "--epochs",
            "1",
            "--scheduler",
            "fifo",
            "--address",
            f"127.0.0.1:{port}",
            "--storage",
            str(tmp_path / "runs"),
            # relative, as a user types it: trials run in their own folders, yet log here
            "--tracking-uri",
            "sqlite:///mlflow.db",
            "--name",
            "cluster",
        ]
        for k, v in BASE.items():
            args += ["--set", f"{k}={json.dumps(v)}"]
        # Without the head's token Ray retries for ~30 s, then says only "Failed to connect to
        # Ray cluster at ..."; the refusal names the token and how to pass it
        no_token = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
        # Ray's own knob for how long a client retries the GCS (default 30 s)
        no_token["RAY_gcs_server_port_wait_time_s"] = "2"
        refused = subprocess.run(
            args, cwd=tmp_path, env=no_token, capture_output=True, text=True, timeout=600
        )
        assert refused.returncode == 2, refused.stderr[-3000:]
        assert (
            f"--address 127.0.0.1:{port}: the Ray head refused this client's authentication "
            "token (RAY_AUTH_MODE=unset); set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH"
        ) in refused.stderr, refused.stderr[-3000:]
        out = subprocess.run(
            args,
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        assert "1 trials" in out.stdout and "completed" in out.stdout
        ran_on = out.stdout.rsplit("(Ray cluster ", 1)[-1].split(")")[0]
        assert ran_on.endswith(f":{port}"), ran_on  # it ran on the cluster the test started
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        trials = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        assert len(trials) == 1 and METRIC in trials[0].data.metrics, [r.data for r in runs]
        assert [p.name for p in tmp_path.rglob("mlflow.db")] == ["mlflow.db"]  # no stray stores
    finally:
        stop_ray_head(head, temp)


def test_kfold_trials_leave_out_of_fold_libraries(small_world, ray_session, tmp_path):
    """--folds 2: each trial trains its 2 folds in lockstep and reports their mean per epoch
    (ASHA decides on it), and leaves an out-of-fold library of the whole training set that the
    ensemble search takes as one model per trial."""
    import numpy as np
    from mlflow.tracking import MlflowClient

    from bldseg.ensemble.library import find_runs
    from bldseg.ensemble.run import SearchConfig
    from bldseg.ensemble.run import run_search as ensemble_search

    result = run_search(
        spec_for(
            small_world,
            tmp_path,
            name="kfold",
            base={**BASE, "folds": 2, "split_group": r"TRAIN_\d\d(\d)"},
            scheduler="asha",
            grace_period=1,
            max_concurrent=1,
        )
    )
    check_trial_records(result, MlflowClient(f"sqlite:///{tmp_path}/mlflow.db"))
    assert result.n_completed == 2
    for row in result.table.to_dict("records"):
        run_dir = Path(row["run_dir"])
        history = json.loads((run_dir / "history.json").read_text())
        folds = [json.loads((run_dir / f"fold{f}" / "history.json").read_text()) for f in (0, 1)]
        epochs = len(history)
        assert [len(h) for h in folds] == [epochs, epochs]  # lockstep: every fold as far
        mean = (folds[0][-1][METRIC] + folds[1][-1][METRIC]) / 2
        assert history[-1][METRIC] == pytest.approx(mean)
        z = np.load(run_dir / "val_probs.npz")
        assert sorted(set(z["image_ids"])) == sorted(small_world.train.ids)
        # the table shows what the trial predicts with (folds.json, scored before each report):
        # its out-of-fold Dice and threshold, not the best epoch's mean over the folds
        manifest = json.loads((run_dir / "folds.json").read_text())
        oof = manifest["oof"]
        assert (row[METRIC], row["val_thr_best"]) == (oof["val_dice_best"], oof["val_thr_best"])
        # Tune ended the trial in its last report: the manifest said "running" for ever
        assert manifest["status"] == row["status"] in ("completed", "early-stopped")
        assert json.loads((run_dir / "summary.json").read_text())["oof"] == oof
        assert len(set(z["tile_ids"])) == len(z["tile_ids"]) and set(z["fold"]) == {0, 1}
    # the trials' out-of-fold libraries, not their folds, are the ensemble search's models
    runs = find_runs(result.path)
    assert runs == sorted(Path(r) for r in result.table["run_dir"])
    ens = SearchConfig(runs=str(result.path), k=[2], out=str(tmp_path / "ens"), progress=False)
    ensemble_search(ens)
    spec = json.loads((tmp_path / "ens" / "best_ensemble.json").read_text())
    assert len(spec["members"]) == 2
    assert all(m["checkpoint"].endswith("run/folds.json") for m in spec["members"])


def test_a_trial_without_an_epoch_has_no_score_in_the_table(tmp_path):
    # an error before the first epoch: NaN, not Dice 0.0 (which trials.png drew as a bar and
    # as the bottom of the metric's scale); sorted last, and never the best trial
    import numpy as np
    import pandas as pd
    from ray.tune import Result

    from bldseg.pipeline import best_config
    from bldseg.tune.report import plot_trials
    from bldseg.tune.runner import trial_table

    epoch = {"epoch": 1, METRIC: 0.8, "val_thr_best": 0.4, "val_dice_05": 0.7, "diverged": 0}
    epoch |= {"epoch_s": 2.0, "timestamp": 100, "time_this_iter_s": 3.0, "time_total_s": 3.0}
    grid = [
        Result(
            metrics={"trial_id": "failed", "config": {"optim.lr": 5e-3}},
            checkpoint=None,
            error=RuntimeError("CUDA out of memory"),
            path=str(tmp_path / "trial_failed"),
            metrics_dataframe=pd.DataFrame(),
        ),
        Result(
            metrics={"trial_id": "good", "config": {"optim.lr": 1e-3}},
            checkpoint=None,
            error=None,
            path=str(tmp_path / "trial_good"),
            metrics_dataframe=pd.DataFrame([epoch]),
        ),
    ]
    table = trial_table(grid, max_epochs=1)
    assert list(table["trial_id"]) == ["good", "failed"]
    assert list(table["status"]) == ["completed", "error"]
    assert table[METRIC].iloc[0] == 0.8 and np.isnan(table[METRIC].iloc[1])
    assert best_config(table) == {"optim.lr": 1e-3}
    table.to_csv(tmp_path / "trials.csv", index=False)
    assert np.isnan(pd.read_csv(tmp_path / "trials.csv")[METRIC].iloc[1])
    assert plot_trials(table, tmp_path / "trials.png", METRIC).is_file()


def test_a_search_folder_made_by_another_search_meanwhile_is_not_shared(
    small_world, tmp_path, monkeypatch
):
    # Two searches with one name (or the same second's default name) both pass the "exists"
    # check while they prepare their data: the second to create the folder is refused, and
    # the first's files are left alone.
    from mlflow.tracking import MlflowClient

    from bldseg.tune import runner

    spec = spec_for(small_world, tmp_path, name="shared")
    other = Path(spec.storage) / "shared"
    real_prepare = runner.prepare_data

    def prepare_while_another_starts(*a, **k):
        data = real_prepare(*a, **k)
        other.mkdir(parents=True)
        (other / "theirs.txt").write_text("x")
        return data

    monkeypatch.setattr(runner, "prepare_data", prepare_while_another_starts)
    with pytest.raises(ValueError, match=r"created by another search.*new --name"):
        run_search(spec)
    assert [p.name for p in other.iterdir()] == ["theirs.txt"]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("bldseg").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]  # its own run, not left RUNNING


def test_trial_artifacts_include_the_pretrained_report(tmp_path):
    # Which weights a trial started from (and what was dropped or re-made) belongs with its
    # MLflow record, not only in the run folder; a K-fold trial's is its first fold's.
    from mlflow.tracking import MlflowClient

    from bldseg.tune.runner import log_run_artifacts

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.create_experiment("x", artifact_location=(tmp_path / "art").as_uri())
    single, kfold = tmp_path / "single", tmp_path / "kfold"
    (single / "pretrained.json").parent.mkdir()
    (single / "pretrained.json").write_text('{"loaded": 3}')
    (kfold / "fold0").mkdir(parents=True)
    (kfold / "fold0" / "pretrained.json").write_text('{"loaded": 4}')
    (kfold / "folds.json").write_text("{}")
    for run_dir, source in ((single, single), (kfold, kfold / "fold0")):
        run_id = client.create_run(exp).info.run_id
        log_run_artifacts(client, run_id, run_dir)
        assert "pretrained.json" in {f.path for f in client.list_artifacts(run_id)}
        got = client.download_artifacts(run_id, "pretrained.json", str(tmp_path))
        assert Path(got).read_text() == (source / "pretrained.json").read_text()


def test_a_trial_without_a_gpu_trains_on_the_cpu_even_where_one_is_visible():
    from bldseg.tune.runner import trial_device

    assert trial_device("auto", []) == "cpu"  # Ray gave it none: GPU 0 is another's
    assert trial_device("auto", [0]) == "auto"
    assert trial_device("cuda:1", []) == "cuda:1"  # asked for by name: as asked


def test_tunes_snapshot_advice_is_left_out_and_its_other_warnings_kept(caplog):
    # Tune advised changing CheckpointConfig(num_to_keep) or a TUNE_WARN_* variable every few
    # epochs of a search, which no bldseg flag sets (its checkpoints are a few bytes)
    from bldseg.tune.runner import _quiet_libraries

    log = logging.getLogger("ray.tune.execution.experiment_state")
    log.addHandler(caplog.handler)  # Ray's loggers do not propagate to the root's
    try:
        # (a record may reach the handler twice, also through the root's, where an earlier
        # test made Ray's loggers propagate)
        with _quiet_libraries():
            log.warning("Experiment state snapshotting has been triggered multiple times in")
            log.warning("Saving the experiment state took ~9.00 seconds")
        assert {r.getMessage()[:6] for r in caplog.records} == {"Saving"}
        log.warning("Experiment state snapshotting has been triggered multiple times, after")
        assert {r.getMessage()[:6] for r in caplog.records} == {"Saving", "Experi"}
    finally:
        log.removeHandler(caplog.handler)

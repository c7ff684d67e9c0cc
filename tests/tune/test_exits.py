"""Honest ends of a search: nothing completed, bad counts, a tracking server that dies."""

import contextlib
import io
import json
import signal
import threading
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from bldseg.tune import cli
from bldseg.tune.runner import METRIC, TRACKING_ERROR_FILE, run_search
from tests.tune.servers import start_mlflow_server, stop_mlflow_server
from tests.tune.test_runner import BASE, spec_for

#: A checkpoint file that is not there. Set by a space (the search checks only a fixed
#: --pretrained before it starts), it fails the trial as it starts, before its first epoch.
MISSING = str(Path(__file__).parent / "no-such-checkpoint.pt")
NOT_FOUND = "pretrained checkpoint not found"


def failing_space(trial):
    """Module level: Tune pickles the searcher with its space."""
    trial.suggest_float("aug.vflip_p", 0.0, 0.5)
    return {"pretrained": MISSING}


def tune_failures(exp: Path, trial_id: str) -> int:
    """How many times Tune counted a trial as failed (its error file has a line per failure)."""
    return (exp / f"trial_{trial_id}" / "error.txt").read_text().count("Failure # ")


def test_search_without_a_completed_trial_says_so(
    small_world, ray_session, tmp_path, capsys, monkeypatch
):
    # One failing search serves the CLI's exit, the search's own record and Tune's retries.
    from bldseg import tune_spaces

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(tune_spaces.SPACES, "augmentation", failing_space)
    argv = ["--data", str(small_world.root), "--data-root", str(small_world.root.parent)]
    argv += ["--trials", "1", "--epochs", "1", "--scheduler", "fifo", "--name", "broken"]
    argv += ["--storage", str(tmp_path / "runs")]
    for k, v in BASE.items():
        argv += ["--set", f"{k}={json.dumps(v)}"]
    assert cli.main("augmentation", "test", argv) == 1
    out, err = capsys.readouterr()
    assert "checkpoint:" not in out and "best trial" not in out
    table = pd.read_csv(tmp_path / "runs" / "broken" / "trials.csv")
    assert list(table["status"]) == ["error"]
    assert NOT_FOUND in table["message"][0]
    # it failed before its first checkpoint: not retried, as its error would recur
    assert tune_failures(tmp_path / "runs" / "broken", table["trial_id"][0]) == 1
    # the CLI names the search and the trial's own failure
    assert "error: no trial of broken completed" in err
    assert f"trial {table['trial_id'][0]} error: " in err and NOT_FOUND in err
    # no best score on the search's MLflow run: a 0.0 would sort as a real one
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp_id = client.get_experiment_by_name("bldseg").experiment_id
    (parent,) = client.search_runs([exp_id], "tags.`bldseg.search` = 'broken'")
    assert parent.info.status == "FAILED" and parent.data.metrics["trials_error"] == 1
    assert not [k for k in parent.data.metrics if k.startswith("best_")], parent.data.metrics


def test_tune_retries_only_a_trial_that_has_a_checkpoint():
    # A retry is for a trial lost mid-run (a worker or node gone), continued from its
    # checkpoint; one that fails before it has one failed in its start-up and would again.
    from ray.tune.experiment import Trial

    from bldseg.tune.runner import _search_callback

    callback = _search_callback("a-run", max_failures=1)
    started, resumed = (Trial("__fake", stub=True, max_failures=1) for _ in range(2))
    resumed.has_checkpoint = lambda: True  # a trial restarted from its checkpoint
    for trial in (started, resumed):
        callback.on_trial_start(iteration=0, trials=[started, resumed], trial=trial)
        trial.run_metadata.num_failures = 1  # Tune counts the failure, then asks
    assert (started.should_recover(), resumed.should_recover()) == (False, True)
    # its first checkpoint makes a trial retryable
    callback.on_checkpoint(iteration=1, trials=[started], trial=started, checkpoint=None)
    assert started.should_recover()
    started.run_metadata.num_failures = 2  # and max_failures still bounds the retries
    assert not started.should_recover()


def _trials(rows: list[tuple[str, float]]) -> pd.DataFrame:
    """A trial table (:func:`trial_table`'s columns that the parent run reads) of
    ``(status, best Dice)`` rows."""
    return pd.DataFrame(
        {
            "trial_id": [f"t{i}" for i in range(len(rows))],
            "status": [status for status, _ in rows],
            METRIC: [dice for _, dice in rows],
            "train_s": 1.0,
            "started": [float(i) for i in range(len(rows))],
            "config/aug.vflip_p": [0.1 * i for i in range(len(rows))],
        }
    )


@pytest.mark.parametrize(
    "rows, best",
    [
        ([("error", float("nan")), ("diverged", 0.41)], None),  # a diverged epoch's score too
        ([("error", float("nan")), ("diverged", 0.41), ("early-stopped", 0.25)], 0.25),
    ],
)
def test_the_search_run_has_a_best_score_only_with_a_usable_trial(tmp_path, rows, best):
    # Users sort searches by best_val_dice in MLflow: a search with no usable trial has no
    # score (the column left empty), not 0.0, which would rank it as a real, poor one.
    from bldseg.tune import tracking
    from bldseg.tune.runner import _finish_parent

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("s")).info.run_id
    tracker = tracking.Tracker(uri, "search")
    _finish_parent(tracker, run_id, tmp_path, _trials(rows), wall=10.0, train_s=3.0, slots=1)
    tracker.close()
    assert tracker.error is None
    run = client.get_run(run_id)
    assert run.data.metrics["trials"] == len(rows)
    assert run.data.metrics["trials_usable"] == (best is not None)
    assert run.info.status == ("FAILED" if best is None else "FINISHED")
    scores = {k: v for k, v in run.data.metrics.items() if k.startswith("best_")}
    assert scores == ({} if best is None else {"best_val_dice": pytest.approx(best)})


def test_a_search_that_cannot_start_ends_its_mlflow_run(small_world, tmp_path, capsys, monkeypatch):
    # --storage under a regular file: the results folder cannot be made, after the search's
    # MLflow run was created. The run must not stay RUNNING.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    spec = spec_for(small_world, tmp_path, trials=1, epochs=1, name="nowhere")
    with pytest.raises(OSError, match="Not a directory"):
        run_search(replace(spec, storage=str(tmp_path / "afile" / "runs")))
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("bldseg").experiment_id])
    assert [(r.info.run_name, r.info.status) for r in runs] == [("nowhere", "FAILED")]
    # the command refuses such a --storage before Ray or the tracking store (exit 2)
    (tmp_path / "mlflow.db").unlink()
    argv = ["--data", str(small_world.root), "--data-root", str(small_world.root.parent)]
    argv += ["--trials", "1", "--epochs", "1", "--name", "nowhere"]
    argv += ["--storage", str(tmp_path / "afile" / "runs")]
    with pytest.raises(SystemExit) as e:
        cli.main("augmentation", "test", argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"{tmp_path / 'afile'} is a file; give a folder" in err, err
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(
    "field, flag", [("cpus_per_trial", "--cpus-per-trial"), ("gpus_per_trial", "--gpus-per-trial")]
)
def test_a_trial_the_cluster_cannot_place_is_refused(
    small_world, ray_session, tmp_path, field, flag
):
    # Ray waits forever for resources the cluster does not have, logging once a minute
    with pytest.raises(ValueError, match=f"{flag} 64: the Ray cluster has .* in all"):
        run_search(spec_for(small_world, tmp_path, trials=1, epochs=1, **{field: 64}))


def mixed_space(trial):
    """Module level: Tune pickles the searcher with its space."""
    trial.suggest_float("aug.vflip_p", 0.0, 0.5)
    if trial.number % 2 == 0:
        trial.suggest_int("seed", 1, 3)  # a whole number that only this trial has
        return None
    return {"pretrained": MISSING}  # the trial fails as it starts


@pytest.fixture(scope="module")
def mixed_search(small_world, ray_session, tmp_path_factory):
    """The CLI's output for a search whose two trials have different keys; one trains, the
    other fails: ``(exit status, stdout, results folder)``."""
    from bldseg import tune_spaces

    tmp = tmp_path_factory.mktemp("mixed")
    argv = ["--data", str(small_world.root), "--data-root", str(small_world.root.parent)]
    argv += ["--trials", "2", "--epochs", "1", "--scheduler", "fifo", "--search", "random"]
    argv += ["--max-concurrent", "1", "--name", "mixed", "--storage", str(tmp / "runs")]
    argv += ["--tracking-uri", f"sqlite:///{tmp}/mlflow.db"]
    for k, v in BASE.items():
        argv += ["--set", f"{k}={json.dumps(v)}"]
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as m, contextlib.redirect_stdout(out):
        m.setitem(tune_spaces.SPACES, "augmentation", mixed_space)
        status = cli.main("augmentation", "test", argv)
    return status, out.getvalue(), tmp / "runs" / "mixed"


def test_cli_says_why_each_failed_trial_failed(mixed_search):
    status, out, _ = mixed_search
    assert status == 0, out  # one trial completed
    # under the table, before the best trial
    table = out.split("=== mixed: 2 trials ===", 1)[1].split("\nbest trial", 1)[0]
    (failed,) = [line for line in table.splitlines() if line.startswith("  trial ")]
    assert " error: " in failed and NOT_FOUND in failed, failed


def test_cli_prints_the_best_trials_own_config(mixed_search):
    # The table's config/ columns hold both trials' keys; the best trial's config is its own:
    # valid JSON (no NaN for the other trial's keys), whole numbers as numbers, as --set takes.
    _, out, exp = mixed_search
    best = out.split("\nbest trial ", 1)[1].split(":", 1)[0]
    line = next(ln for ln in out.splitlines() if ln.startswith("  config: "))
    config = json.loads(line.removeprefix("  config: "), parse_constant=pytest.fail)  # NaN fails
    assert set(config) == {"aug.vflip_p", "seed"} and isinstance(config["seed"], int), config
    assert config == json.loads((exp / f"trial_{best}" / "params.json").read_text())


@pytest.mark.parametrize("flag", ["--trials", "--epochs"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_counts_below_one_are_usage_errors(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        cli.build_parser("augmentation", "test").parse_args([flag, value])
    assert e.value.code == 2
    assert f"argument {flag}: {int(value)} is below 1" in capsys.readouterr().err


@pytest.mark.parametrize("field", ["trials", "epochs"])
def test_run_search_rejects_counts_below_one(small_world, tmp_path, field):
    with pytest.raises(ValueError, match=rf"{field}=0: .* at least 1"):
        run_search(spec_for(small_world, tmp_path, **{field: 0}))
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "change", [{"grace_period": 0}, {"reduction_factor": 1}], ids=["grace", "factor"]
)
def test_run_search_rejects_an_asha_that_cannot_stop(small_world, tmp_path, change):
    with pytest.raises(ValueError, match=r"ASHA needs .*--grace-period, --reduction-factor"):
        run_search(spec_for(small_world, tmp_path, scheduler="asha", **change))
    assert not (tmp_path / "runs").exists()


def _json(url: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def _kill_after_first_trial_run(url: str, experiment: str, proc, killed: threading.Event) -> None:
    """Kills the server as soon as the first trial's MLflow run exists (it is about to train)."""
    api = url + "/api/2.0/mlflow"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            exp = _json(f"{api}/experiments/get-by-name?experiment_name={experiment}")
            runs = _json(
                f"{api}/runs/search", {"experiment_ids": [exp["experiment"]["experiment_id"]]}
            ).get("runs", [])
            tags = [t["key"] for r in runs for t in r["data"].get("tags", [])]
            if "mlflow.parentRunId" in tags:
                stop_mlflow_server(proc, signal.SIGKILL)
                killed.set()
                return
        except OSError:  # the experiment does not exist yet
            pass
        time.sleep(0.2)


def test_dead_tracking_server_does_not_hang_the_search(small_world, ray_session, tmp_path):
    proc, url = start_mlflow_server(tmp_path / "mlflow")
    killed = threading.Event()
    killer = threading.Thread(
        target=_kill_after_first_trial_run, args=(url, "outage", proc, killed), daemon=True
    )
    killer.start()
    try:
        t0 = time.perf_counter()
        result = run_search(
            spec_for(
                small_world,
                tmp_path,
                name="outage",
                experiment="outage",
                tracking_uri=url,
                trials=2,
                epochs=3,
                max_concurrent=1,
                # every Tracker (the trials' and the search's) waits this long, not the default
                tracking_timeout_s=8.0,
            )
        )
        wall = time.perf_counter() - t0
    finally:
        stop_mlflow_server(proc, signal.SIGKILL)
    assert killed.is_set(), "the server was not killed mid-search"
    # a bound on a hang, not a speed test: MLflow alone would retry each call for minutes
    assert wall < 120, wall
    # the trials trained on without MLflow
    assert list(result.table["status"]) == ["completed", "completed"], result.table.to_dict()
    assert result.n_completed == 2
    for run_dir in result.table["run_dir"]:
        assert (Path(run_dir) / "best.pt").is_file()
        assert json.loads((Path(run_dir) / "history.json").read_text())[-1]["epoch"] == 3
    # each failure reported once: one line per trial, one for the search's own logging
    trials = set(result.table["trial_id"])
    assert set(result.tracking_errors) == trials | {"search"}, result.tracking_errors
    for t in trials:
        run_dir = tmp_path / "runs" / "outage" / f"trial_{t}" / "run"
        assert len((run_dir / TRACKING_ERROR_FILE).read_text().splitlines()) == 1
    port = url.rsplit(":", 1)[1]
    assert all(port in m for m in result.tracking_errors.values()), result.tracking_errors


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--cpus-per-trial", "0"),
        ("--cpus-per-trial", "-1"),
        ("--cpus-per-trial", "nan"),
        ("--gpus-per-trial", "-0.5"),
        ("--gpus-per-trial", "nan"),
    ],
)
def test_resources_no_trial_could_use_are_usage_errors(flag, value, capsys):
    # -0.5 GPUs left every trial PENDING forever; 0 or -1 CPUs failed inside Ray
    with pytest.raises(SystemExit) as e:
        cli.build_parser("augmentation", "test").parse_args([flag, value])
    assert e.value.code == 2
    assert f"argument {flag}: {value}: must be " in capsys.readouterr().err


@pytest.mark.parametrize(
    "field, value, flag",
    [
        ("cpus_per_trial", 0.0, "--cpus-per-trial"),
        ("cpus_per_trial", -1.0, "--cpus-per-trial"),
        ("gpus_per_trial", -0.5, "--gpus-per-trial"),
    ],
)
def test_run_search_rejects_resources_no_trial_could_use(small_world, tmp_path, field, value, flag):
    with pytest.raises(ValueError, match=rf"{field}={value}: .*\({flag}, e\.g\. "):
        run_search(spec_for(small_world, tmp_path, **{field: value}))
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", ["it's", "a b", "x/y", "..", ""])
def test_a_search_name_is_a_folder_name(small_world, tmp_path, name, capsys):
    # a quote in the name broke the MLflow filter --resume finds the search's run with
    with pytest.raises(SystemExit) as e:
        cli.build_parser("augmentation", "test").parse_args(["--name", name])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --name: {name!r} " in err, err
    with pytest.raises(ValueError, match=r"--name .* (letters, digits|not a folder name)"):
        run_search(spec_for(small_world, tmp_path, name=name))
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", ["tune", "ensemble"])
@pytest.mark.parametrize("name", ["", "  "])
def test_an_empty_experiment_name_is_a_usage_error(command, name, capsys):
    # the store check looked at one experiment's folder, the runs logged to another
    from bldseg.commands.ensemble import build_parser as ensemble_parser

    parser = ensemble_parser() if command == "ensemble" else cli.build_parser("aug", "test")
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--experiment", name])
    assert e.value.code == 2
    assert f"argument --experiment: {name!r}: give the MLflow experiment a name" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize("command", ["tune", "pipeline"])
def test_a_malformed_set_is_a_usage_error(command, capsys):
    # exit 1 means "no trial completed"; a bad flag is a usage error, 2
    from bldseg.commands.pipeline import main as pipeline_main

    run = pipeline_main if command == "pipeline" else lambda a: cli.main("augmentation", "t", a)
    with pytest.raises(SystemExit) as e:
        run(["--set", "foo"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    # argparse's "argument --set: 'foo': ..." for the search, the pipeline's own "--set 'foo'"
    assert "--set" in err and "'foo': expected key=value, e.g. --set optim.lr=1e-3" in err, err


def test_a_deleted_experiment_is_named_with_how_to_restore_it(
    small_world, tmp_path, capsys, monkeypatch
):
    # deleted in the MLflow UI: MLflow neither logs into it nor creates it again (a traceback)
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp_id = client.create_experiment("bldseg")
    client.delete_experiment(exp_id)
    argv = ["--data", str(small_world.root), "--data-root", str(small_world.root.parent)]
    argv += ["--trials", "1", "--epochs", "1", "--storage", str(tmp_path / "runs")]
    argv += ["--tracking-uri", uri]
    assert cli.main("augmentation", "test", argv) == 2
    err = capsys.readouterr().err
    # one line (the others on stderr are MLflow's and the data's own logs)
    (line,) = [ln for ln in err.splitlines() if "error" in ln.lower()]
    assert "Traceback" not in err and line.startswith(
        f"error: MLflow experiment 'bldseg' (id {exp_id}) is deleted"
    ), err
    assert f"MLFLOW_TRACKING_URI={uri} mlflow experiments restore --experiment-id {exp_id}" in line
    assert "--experiment NAME" in line
    assert not (tmp_path / "runs").exists()


def test_a_pretrained_file_that_does_not_fit_is_refused_before_ray(
    small_world, tmp_path, capsys, monkeypatch
):
    # every trial failed with this error, after Ray and the data had started
    import torch

    from bldseg.models import create_model
    from bldseg.tune import runner
    from tests.models.test_pretrained import to_mmseg

    monkeypatch.chdir(tmp_path)
    sd = to_mmseg(create_model("upernet_internimage_tiny", num_classes=150).state_dict())
    del sd[next(k for k in sd if k.startswith("backbone."))]
    torch.save({"state_dict": sd, "meta": {}}, tmp_path / "bad.pth")

    def no_ray(*a, **k):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(runner, "init_ray", no_ray)
    argv = ["--data", str(small_world.root), "--data-root", str(small_world.root.parent)]
    argv += ["--trials", "1", "--epochs", "1", "--storage", str(tmp_path / "runs")]
    argv += ["--pretrained", str(tmp_path / "bad.pth")]
    for k, v in BASE.items():
        argv += ["--set", f"{k}={json.dumps(v)}"]
    state = torch.random.get_rng_state()
    assert cli.main("augmentation", "test", argv) == 2
    err = capsys.readouterr().err
    said = f"\nerror: {tmp_path / 'bad.pth'} does not fit upernet_internimage_tiny: 1 missing"
    assert said in "\n" + err, err
    assert "Traceback" not in err and not (tmp_path / "runs").exists()
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random state

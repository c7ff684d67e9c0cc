"""Ctrl-C after a search's last trial has ended, before Tune's ``fit()`` returns: the search is
recorded as finished (its results are complete), and the command still stops with exit status
130 instead of going on to what follows (the pipeline's next stages)."""

import json
import os
import signal

import pytest
from mlflow.tracking import MlflowClient

from bldseg.tune import runner
from bldseg.tune.runner import META_FILE

SETS = {
    "model": "upernet_internimage_tiny",
    "aug.crop_size": 32,
    "batch_size": 4,
    "samples_per_epoch": 16,
    "val_fraction": 0.25,
    "impl": "compiled",
}


def _data_args(world, tmp_path) -> list[str]:
    args = ["--data", str(world.root), "--data-root", str(world.root.parent)]
    args += ["--trials", "1", "--epochs", "1", "--storage", str(tmp_path / "runs")]
    args += ["--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]
    for k, v in SETS.items():
        args += ["--set", f"{k}={json.dumps(v)}"]
    return args


def _signal_as_the_first_trial_completes(monkeypatch, signum: int, check=None) -> list[str]:
    """Sends ``signum`` to this process once, from Tune's ``on_trial_complete`` of the first
    trial (in the driver's tuning loop), after ``check()``. Returns the trial ids it was sent
    at (empty: no trial completed)."""
    sent: list[str] = []
    finalise = runner._SearchDriver.finalise

    def finalise_then_signal(self, trial_id, config, error=None):
        finalise(self, trial_id, config, error)
        if not sent:
            if check is not None:
                check()
            sent.append(trial_id)
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(runner._SearchDriver, "finalise", finalise_then_signal)
    return sent


def _tunes_handler_is_in_place() -> None:
    # Tune's handler must get it: the default one would end the test session
    assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler


@pytest.fixture
def ctrl_c_as_the_trial_completes(monkeypatch):
    """SIGINT from the first trial's completion: with one trial, after the last trial has
    ended and before ``tuner.fit()`` returns, where a terminal's Ctrl-C was swallowed."""
    return _signal_as_the_first_trial_completes(
        monkeypatch, signal.SIGINT, _tunes_handler_is_in_place
    )


def _parent(client: MlflowClient, experiment: str, search: str):
    exp_id = client.get_experiment_by_name(experiment).experiment_id
    (parent,) = client.search_runs([exp_id], f"tags.`bldseg.search` = '{search}'")
    return parent


def test_tune_exits_130_with_the_finished_search_recorded(
    small_world, ray_session, tmp_path, ctrl_c_as_the_trial_completes, capsys
):
    from bldseg.commands.tune import main

    before = signal.getsignal(signal.SIGINT)
    argv = [*_data_args(small_world, tmp_path), "--scheduler", "fifo", "--name", "ended"]
    assert main("aug", argv) == 130
    err = capsys.readouterr().err
    assert ctrl_c_as_the_trial_completes, "the trial never completed"
    said = " ".join(err.split())
    assert "every trial of search 'ended' had ended" in said, err[-3000:]
    assert "recorded as finished" in said and "--resume --name ended" in said, err[-3000:]
    # finished, not interrupted: the session, the trial table, the MLflow runs
    exp = tmp_path / "runs" / "ended"
    sessions = json.loads((exp / META_FILE).read_text())["sessions"]
    assert [s["end"] for s in sessions] == ["finished"]
    assert (exp / "trials.csv").is_file()
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    parent = _parent(client, "bldseg", "ended")
    assert parent.info.status == "FINISHED"
    (child,) = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert child.info.status == "FINISHED" and child.data.tags["bldseg.status"] == "completed"
    # Tune leaves its handler installed after a fit() it was not signalled in (a later Ctrl-C
    # only set its spent flag): the handler from before the search is back either way
    assert signal.getsignal(signal.SIGINT) is before

    # --resume, as the message says: the table of the finished search, nothing trained again
    assert main("aug", [*argv, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "=== ended: 1 trials ===" in out, out[-3000:]
    again = json.loads((exp / META_FILE).read_text())["sessions"]
    assert again == sessions
    assert signal.getsignal(signal.SIGINT) is before


def test_pipeline_records_the_finished_stage_and_starts_no_other(
    small_world, ray_session, tmp_path, ctrl_c_as_the_trial_completes, monkeypatch
):
    from bldseg.commands.pipeline import main

    monkeypatch.chdir(tmp_path)
    argv = [*_data_args(small_world, tmp_path), "--name", "pl", "--out", str(tmp_path / "out")]
    assert main([*argv, "--k-min", "1", "--k-max", "1"]) == 130
    assert ctrl_c_as_the_trial_completes, "the trial never completed"
    state = json.loads((tmp_path / "out" / "pl" / "pipeline_state.json").read_text())
    # the search had finished: its stage is recorded, so the same command goes on from it
    assert list(state["stages"]) == ["tune_aug"]
    assert "ensemble" not in state and "predict" not in state
    storage = tmp_path / "runs" / "pl"
    assert sorted(p.name for p in storage.iterdir()) == ["pl-tune_aug"]  # tune_sched never ran
    sessions = json.loads((storage / "pl-tune_aug" / META_FILE).read_text())["sessions"]
    assert [s["end"] for s in sessions] == ["finished"]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert _parent(client, "pl", "pl-tune_aug").info.status == "FINISHED"
    assert client.get_run(state["pipeline_run_id"]).info.status == "KILLED"


@pytest.fixture
def sigterm_as_the_trial_completes(monkeypatch):
    """As :func:`ctrl_c_as_the_trial_completes`, with SIGTERM, a job scheduler's stop (Slurm
    at its time limit, ``timeout``); one that reached no handler of ours fails the test (by
    default it would end the session). Returns the trial ids it was sent at."""
    sent = _signal_as_the_first_trial_completes(monkeypatch, signal.SIGTERM)

    def unhandled(signum, frame):
        raise AssertionError("SIGTERM reached no handler of bldseg's")

    before = signal.signal(signal.SIGTERM, unhandled)
    yield sent
    signal.signal(signal.SIGTERM, before)


def test_sigterm_ends_a_search_as_ctrl_c_does(
    small_world, ray_session, tmp_path, sigterm_as_the_trial_completes, capsys
):
    # A search stopped by SIGTERM left its MLflow runs RUNNING and its trials "running": the
    # process ended where it stood. Tune's own Ctrl-C path now stops it and records it.
    from bldseg.commands.tune import main

    argv = [*_data_args(small_world, tmp_path), "--scheduler", "fifo", "--name", "termed"]
    assert main("aug", argv) == 130
    assert sigterm_as_the_trial_completes, "the trial never completed"
    said = " ".join(capsys.readouterr().err.split())
    assert "recorded as finished" in said and "--resume --name termed" in said, said[-3000:]
    sessions = json.loads((tmp_path / "runs" / "termed" / META_FILE).read_text())["sessions"]
    assert [s["end"] for s in sessions] == ["finished"]
    parent = _parent(MlflowClient(f"sqlite:///{tmp_path}/mlflow.db"), "bldseg", "termed")
    assert parent.info.status == "FINISHED"


def test_sigterm_stops_the_pipeline_as_ctrl_c_does(
    small_world, ray_session, tmp_path, sigterm_as_the_trial_completes, monkeypatch, capsys
):
    # The pipeline runs its searches itself, not through `bldseg tune`'s handler: without one
    # of its own, a job scheduler's stop ended it where it stood, its MLflow run RUNNING.
    from bldseg.commands.pipeline import main

    monkeypatch.chdir(tmp_path)
    before = signal.getsignal(signal.SIGTERM)
    argv = [*_data_args(small_world, tmp_path), "--name", "pt", "--out", str(tmp_path / "out")]
    assert main([*argv, "--k-min", "1", "--k-max", "1"]) == 130
    assert sigterm_as_the_trial_completes, "the trial never completed"
    said = " ".join(capsys.readouterr().err.split())
    assert "interrupted; run the same command again" in said, said[-3000:]
    state = json.loads((tmp_path / "out" / "pt" / "pipeline_state.json").read_text())
    assert list(state["stages"]) == ["tune_aug"]  # finished, so recorded; nothing after it
    assert sorted(p.name for p in (tmp_path / "runs" / "pt").iterdir()) == ["pt-tune_aug"]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert _parent(client, "pt", "pt-tune_aug").info.status == "FINISHED"
    assert client.get_run(state["pipeline_run_id"]).info.status == "KILLED"
    assert signal.getsignal(signal.SIGTERM) is before  # the handler from before is back


def test_sigusr1_interrupts_a_search_as_ctrl_c_does(
    small_world, ray_session, tmp_path, monkeypatch, capsys
):
    # Tune stops a search on SIGUSR1 too (Slurm's --signal=USR1@..., kill -USR1). Only a
    # SIGINT was noted as an interrupt: the search was recorded as finished, exit 0, and its
    # unstarted trial was never trained, with "--resume would train no other" (false).
    from bldseg.commands.tune import main

    sent = _signal_as_the_first_trial_completes(monkeypatch, signal.SIGUSR1)
    before = signal.getsignal(signal.SIGUSR1)
    argv = [*_data_args(small_world, tmp_path), "--trials", "3", "--scheduler", "fifo"]
    argv += ["--max-concurrent", "1", "--name", "usr1"]
    assert main("aug", argv) == 130
    assert sent, "no trial completed"
    said = " ".join(capsys.readouterr().err.split())
    assert "--resume --name usr1" in said and "not interrupted" not in said, said[-3000:]
    sessions = json.loads((tmp_path / "runs" / "usr1" / META_FILE).read_text())["sessions"]
    assert [s["end"] for s in sessions] == ["interrupted"]
    # Tune leaves its SIGUSR1 handler installed: the one from before the search is back
    assert signal.getsignal(signal.SIGUSR1) is before


def test_sigterm_after_ray_starts_is_still_ctrl_c(tmp_path):
    # ray.init sets its own SIGTERM handler (and its core worker a native crash handler) over
    # the command's: a job scheduler's SIGTERM aborted a search with exit 134, its MLflow runs
    # left RUNNING. The tests above start Ray before the command sets its handler, so it won.
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import os, signal, sys, time
        from bldseg.commands import sigterm_as_ctrl_c
        from bldseg.tune.runner import init_ray

        with sigterm_as_ctrl_c():
            init_ray(num_cpus=1)
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(30)
            except KeyboardInterrupt:
                print("stopped as Ctrl-C", flush=True)
                sys.exit(130)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert r.returncode == 130 and "stopped as Ctrl-C" in r.stdout, (r.returncode, r.stderr[-2000:])

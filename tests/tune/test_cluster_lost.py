"""A search whose Ray cluster goes away: Ray ended the driver itself after 60 s (exit 1, the
MLflow runs left RUNNING, the session's wall time lost); bldseg's ClusterWatch acts first."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bldseg.tune.runner import EXIT_CLUSTER_LOST, ClusterWatch
from tests.tune.servers import start_ray_head, stop_ray_head
from tests.tune.test_runner import BASE, REPO


def test_the_watch_calls_on_lost_once_the_head_stops_accepting_connections():
    server = socket.create_server(("127.0.0.1", 0))
    address = f"127.0.0.1:{server.getsockname()[1]}"
    lost: list[float] = []
    called = threading.Event()

    def on_lost(silent_s: float) -> None:
        lost.append(silent_s)
        called.set()

    with ClusterWatch(address, on_lost, after=0.6, period=0.1):
        time.sleep(1.0)  # answering: longer than `after`, and nothing is called
        assert lost == []
        server.close()  # the head is gone: nothing listens on its port any more
        assert called.wait(timeout=5)
        time.sleep(0.3)
    assert len(lost) == 1 and lost[0] >= 0.6  # once, after `after` seconds of silence


def test_a_finished_watch_never_calls_on_lost():
    server = socket.create_server(("127.0.0.1", 0))
    lost: list[float] = []
    with ClusterWatch(f"127.0.0.1:{server.getsockname()[1]}", lost.append, after=0.2, period=0.05):
        time.sleep(0.2)
    server.close()
    time.sleep(0.4)
    assert lost == []


def _wait_for_an_epoch(search: subprocess.Popen, runs: Path, timeout: float = 300) -> None:
    """Waits until a trial of the search in ``runs`` has trained an epoch (its history)."""
    deadline = time.monotonic() + timeout
    while not list(runs.glob("trial_*/run/history.json")):
        assert search.poll() is None, search.communicate()
        assert time.monotonic() < deadline, f"no epoch finished in {timeout:.0f} s"
        time.sleep(0.5)


@pytest.mark.slow
def test_a_search_whose_cluster_dies_ends_resumable_and_says_so(small_world, tmp_path):
    from mlflow.tracking import MlflowClient

    head, port, env, temp = start_ray_head(tmp_path)
    search = None
    try:
        args = [sys.executable, str(REPO / "experiments" / "tune_aug.py")]
        args += ["--data", str(small_world.root), "--trials", "1", "--epochs", "30"]
        args += ["--scheduler", "fifo", "--address", f"127.0.0.1:{port}"]
        args += ["--storage", str(tmp_path / "runs"), "--name", "lost"]
        args += ["--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]
        for k, v in BASE.items():
            args += ["--set", f"{k}={json.dumps(v)}"]
        search = subprocess.Popen(
            args,
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # the cluster goes once the trial has trained an epoch (its run folder's history)
        runs = tmp_path / "runs" / "lost"
        _wait_for_an_epoch(search, runs)
        killed = time.monotonic()
        os.killpg(head.pid, signal.SIGKILL)
        _, err = search.communicate(timeout=120)
        waited = time.monotonic() - killed
    finally:
        if search is not None and search.poll() is None:
            search.kill()
        stop_ray_head(head, temp)
    assert search.returncode == EXIT_CLUSTER_LOST, err[-3000:]
    assert waited < 60, waited  # before Ray's own 60 s end of the driver
    assert f"the Ray cluster at 127.0.0.1:{port} has not answered for" in err
    assert "continue it with --resume --name lost" in err
    # what a resume needs is closed: the runs KILLED (not RUNNING), this session recorded
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = [e.experiment_id for e in client.search_experiments()]
    statuses = {r.info.run_name: r.info.status for r in client.search_runs(exp)}
    assert statuses["lost"] == "KILLED" and set(statuses.values()) == {"KILLED"}, statuses
    sessions = json.loads((runs / "bldseg_search.json").read_text())["sessions"]
    assert [s["end"] for s in sessions] == ["cluster lost"] and sessions[0]["wall_s"] > 0


@pytest.mark.slow
def test_a_stop_signal_to_the_whole_process_group_is_an_interrupt(small_world, tmp_path):
    # Slurm and `timeout` signal the job's whole process group: the search's local Ray servers
    # died with it, and the search ended as a lost cluster ("restart the cluster", exit 3) or,
    # before its handler was set again after ray.init, aborted (exit 134, runs RUNNING).
    from mlflow.tracking import MlflowClient

    args = [sys.executable, str(REPO / "experiments" / "tune_aug.py")]
    args += ["--data", str(small_world.root), "--trials", "1", "--epochs", "30"]
    args += ["--scheduler", "fifo", "--storage", str(tmp_path / "runs"), "--name", "stopped"]
    args += ["--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]
    for k, v in BASE.items():
        args += ["--set", f"{k}={json.dumps(v)}"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    search = subprocess.Popen(
        args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its own process group, as a scheduler's job step
    )  # fmt: skip
    try:
        _wait_for_an_epoch(search, tmp_path / "runs" / "stopped")
        os.killpg(search.pid, signal.SIGTERM)
        _, err = search.communicate(timeout=120)
    finally:
        if search.poll() is None:
            os.killpg(search.pid, signal.SIGKILL)
    assert search.returncode == 130, err[-3000:]
    assert "interrupted: the stop signal also ended this search's local Ray instance" in err
    assert "continue it with --resume --name stopped" in err
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = [e.experiment_id for e in client.search_experiments()]
    statuses = {r.info.run_name: r.info.status for r in client.search_runs(exp)}
    assert statuses["stopped"] == "KILLED" and set(statuses.values()) == {"KILLED"}, statuses


def test_a_local_ray_started_by_an_earlier_search_is_still_known_as_local(monkeypatch):
    # A pipeline's later stages find Ray initialised by the first: "not ray.is_initialized()"
    # took their local instance for a cluster, and a stop signal for a lost cluster (exit 3).
    from bldseg.tune import runner

    class Ray:
        def init(self, **kwargs):
            self.kwargs = kwargs

    monkeypatch.setitem(runner._RAY_STARTED_HERE, "local", False)
    runner._init(Ray(), None, "RAY_ADDRESS", {})
    assert runner._RAY_STARTED_HERE["local"] is True
    monkeypatch.setattr(runner, "check_ray_address", lambda address, flag: None)
    runner._init(Ray(), "10.0.0.1:6379", "--address", {})
    assert runner._RAY_STARTED_HERE["local"] is False

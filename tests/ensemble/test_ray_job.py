"""The README's cluster recipe ends with the ensemble search as a Ray job: `ray job submit
--address http://<head>:8265 --working-dir . -- python -m bldseg ensemble ...`. Here on a real
`ray start --head` with its job server (the `cluster` extra: Ray's minimal install starts the head
without one, and the submission could not connect), on 127.0.0.1."""

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from bldseg.ensemble.synthetic import fake_library, write_runs
from tests.conftest import free_port
from tests.tune.servers import BIN, start_ray_head, stop_ray_head

REPO = Path(__file__).resolve().parents[2]


def _wait_for_job_server(url: str, head: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2).read()
            return
        except urllib.error.HTTPError:
            return  # it answers (401 without the cluster's token): the job client has it
        except OSError:
            assert head.poll() is None, "the Ray head exited"
            time.sleep(1)
    pytest.fail(f"the Ray job server at {url} did not answer in {timeout:.0f} s")


def _submit(url: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    # the job's python is this environment's: the README's `python` is the activated venv's
    command = [str(BIN / "ray"), "job", "submit", "--address", url, "--working-dir", str(REPO)]
    command += ["--", sys.executable, "-m", "bldseg", "ensemble", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_the_ensemble_search_runs_as_a_ray_job(tmp_path):
    runs = tmp_path / "runs"
    write_runs(fake_library(4, 24, 16, seed=3, tiles_per_image=2), runs)
    dashboard = free_port()
    head, _port, env, temp = start_ray_head(tmp_path, dashboard_port=dashboard)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for_job_server(url, head)
        out = tmp_path / "ensemble"
        uri = f"sqlite:///{tmp_path}/mlflow.db"
        flags = ["-k", "2", "--workers", "2", "--no-progress", "--tracking-uri", uri]
        r = _submit(url, env, "--runs", str(runs), "--out", str(out), *flags)
        log = r.stdout + r.stderr
        assert r.returncode == 0, log
        assert "succeeded" in log, log
        summary = json.loads((out / "summary.json").read_text())
        assert summary["best"]["k"] == 2 and (out / "submit.json").is_file()
        assert "relative to the current folder" not in log, log  # every path absolute
        # a job that fails ends FAILED, with bldseg's one-line error in its logs, and the
        # submitting command exits non-zero; a relative --out would land in Ray's copy of the
        # working folder: the job's log says so (Ray's job environment is what tells)
        r = _submit(url, env, "--runs", str(tmp_path / "nowhere"), "--out", "ensemble", *flags)
        log = r.stdout + r.stderr
        assert r.returncode != 0, log
        assert "search results folder not found" in log and "failed" in log.lower(), log
        assert "--out ensemble is relative to the current folder, here the Ray job's" in log, log
    finally:
        stop_ray_head(head, temp)

"""The whole job: honest split, outputs, MLflow run, spec; and the CLI on a real Ray cluster."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from bldseg.ensemble.run import SearchConfig, evaluate, run_search
from bldseg.ensemble.search import brute_force
from bldseg.ensemble.synthetic import fake_library, write_runs
from bldseg.predict import EnsembleSpec
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("ens")
    lib = fake_library(6, 24, 16, seed=3, tiles_per_image=2)
    write_runs(lib, root / "results")
    test = fake_library(6, 12, 16, seed=4)
    write_runs(test, root / "results", file_name="test_probs.npz")
    return root, lib, test


def test_run_search_outputs_and_mlflow(results):
    root, _lib, test = results
    out = root / "out"
    uri = "sqlite:///" + str((root / "mlflow.db").resolve())
    cfg = SearchConfig(
        runs=str(root / "results"),
        k=[2, 3],
        top=5,
        out=str(out),
        tracking_uri=uri,
        parent_run_id="parent123",
        progress=False,
    )
    s = run_search(cfg)
    table = pd.read_csv(out / "top_ensembles.csv")
    assert len(table) == 5 and list(table["position"]) == [1, 2, 3, 4, 5]
    assert {"selection_dice", "check_dice", "test_dice", "threshold", "members"} <= set(table)
    assert table["selection_dice"].is_monotonic_decreasing
    for name in ("score_vs_k.png", "threshold_curve.png", "summary.json", "best_ensemble.json"):
        assert (out / name).stat().st_size > 0
    assert not list(out.glob("*.tmp*"))

    # chosen on the selection half exactly as brute force on that half would choose
    from bldseg.ensemble.library import find_runs, load_library, split_by_image

    full = load_library(find_runs(root / "results"), root=root / "results")
    sel_idx, chk_idx = split_by_image(full.image_ids, 0.5, 0)
    want = brute_force(full.subset(sel_idx), [2, 3])[0]
    assert s.best["member_ids"] == " ".join(map(str, want.members))
    assert s.best["selection_dice"] == want.score
    assert s.best["check_dice"] == evaluate(full.subset(chk_idx), want.members, want.level)
    assert s.best["test_dice"] == evaluate(test, want.members, want.level)
    assert "check_dice" in s.best_single and "test_dice" in s.best_single

    spec = EnsembleSpec.load(out / "best_ensemble.json")
    assert [Path(c).parent.name for c in spec.checkpoints] == [
        f"trial_model{m:02d}" for m in want.members
    ]
    assert spec.weights == [1.0] * want.k and spec.threshold == want.level / (255 * want.k)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(s.mlflow_run_id)
    assert run.data.tags["mlflow.parentRunId"] == "parent123"
    assert run.data.metrics["ensemble_selection_dice"] == want.score
    assert run.data.params["best_threshold"] == str(want.level / (255 * want.k))
    arts = {a.path for a in client.list_artifacts(s.mlflow_run_id)}
    assert {"top_ensembles.csv", "score_vs_k.png", "threshold_curve.png"} <= arts


def test_greedy_job(results):
    root, _, _ = results
    cfg = SearchConfig(
        runs=str(root / "results"),
        method="greedy",
        greedy_size=4,
        out=str(root / "greedy"),
        progress=False,
    )
    s = run_search(cfg)
    spec = EnsembleSpec.load(root / "greedy" / "best_ensemble.json")
    assert len(spec.checkpoints) == len(s.best["member_ids"].split())


def test_cli_bad_k_message(results):
    root, _, _ = results
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "experiments/ensemble_search.py"),
            "--runs",
            str(root / "results"),
            "-k",
            "9",
            "--workers",
            "0",
            "--out",
            str(root / "bad"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0
    assert "k=9 is larger than the library, which holds 6 model(s)" in r.stderr


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else "ray start exited"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"the Ray head did not open port {port} in {timeout} s")


def test_cli_two_workers_on_a_real_local_ray_cluster(results, tmp_path):
    root, _, _ = results
    port = free_port()
    ray = str(Path(sys.executable).parent / "ray")
    # Our own cluster, isolated from the pytest process's Ray and from other users' clusters:
    # no RAY_ADDRESS, token auth off (it would share ~/.ray/auth_token), a private temp dir.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: socket paths are limited
    # --block keeps `ray start` in the foreground; terminating it stops exactly this cluster
    # (a plain `ray stop` would stop every Ray cluster of this user on the machine).
    head = subprocess.Popen(
        [
            ray,
            "start",
            "--head",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=false",
            f"--temp-dir={temp}",
            "--disable-usage-stats",
            "--node-ip-address=127.0.0.1",
            "--block",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        _wait_for_port(port, head)
        out = tmp_path / "cluster"
        r = subprocess.run(
            [
                sys.executable,
                str(REPO / "experiments/ensemble_search.py"),
                "--runs",
                str(root / "results"),
                "--k-range",
                "2",
                "3",
                "--address",
                f"127.0.0.1:{port}",
                "--workers",
                "2",
                "--top",
                "5",
                "--out",
                str(out),
                "--no-progress",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
            cwd=REPO,
        )
        assert r.returncode == 0, r.stdout + r.stderr[-3000:]
        local = run_search(
            SearchConfig(
                runs=str(root / "results"),
                k=[2, 3],
                top=5,
                out=str(tmp_path / "local"),
                progress=False,
            )
        )
        got = pd.read_csv(out / "top_ensembles.csv")
        pd.testing.assert_frame_equal(got, pd.read_csv(tmp_path / "local/top_ensembles.csv"))
        assert (
            json.loads((out / "summary.json").read_text())["best"]
            == json.loads((tmp_path / "local/summary.json").read_text())["best"]
        )
        assert local.best["member_ids"] == got["member_ids"][0]
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait(timeout=30)
        shutil.rmtree(temp, ignore_errors=True)

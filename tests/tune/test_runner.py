"""Integration tests of the search runner: real Ray, a real MLflow server, the real op."""

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from bldseg.tune.runner import SearchSpec, run_search
from tests.conftest import free_port

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
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = open(root / "server.log", "w")  # noqa: SIM115  (open for the server's lifetime)
    proc = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{root}/mlflow.db",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(url + "/health", timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError((root / "server.log").read_text()) from None
            time.sleep(0.5)
    else:
        raise RuntimeError("mlflow server did not start: " + (root / "server.log").read_text())
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)
    log.close()


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


def test_search_is_logged_to_mlflow_server(small_world, ray_session, mlflow_server, tmp_path):
    result = run_search(spec_for(small_world, tmp_path, name="it", tracking_uri=mlflow_server))
    assert len(result.table) == 2 and set(result.table["status"]) == {"completed"}
    api = mlflow_server + "/api/2.0/mlflow"
    exp = _get(f"{api}/experiments/get-by-name?experiment_name=it")["experiment"]
    runs = _post(f"{api}/runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
    assert len(runs) == 3  # the parent and one child per trial, no duplicates
    tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
    parents = [r for r, t in zip(runs, tags, strict=True) if t.get("bldseg.kind") == "search"]
    assert len(parents) == 1
    parent_id = parents[0]["info"]["run_id"]
    assert parents[0]["info"]["status"] == "FINISHED"
    children = [
        (r, t) for r, t in zip(runs, tags, strict=True) if t.get("mlflow.parentRunId") == parent_id
    ]
    assert len(children) == 2
    for run, t in children:
        rid = run["info"]["run_id"]
        assert run["info"]["status"] == "FINISHED"
        assert t["model"] == "upernet_internimage_tiny" and t["data_fingerprint"]
        assert t["git_commit"]
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        assert params["aug.crop_size"] == "64" and "aug.scale_limit" in params
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


def test_unreachable_tracking_server_fails_fast(small_world, tmp_path):
    spec = spec_for(small_world, tmp_path, tracking_uri=f"http://127.0.0.1:{free_port()}")
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"not reachable.*The search was not started"):
        run_search(spec)
    assert time.perf_counter() - t0 < 60
    assert not (tmp_path / "runs").exists()


def test_invalid_base_is_rejected_before_trials(small_world, tmp_path):
    spec = spec_for(small_world, tmp_path, base={**BASE, "aug.scale_p": 3.0})
    with pytest.raises(ValueError, match=r"scale_p=3\.0"):
        run_search(spec)
    assert not (tmp_path / "runs").exists()


def faulty_space(trial):
    """Module level: Tune pickles the searcher with its space."""
    trial.suggest_float("aug.vflip_p", 0.0, 0.5)
    # trial 0 trains normally; trial 1 diverges (absurd weight decay); trial 2 errors at
    # run time (crop larger than the 96-px images), is retried once, and stays errored
    return [
        {},
        {"optim.weight_decay": 1e6, "optim.lr": 0.5, "sched.name": "constant"},
        {"aug.crop_size": 160},
    ][trial.number % 3]  # validate_space samples more than 3


def test_erroring_and_diverging_trials(small_world, ray_session, tmp_path, monkeypatch):
    import tune_spaces

    monkeypatch.setitem(tune_spaces.SPACES, "augmentation", faulty_space)
    result = run_search(
        spec_for(small_world, tmp_path, trials=3, max_concurrent=1, search="random")
    )
    status = dict(zip(result.table["trial_id"], result.table["status"], strict=True))
    assert sorted(status.values()) == ["completed", "diverged", "error"]
    diverged = result.table[result.table["status"] == "diverged"].iloc[0]
    summary = json.loads((Path(diverged["run_dir"]) / "summary.json").read_text())
    assert summary["status"] == "diverged" and "became nan" in summary["message"]


def _trial_dirs(exp: Path) -> dict[str, dict]:
    out = {}
    for s in exp.glob("trial_*/run/summary.json"):
        out[s.parent.parent.name] = json.loads(s.read_text())
    return out


def test_interrupted_search_resumes_without_rerunning(small_world, tmp_path):
    """Ctrl-C after the first trial finished; --resume completes the rest, nothing re-run."""
    db = f"sqlite:///{tmp_path}/mlflow.db"
    args = [
        sys.executable,
        str(REPO / "experiments" / "tune_aug.py"),
        "--data",
        str(small_world.root),
        "--trials",
        "3",
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
    # its own Ray: a subprocess cannot join the test session's in-process Ray
    proc = subprocess.Popen(
        args,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    exp = tmp_path / "runs" / "resumable"
    deadline = time.time() + 300
    while time.time() < deadline and not _trial_dirs(exp):
        time.sleep(0.5)
    first = _trial_dirs(exp)
    assert len(first) == 1, "no trial finished in time"
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=120)
    (done_trial,) = first
    done_mtime = (exp / done_trial / "run" / "summary.json").stat().st_mtime_ns

    out = subprocess.run(
        [*args, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    after = _trial_dirs(exp)
    assert len(after) == 3 and all(s["status"] == "completed" for s in after.values())
    # the finished trial was not trained again
    assert (exp / done_trial / "run" / "summary.json").stat().st_mtime_ns == done_mtime
    from mlflow.tracking import MlflowClient

    client = MlflowClient(db)
    exp_id = client.get_experiment_by_name("resumable").experiment_id
    runs = client.search_runs([exp_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 3 and len(runs) == 4  # no duplicate runs
    for r in children:
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "val_dice_best")]
        assert sorted(steps) == [1, 2], steps  # each epoch logged once


def test_runner_joins_a_real_local_cluster(small_world, tmp_path):
    """`ray start --head` on 127.0.0.1, then the script connects with --address."""
    port = free_port()
    ray_bin = str(BIN / "ray")
    temp = Path("/tmp") / f"ray_{port}"  # short path: Ray's socket names have a length limit
    token = tmp_path / "ray_token"
    token.write_text(secrets.token_hex(32))
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        # Ray maps 127.0.0.1 to the host's network address unless told this is a one-machine
        # cluster; keep every socket on loopback.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        # a cluster started with `ray start` requires its token from every client
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
    }
    # --block keeps `ray start` in the foreground; its process group holds the whole cluster,
    # so the test can stop exactly this cluster (`ray stop` would also kill the session's Ray).
    head = subprocess.Popen(
        [
            ray_bin,
            "start",
            "--head",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(port),
            "--num-cpus",
            "2",
            "--include-dashboard=false",
            f"--temp-dir={temp}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=env,
    )
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
            "--tracking-uri",
            f"sqlite:///{tmp_path}/mlflow.db",
            "--name",
            "cluster",
        ]
        for k, v in BASE.items():
            args += ["--set", f"{k}={json.dumps(v)}"]
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
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)

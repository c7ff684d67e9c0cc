"""Real servers for the search tests: `mlflow server` (sqlite backend) and a `ray start --head`
cluster, both on 127.0.0.1."""

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.conftest import free_port

BIN = Path(sys.executable).parent


def start_mlflow_server(root: Path) -> tuple[subprocess.Popen, str]:
    """Starts a server storing under ``root``; returns ``(process, url)`` once it answers.

    The server runs in its own process group: :func:`stop_mlflow_server` (or a test that
    kills it on purpose) stops exactly it and its workers.
    """
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    with open(root / "server.log", "w") as log:  # the child keeps its own descriptor
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
            return proc, url
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError((root / "server.log").read_text()) from None
            time.sleep(0.5)
    stop_mlflow_server(proc)
    raise RuntimeError("mlflow server did not start: " + (root / "server.log").read_text())


def stop_mlflow_server(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Stops the server's process group (``sig``; SIGKILL if it does not exit in 30 s)."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def start_ray_head(
    token_dir: Path, dashboard_port: int | None = None
) -> tuple[subprocess.Popen, int, dict[str, str], Path]:
    """`ray start --head --block` on 127.0.0.1; returns ``(process, port, env, temp dir)``.

    ``env`` is what a client process needs to join it (``--address 127.0.0.1:<port>``). The
    head runs in its own process group, which holds the whole cluster: :func:`stop_ray_head`
    (or a test that kills it on purpose) stops exactly this cluster, where `ray stop` would
    also kill the test session's own Ray. With ``dashboard_port`` the head serves its
    dashboard and job server there (``ray job submit --address http://127.0.0.1:<port>``).
    """
    port = free_port()
    temp = Path("/tmp") / f"ray_{port}"  # short path: Ray's socket names have a length limit
    token = token_dir / "ray_token"
    token.write_text(secrets.token_hex(32))
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        # Ray maps 127.0.0.1 to the host's network address unless told this is a one-machine
        # cluster; keep every socket on loopback.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        # a cluster started with `ray start` requires its token from every client
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
    }
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(port),
            "--num-cpus",
            "2",
            *(
                ["--include-dashboard=false"]
                if dashboard_port is None
                else [
                    "--include-dashboard=true",
                    "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dashboard_port}",
                    # the dashboard's agent otherwise takes Ray's fixed default ports (52365
                    # ...), which another dashboard Ray on this machine may hold
                    f"--dashboard-agent-listen-port={free_port()}",
                    f"--dashboard-agent-grpc-port={free_port()}",
                    f"--metrics-export-port={free_port()}",
                    f"--runtime-env-agent-port={free_port()}",
                ]
            ),
            f"--temp-dir={temp}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=env,
    )
    return head, port, env, temp


def stop_ray_head(head: subprocess.Popen, temp: Path) -> None:
    """Stops the cluster of :func:`start_ray_head` (SIGKILL if it does not exit in 5 s).

    After SIGTERM Ray's GCS server and autoscaler monitor linger about 30 s before they exit;
    nothing in the cluster's temp folder is kept, so the test does not wait for them.
    """
    with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)  # the group's stragglers too, not only the head
    head.wait(timeout=30)
    shutil.rmtree(temp, ignore_errors=True)

"""A real `mlflow server` subprocess for the search tests (sqlite backend, 127.0.0.1)."""

import os
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

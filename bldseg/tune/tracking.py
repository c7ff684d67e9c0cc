"""MLflow plumbing for searches: one experiment per search, a parent run, one child run per trial.

The default store is an absolute ``sqlite:////<project>/mlflow.db`` (trials change directory,
so a relative URI would scatter databases). Artifacts of a sqlite store go to an absolute
``<project>/mlartifacts`` folder set on the experiment; an ``http(s)://`` tracking server stores
them itself.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
TRIAL_TAG = "bldseg.trial_id"


def default_tracking_uri(project_dir: str | os.PathLike = ".") -> str:
    """``sqlite:////abs/path/mlflow.db`` in the project folder."""
    return "sqlite:///" + str(Path(project_dir).resolve() / "mlflow.db")


def check_tracking(uri: str, timeout_s: float = 10.0) -> MlflowClient:
    """A client for ``uri`` after one round trip to it; fails fast with a clear message.

    Raises:
        RuntimeError: The tracking store cannot be reached or opened.
    """
    if uri.startswith(("http://", "https://")):
        import urllib.request

        try:  # a plain HTTP probe with a short timeout, instead of MLflow's long retries
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as r:
                r.read()
        except OSError as e:
            raise RuntimeError(
                f"MLflow tracking server {uri} is not reachable ({e}); start it (e.g. `mlflow "
                f"server --backend-store-uri sqlite:////abs/mlflow.db --host 127.0.0.1`) or "
                "pass another --tracking-uri. The search was not started."
            ) from e
    client = MlflowClient(tracking_uri=uri)
    try:
        client.search_experiments(max_results=1)
    except Exception as e:  # MLflow raises many types here; all mean "cannot use this store"
        raise RuntimeError(f"cannot use MLflow tracking store {uri}: {e}") from e
    return client


def ensure_experiment(
    client: MlflowClient, name: str, uri: str, project_dir: str | os.PathLike = "."
) -> str:
    """The id of experiment ``name``, created if missing (absolute artifact root for sqlite)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if not uri.startswith(("http://", "https://")):
        location = (Path(project_dir).resolve() / "mlartifacts" / name).as_uri()
    return client.create_experiment(name, artifact_location=location)


def git_commit(repo_dir: str | os.PathLike = ".") -> str:
    """The current git commit (with ``-dirty`` when the tree has changes), or ``unknown``."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=repo_dir,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo_dir,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        return sha + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def find_child_run(client: MlflowClient, experiment_id: str, parent_id: str, trial_id: str):
    """The child run of ``trial_id`` under ``parent_id``, or None."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'",
        max_results=2,
    )
    return runs[0] if runs else None


def get_or_create_child_run(
    client: MlflowClient,
    experiment_id: str,
    parent_id: str,
    trial_id: str,
    run_name: str,
    tags: dict[str, str],
) -> tuple[str, bool]:
    """``(run_id, created)``: a restored trial finds its run again instead of duplicating it."""
    run = find_child_run(client, experiment_id, parent_id, trial_id)
    if run is not None:
        if run.info.status != "RUNNING":
            client.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id, False
    run = client.create_run(
        experiment_id, run_name=run_name, tags={PARENT_TAG: parent_id, TRIAL_TAG: trial_id, **tags}
    )
    return run.info.run_id, True


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    """Logs a flat dict of params in batches of 100 (MLflow's limit)."""
    items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, Any], step: int) -> None:
    """Logs the numeric entries of ``metrics`` at ``step`` (non-finite values are skipped)."""
    ts = int(time.time() * 1000)
    items = [
        Metric(k, float(v), ts, step)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    ]
    if items:
        client.log_batch(run_id, metrics=items)


def set_tags(client: MlflowClient, run_id: str, tags: dict[str, Any]) -> None:
    """Sets several tags at once."""
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_artifacts(
    client: MlflowClient, run_id: str, paths: Iterable[Path], artifact_path: str | None = None
) -> None:
    """Logs existing files (missing ones are skipped)."""
    for p in paths:
        if Path(p).is_file():
            client.log_artifact(run_id, str(p), artifact_path)

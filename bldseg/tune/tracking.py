"""MLflow plumbing for searches: one experiment per project, a parent run per search, one child
run per trial.

Runs follow MLflow's own conventions, so its UI shows them as it shows any training run: the
experiment is tagged as model development (:data:`EXPERIMENT_KIND_TAG`; MLflow 3.17's UI
follows its GenAI / model-training switch instead, so links carry :data:`TRAINING_VIEW`), the
source and commit are MLflow's ``mlflow.source.*`` tags (:func:`source_tags`), the epoch is a
metric's step and never a metric of its own, and floats are rounded to
:data:`SIGNIFICANT_DIGITS` significant digits.

The default store is an absolute ``sqlite:////<project>/mlflow.db`` (trials change directory,
so a relative URI would scatter databases). Artifacts of a sqlite store go to an absolute
``mlartifacts`` folder beside the database, set on the experiment when bldseg creates it (the
project folder for the default store); an ``http(s)://`` tracking server stores them itself.
Jobs that open a sqlite store at the same moment take turns (:func:`store_lock`): MLflow
creates a new database's tables without a lock of its own.

Once a search runs, MLflow calls go through a :class:`Tracker`: they never hold up training,
and a tracking server that dies mid-search costs a bounded wait, one warning per trial, and an
incomplete MLflow record, never a hung search. (The MLflow client retries a failed request for
minutes, ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` times with exponential back-off, and reads those
settings only from environment variables; bldseg leaves them to the user and bounds its own
waits instead.)
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import math
import os
import queue
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from decimal import ROUND_FLOOR, Decimal
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from bldseg.io import file_lock

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
TRIAL_TAG = "bldseg.trial_id"
#: The parent run of a search carries its name here: ``--resume`` finds the run by it.
SEARCH_TAG = "bldseg.search"
#: MLflow 3's experiment kind: "custom_model_development" marks model training (a UI that reads
#: it opens the experiment on its runs; untagged, on the GenAI traces page).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
#: MLflow 3.17's UI ignores the kind tag: a global GenAI / model-training switch (GenAI unless
#: changed, remembered by the browser) decides, and a link can set it with this query.
TRAINING_VIEW = "workflowType=machine_learning"
#: Significant digits of logged floats (params and metrics): 0.0030000000000000001 reads 0.003.
SIGNIFICANT_DIGITS = 6
#: A tracking server that has not answered its health probe for this long is given up on.
DEAD_AFTER_S = 30.0
#: How often a wait on a slow MLflow call checks that the server still answers.
PROBE_EVERY_S = 5.0


def default_tracking_uri(project_dir: str | os.PathLike = ".") -> str:
    """``sqlite:////abs/path/mlflow.db`` in the project folder."""
    return "sqlite:///" + str(Path(project_dir).resolve() / "mlflow.db")


#: Filesystem types where sqlite's POSIX locks are unreliable (sqlite's own FAQ: "network
#: filesystems"), as /proc/mounts names them.
NETWORK_FILESYSTEMS = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "fuse.sshfs",
        "lustre",
        "gpfs",
        "ceph",
        "fuse.ceph",
        "beegfs",
        "glusterfs",
        "fuse.glusterfs",
        "9p",
        "afs",
        "fuse.s3fs",
        "fuse.gcsfuse",
    }
)


def network_filesystem(path: str | os.PathLike, mounts: str = "/proc/mounts") -> str | None:
    """The type of the network filesystem holding ``path`` (``nfs4``...), or None.

    None as well where the mount table cannot be read (not Linux).
    """
    try:
        table = Path(mounts).read_text()
    except OSError:
        return None
    target = Path(path).resolve()
    best, fstype = -1, None
    for line in table.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        # mount points escape spaces as \040
        point = Path(fields[1].replace("\\040", " "))
        # >=: of two entries at one mount point the later is the one in effect (an automount
        # lists its autofs placeholder first, then the nfs4 mount over it).
        if (target == point or point in target.parents) and len(point.parts) >= best:
            best, fstype = len(point.parts), fields[2]
    return fstype if fstype in NETWORK_FILESYSTEMS else None


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (without its ``?options``), or None for other
    stores."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :].split("?", 1)[0])
    return None


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Holds the lock file ``<database>.lock`` of a sqlite store for the block (other stores:
    nothing).

    MLflow creates and migrates a new database's tables on its first open without a lock: two
    jobs opening one new store at the same moment both migrate it, and can leave it broken
    for good (``table _alembic_tmp_tags already exists`` on every later open). In turn, the
    second job opens the finished store.

    A new database is created here, empty (SQLite takes an empty file for an empty database,
    and MLflow then creates its tables), with the permissions the umask gives: SQLite would
    create it ``-rw-r--r--`` whatever the umask, and a store in a folder shared by a group
    (umask 002) would be read-only to everyone but its creator.

    Raises:
        OSError: The database's folder cannot be created, or the lock file or the new
            database cannot be made.
    """
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    # MLflow would create the folder on its open; the lock file needs it first
    db.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(f"{db}.lock"):
        # resolved: O_EXCL refuses a dangling symlink, and SQLite would create its target
        with contextlib.suppress(FileExistsError):  # an existing store (or what is in its way)
            os.close(os.open(db.resolve(), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        yield


def absolute_uri(uri: str, cwd: str | os.PathLike | None = None) -> str:
    """``uri`` with a relative sqlite or file-store path made absolute against ``cwd``.

    Trials run in their own folders (Ray changes directory), so ``sqlite:///mlflow.db`` would
    open a new, empty database in every trial's folder and their runs would be lost to the
    search. Servers (``http://``...) and other databases are returned unchanged.
    """
    base = Path(cwd) if cwd is not None else Path.cwd()
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///") :]
        if path and not Path(path).is_absolute():
            return "sqlite:///" + str((base / path).resolve())
        return uri
    if uri.startswith("file:"):
        path = uri[len("file:") :]
        if not path.startswith("/"):  # file:./mlruns or file:mlruns
            return (base / path).resolve().as_uri()
        return uri
    if uri == "databricks" or ":" in uri or Path(uri).is_absolute():
        return uri  # another store (databricks, postgresql:..., ...) or an absolute folder
    return str((base / uri).resolve())  # a plain relative folder: a file store


def check_tracking(
    uri: str, timeout_s: float = 10.0, *, experiment: str | None = None
) -> MlflowClient:
    """A client for ``uri`` after one round trip to it; fails fast with a clear message.

    Args:
        uri: The tracking URI.
        timeout_s: How long a tracking server's health probe may take.
        experiment: The experiment the job logs to, where known: a sqlite store's check then
            looks at that experiment's artifact folder rather than at the one that holds them
            all (which only a new experiment needs to write).

    Raises:
        RuntimeError: The tracking store cannot be reached or opened, or a sqlite store cannot
            be written by this user (it would be read, then every write would fail).
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
    db = sqlite_path(uri)
    if db is not None:
        _check_writable(uri, db, experiment)
    try:
        # inside: opening a sqlite store creates its folder, which can fail (a file in the way)
        with store_lock(uri):
            client = MlflowClient(tracking_uri=uri)
            # the first query opens the store: MLflow creates or migrates its tables here
            client.search_experiments(max_results=1)
    except Exception as e:  # MLflow raises many types here; all mean "cannot use this store"
        hint = ""
        if isinstance(e, PermissionError) and db is not None:
            # the folder it could not create is not there to chmod: its nearest parent is
            where = Path(e.filename or db.parent)
            while not os.path.exists(where) and where != where.parent:
                where = where.parent
            hint = (
                " (the database, its lock file and its folder must be writable by everyone "
                f"who logs there: {_chmod_advice([where], db)})"
            )
        raise RuntimeError(f"cannot use MLflow tracking store {uri}: {e}{hint}") from e
    return client


def _check_writable(uri: str, db: Path, experiment: str | None = None) -> None:
    """Refuses a sqlite store that this user can read but not write.

    MLflow only reads the store until a search logs to it; SQLite then fails every write
    (``attempt to write a readonly database``, not a PermissionError), after the work. It
    writes the database, its lock file, and a journal beside them in the folder; MLflow writes
    a run's artifacts into its experiment's folder under ``mlartifacts`` beside the database
    (:func:`ensure_experiment`), and a new experiment's folder into ``mlartifacts`` itself.
    Only what exists is checked: what is missing is created later (a missing folder is made by
    :func:`store_lock`, which fails in its own words where it cannot).

    Raises:
        RuntimeError: Naming each file or folder this user cannot write, its owner and mode,
            and what to run; or those that lie on a read-only filesystem.
    """
    import stat

    artifacts = db.resolve().parent / "mlartifacts"
    recorded = _recorded_artifact_folder(db, experiment) if experiment is not None else None
    # os.path: False, not a PermissionError, where mlartifacts is not ours to look into
    if recorded is not None:
        # an existing experiment's, wherever it was made to keep them; not made yet (`mlflow
        # experiments create` records a folder it does not make): where it will be made
        artifacts_used = recorded
        while not os.path.exists(artifacts_used) and artifacts_used != artifacts_used.parent:
            artifacts_used = artifacts_used.parent
    elif experiment is not None and os.path.isdir(artifacts / experiment):
        artifacts_used = artifacts / experiment  # a run of an existing experiment's
    else:
        artifacts_used = artifacts  # a new experiment's folder goes here
    denied = []
    for path, mode in (
        (db, os.W_OK),
        (Path(f"{db}.lock"), os.W_OK),
        (db.parent, os.W_OK | os.X_OK),
        (artifacts_used, os.W_OK | os.X_OK),
    ):
        try:
            st = path.stat()
        except OSError:  # missing (made later), or not ours to look into (the open says so)
            continue
        if not os.access(path, mode):
            denied.append((path, st))
    if not denied:
        return
    read_only = [str(path) for path, _ in denied if _read_only_filesystem(path)]
    if read_only:  # no mode bits help there
        raise RuntimeError(
            f"cannot write MLflow tracking store {uri}: {', '.join(read_only)} "
            f"{'lies' if len(read_only) == 1 else 'lie'} on a read-only filesystem; pass a "
            "--tracking-uri on a writable one (or have that filesystem mounted read-write)"
        )
    listed = ", ".join(
        f"{path} (owner {_owner_name(st.st_uid)}, {stat.filemode(st.st_mode)})"
        for path, st in denied
    )
    raise RuntimeError(
        f"cannot write MLflow tracking store {uri}: this user cannot write {listed}; "
        "everyone who logs to a shared store must be able to write the database, its lock "
        "file, its folder (SQLite writes a journal there) and the artifact folders under "
        f"{artifacts if recorded is None else recorded}: "
        f"{_chmod_advice([path for path, _ in denied], db)}, or pass another --tracking-uri"
    )


def _recorded_artifact_folder(db: Path, experiment: str) -> Path | None:
    """The local folder where the store records ``experiment``'s artifacts, read from the
    database without writing it; None where it records none (a new experiment, or a store
    not made yet) or a remote one (s3://, mlflow-artifacts:, which no file mode decides).

    An experiment made by the MLflow UI, ``mlflow experiments create`` or another tool keeps
    them where it was told (``./mlruns`` by default), not in ``mlartifacts/<name>``.
    """
    import sqlite3
    import urllib.parse

    try:
        # read-only: an unwritable store is what the caller is about to name
        con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
        try:
            row = con.execute(
                "SELECT artifact_location FROM experiments WHERE name = ?", (experiment,)
            ).fetchone()
        finally:
            con.close()
    except sqlite3.Error:  # no database or no table yet, or not ours to read (the open says)
        return None
    if not row or not row[0]:
        return None
    location = urllib.parse.urlparse(row[0])
    if location.scheme == "file":
        return Path(urllib.parse.unquote(location.path))
    return Path(row[0]) if not location.scheme else None


def _read_only_filesystem(path: Path) -> bool:
    """Whether ``path`` lies on a filesystem mounted read-only."""
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _owner_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:  # a user of another machine's (NFS)
        return f"uid {uid}"


def _chmod_advice(paths: list[Path], db: Path) -> str:
    """What makes ``paths`` of the store of database ``db`` writable: ``chmod u+w`` for those of
    this user (its group's bits do not apply to their owner), ``chmod g+w`` by their owners for
    the others; ``-R`` for the artifact folders, whose run folders other users log into too
    (never for the database's folder: it may be a whole project's)."""
    artifacts = db.resolve().parent / "mlartifacts"
    mine, theirs, owners = [], [], {}
    for path in paths:
        try:
            uid = path.stat().st_uid
        except OSError:
            uid = None
        if uid == os.getuid():
            mine.append(path)
        else:
            theirs.append(path)
            owners[_owner_name(uid) if uid is not None else f"the owner of {path}"] = None

    def chmod(bits: str, some: list[Path]) -> str:
        tree = [p for p in some if p == artifacts or artifacts in p.parents]
        plain = [p for p in some if p not in tree]
        runs = [f"`chmod {bits} {' '.join(map(str, plain))}`"] if plain else []
        if tree:
            runs.append(f"`chmod -R {bits} {' '.join(map(str, tree))}`")
        return " and ".join(runs)

    advice = []
    if mine:
        advice.append(f"run {chmod('u+w', mine)}")
    if theirs:
        advice.append(
            f"ask {' and '.join(owners)} to run {chmod('g+w', theirs)} (their group must be "
            "one you are in)"
        )
    return "; ".join(advice)


def ensure_experiment(
    client: MlflowClient,
    name: str,
    uri: str,
    project_dir: str | os.PathLike = ".",
    *,
    other: str = "--experiment NAME",
) -> str:
    """The id of experiment ``name``, created if missing.

    A new experiment of a sqlite store keeps its artifacts in ``mlartifacts/<name>`` beside the
    database, wherever the job runs (a shared database has one artifact folder for all its
    users); of another database (``postgresql://``...), under ``project_dir``; a tracking
    server chooses itself. An existing experiment keeps the location it was created with.
    The experiment is tagged as model development (:data:`EXPERIMENT_KIND_TAG`), also when it
    exists already without the tag. ``other``: the flag that names another experiment, for
    the message about a deleted one.

    Raises:
        ValueError: The experiment was deleted (in the UI): MLflow neither logs into it nor
            creates another of that name; the message says how to restore it.
    """
    # two jobs starting at once would both find no experiment and both create it
    with store_lock(uri):
        return _ensure_experiment(client, name, uri, project_dir, other)


def _ensure_experiment(
    client: MlflowClient, name: str, uri: str, project_dir: str | os.PathLike, other: str
) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None and exp.lifecycle_stage == "deleted":
        # the mlflow command reads the store from the environment (default ./mlruns)
        restore = (
            f"MLFLOW_TRACKING_URI={uri} mlflow experiments restore "
            f"--experiment-id {exp.experiment_id}"
        )
        raise ValueError(
            f"MLflow experiment {name!r} (id {exp.experiment_id}) is deleted: restore it "
            f"(`{restore}`) or pass {other} to log into another experiment"
        )
    if exp is not None:
        if exp.tags.get(EXPERIMENT_KIND_TAG) is None:
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    location = None
    db = sqlite_path(uri)
    if db is not None:
        # not the current folder: it may be read-only, or another user's on a shared database
        location = (db.resolve().parent / "mlartifacts" / name).as_uri()
    elif not uri.startswith(("http://", "https://")):
        location = (Path(project_dir).resolve() / "mlartifacts" / name).as_uri()
    try:
        return client.create_experiment(
            name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        )
    except MlflowException as e:
        # another job created it since the look-up (a tracking server: no lock file to share)
        if e.error_code != "RESOURCE_ALREADY_EXISTS" or client.get_experiment_by_name(name) is None:
            raise
        return _ensure_experiment(client, name, uri, project_dir, other)


def git_revision(repo_dir: str | os.PathLike = ".", *, top: bool = False) -> tuple[str, bool]:
    """``(commit, dirty)``: the checked-out commit (``unknown`` outside git) and whether tracked
    files differ from it.

    Args:
        repo_dir: A folder of the checkout.
        top: ``repo_dir`` must be the checkout's top folder: a package installed in a virtual
            environment inside some other repository is not that repository's code.
    """

    def git(*args: str, check: bool = True) -> str:
        run = subprocess.run(
            ["git", *args], cwd=repo_dir, capture_output=True, text=True, check=check, timeout=10
        )
        return run.stdout.strip()

    try:
        if top and Path(git("rev-parse", "--show-toplevel")).resolve() != Path(repo_dir).resolve():
            return "unknown", False
        sha = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", check=False)
        return sha, bool(dirty)
    except (OSError, subprocess.SubprocessError):
        return "unknown", False


def source_tags(repo_dir: str | os.PathLike = ".", entry: str | None = None) -> dict[str, str]:
    """MLflow's source tags: the UI's Source and Version columns show them.

    Args:
        repo_dir: The checkout whose commit is recorded.
        entry: What was run (default: the running script, relative to ``repo_dir`` when it
            lies there, e.g. ``experiments/tune_aug.py``).

    Returns:
        ``mlflow.source.{name,type,git.commit}`` and ``bldseg.git_dirty`` (whether the commit
        had uncommitted changes: MLflow's commit tag holds only the commit) when ``repo_dir``
        is a git checkout's top folder, and ``bldseg.version`` (the installed package's
        version: a wheel has no commit).
    """
    sha, dirty = git_revision(repo_dir, top=True)
    if entry is None:
        script = Path(sys.argv[0] or "python").resolve()
        try:
            entry = str(script.relative_to(Path(repo_dir).resolve()))
        except ValueError:
            entry = script.name
    tags = {"mlflow.source.name": entry, "mlflow.source.type": "LOCAL"}
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):  # a bare checkout
        tags["bldseg.version"] = importlib.metadata.version("bldseg")
    if sha != "unknown":
        tags["mlflow.source.git.commit"] = sha
        tags["bldseg.git_dirty"] = str(dirty).lower()
    return tags


def experiment_url(uri: str, experiment_id: str) -> str:
    """The MLflow UI page of an experiment's training runs.

    For a local store: the address ``mlflow ui`` serves by default (http://127.0.0.1:5000).
    """
    host = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{host}/#/experiments/{experiment_id}?{TRAINING_VIEW}"


def find_search_run(client: MlflowClient, experiment_id: str, name: str):
    """The newest parent run of search ``name`` (tag :data:`SEARCH_TAG`), or None."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{SEARCH_TAG}` = '{name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


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


def round_float(value: float, digits: int = SIGNIFICANT_DIGITS) -> float:
    """``value`` rounded to ``digits`` significant digits (what the UI should show)."""
    return float(f"{value:.{digits}g}") if math.isfinite(value) else value


#: A metric or param name that holds a decision threshold (``best_threshold``,
#: ``val_thr_best``, ``thr_youden``): logged rounded down (:func:`logged_float`).
_THRESHOLD_NAME = re.compile(r"threshold|(^|_)thr(_|$)")


def logged_float(key: str, value: float) -> float:
    """``value`` as logged under ``key``: :func:`round_float`, but a threshold is rounded down
    to 6 decimals, so the value read in the MLflow UI and typed back (``predict --threshold``)
    is the same level: a level's ``L/255`` rounded to nearest (86/255 = 0.3372549 as 0.337255)
    is the next level up (:func:`bldseg.metrics.level_from_threshold`), for 123 of 256."""
    if _THRESHOLD_NAME.search(key.rsplit(".", 1)[-1]) and math.isfinite(value):
        # on the decimal digits: floor(value * 1e6) / 1e6 took 0.0157 to 0.015699
        return float(Decimal(repr(value)).quantize(Decimal("1e-6"), rounding=ROUND_FLOOR))
    return round_float(value)


def param_text(value: Any, key: str = "") -> str:
    """A param value as MLflow shows it: floats rounded (:func:`logged_float`), ``repr``-free."""
    if isinstance(value, float):
        return f"{logged_float(key, value):.{SIGNIFICANT_DIGITS}g}"
    return str(value)


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    """Logs a flat dict of params in batches of 100 (MLflow's limit); floats rounded."""
    items = [Param(k, param_text(v, k)[:6000]) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, Any], step: int) -> None:
    """Logs the numeric entries of ``metrics`` at ``step``, rounded (:func:`logged_float`;
    non-finite ones skipped).

    The step is the epoch: an ``epoch`` entry is not logged (as a metric it would only plot a
    line against itself, and MLflow's compare view would pick it as its default metric).
    """
    ts = int(time.time() * 1000)
    items = [
        Metric(k, logged_float(k, float(v)), ts, step)
        for k, v in metrics.items()
        if k != "epoch"
        and isinstance(v, int | float)
        and not isinstance(v, bool)
        and math.isfinite(v)
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


# Tracking URIs whose server a Tracker of this process gave up on: the next trial in a reused
# worker checks once instead of waiting DEAD_AFTER_S again.
_UNREACHABLE: set[str] = set()


def server_answers(uri: str, timeout_s: float = 5.0) -> bool:
    """Whether the tracking server behind ``uri`` answers at all (always True for local stores).

    Any HTTP response counts, even an error status: the server is there, just unhappy.
    """
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as r:
            r.read()
    except urllib.error.HTTPError:
        return True
    except OSError:  # refused, reset, timed out, unresolvable
        return False
    return True


class Tracker:
    """MLflow calls on one background thread, in order, that never stall their caller for long.

    ``submit`` queues a call and returns at once (per-epoch metrics: training goes on while they
    are sent); ``call`` waits for its result. A wait goes on while the tracking server answers its
    health probe (a large artifact upload may take long) and ends after ``dead_after_s`` of
    silence. The first failure, an exception or a server that stopped answering, is reported
    once (a warning, ``on_error``) and turns every later call into a no-op returning None: the
    work goes on without MLflow instead of retrying each call for minutes.

    Args:
        uri: The tracking URI.
        label: Who is logging, for the report (e.g. ``trial 3f2a_00001``).
        on_error: Called once with the message of the first failure (e.g. to record it in the
            run folder, where the driver finds it).
        dead_after_s: How long a server may stay silent before it is given up on.
        probe_every_s: How often a waiting caller probes the server.
    """

    def __init__(
        self,
        uri: str,
        label: str,
        *,
        on_error: Callable[[str], None] | None = None,
        dead_after_s: float = DEAD_AFTER_S,
        probe_every_s: float = PROBE_EVERY_S,
    ):
        self.uri = uri
        self.label = label
        self.client = MlflowClient(tracking_uri=uri)
        self.error: str | None = None  # the first failure, once there was one
        self._on_error = on_error
        self._dead_after_s = dead_after_s
        self._probe_every_s = probe_every_s
        self._closed = False
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        # A daemon thread, not an executor: a call stuck in MLflow's retries must not keep the
        # process from exiting (executor threads are joined at interpreter exit).
        self._thread = threading.Thread(target=self._work, name=f"mlflow {label}", daemon=True)
        self._thread.start()
        if uri in _UNREACHABLE:
            if server_answers(uri):
                _UNREACHABLE.discard(uri)
            else:
                self._fail(f"tracking server {uri} does not answer (it stopped earlier)")

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        """Queues ``fn(client, *args, **kwargs)``; its future holds the result, None on failure."""
        fut: Future = Future()
        if self.error is not None or self._closed:
            fut.set_result(None)
        else:
            self._queue.put((fn, args, kwargs, fut))
        return fut

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(client, *args, **kwargs)`` after the calls queued before it; None on failure."""
        return self.wait(self.submit(fn, *args, **kwargs))

    def wait(self, fut: Future) -> Any:
        """The result of a submitted call; None if tracking failed or the server went silent."""
        silent_since = None
        while True:
            try:
                return fut.result(timeout=self._probe_every_s)
            except TimeoutError:
                if server_answers(self.uri):
                    silent_since = None
                    continue
                now = time.monotonic()
                silent_since = silent_since if silent_since is not None else now
                if now - silent_since >= self._dead_after_s:
                    _UNREACHABLE.add(self.uri)
                    self._fail(
                        f"tracking server {self.uri} stopped answering "
                        f"(no reply for {self._dead_after_s:.0f} s)"
                    )
                    return None

    def close(self, wait: bool = True) -> None:
        """Ends the thread after the queued calls; ``wait``: until they are done (as
        :meth:`wait` waits). Calls submitted afterwards do nothing."""
        if self._closed:
            return
        if wait:
            self.wait(self.submit(lambda client: None))
        self._closed = True
        self._queue.put(None)

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            fn, args, kwargs, fut = item
            if self.error is not None:
                fut.set_result(None)
                continue
            try:
                fut.set_result(fn(self.client, *args, **kwargs))
            except Exception as e:  # MLflow raises many types; each one means the record is lost
                self._fail(f"{type(e).__name__}: {str(e).strip()[:500]}")
                fut.set_result(None)

    def _fail(self, message: str) -> None:
        with self._lock:
            if self.error is not None:
                return
            self.error = message
        log.warning(
            "MLflow logging of %s stopped: %s. It goes on without MLflow; its MLflow record is "
            "incomplete (the run folder has everything).",
            self.label,
            message,
        )
        if self._on_error is not None:
            try:
                self._on_error(message)
            except OSError as e:
                log.warning("could not record the MLflow failure of %s: %s", self.label, e)

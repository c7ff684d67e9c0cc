"""Opening a sqlite MLflow store: jobs starting at once take turns, artifacts lie beside it."""

import multiprocessing
import shutil
import threading
import time

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS
from mlflow.tracking import MlflowClient

from bldseg.tune import tracking

# How long each job lingers where the race happens: long enough for the other one to arrive.
LINGER_S = 0.5


@pytest.fixture(scope="module")
def made_store(tmp_path_factory):
    """A database with MLflow's tables: making them takes seconds, copying the file none."""
    db = tmp_path_factory.mktemp("made") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


def store_at(made_store, db):
    """The URI of a copy of ``made_store`` at ``db``."""
    db.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(made_store, db)
    return f"sqlite:///{db}"


def _start_job(uri, start, inside, most_inside, results):
    """One job starting on a store: ``check_tracking`` then ``ensure_experiment``, as a search
    or pipeline does. Runs in a spawned process (module level, so that spawn can import it)."""
    import mlflow.store.db.utils as db_utils
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401  (imported before the start)

    create_tables = db_utils._initialize_tables

    def lingering_create_tables(engine):
        # counts the jobs creating the tables at once (1 with the lock), and waits there so the
        # other job is sure to reach MLflow's own check for a new database meanwhile
        with inside.get_lock():
            inside.value += 1
            most_inside.value = max(most_inside.value, inside.value)
        try:
            time.sleep(LINGER_S)
            create_tables(engine)
        finally:
            with inside.get_lock():
                inside.value -= 1

    create_experiment = MlflowClient.create_experiment

    def lingering_create_experiment(self, *args, **kwargs):
        time.sleep(LINGER_S)  # the other job looks the experiment up meanwhile
        return create_experiment(self, *args, **kwargs)

    db_utils._initialize_tables = lingering_create_tables
    MlflowClient.create_experiment = lingering_create_experiment
    start.wait(60)  # both imports done: the jobs open the store at the same moment
    try:
        client = tracking.check_tracking(uri)
        start.wait(60)  # and look for their experiment at the same moment
        results.put(("ok", tracking.ensure_experiment(client, "bldseg", uri)))
    except Exception as e:  # reported to the test, which names it
        start.abort()  # the other job is not kept waiting for this one
        results.put(("error", f"{type(e).__name__}: {e}"))


def test_jobs_opening_a_new_sqlite_store_at_once_take_turns(tmp_path):
    # Two searches started together on a new database: MLflow creates the tables without a lock,
    # so both migrated it ("duplicate column name", "Online migration expected to match one row")
    # and could leave a database that no later open accepts.
    uri = f"sqlite:///{tmp_path}/db/mlflow.db"
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(2)
    inside, most_inside = ctx.Value("i", 0), ctx.Value("i", 0)
    results = ctx.Queue()
    jobs = [
        ctx.Process(target=_start_job, args=(uri, start, inside, most_inside, results))
        for _ in range(2)
    ]
    for job in jobs:
        job.start()
    outcomes = [results.get(timeout=120) for _ in jobs]
    for job in jobs:
        job.join(30)
    assert [kind for kind, _ in outcomes] == ["ok", "ok"], outcomes
    assert outcomes[0][1] == outcomes[1][1]  # one experiment, not two (or a refused second)
    assert most_inside.value == 1  # the tables were created by one job, the other waited
    client = MlflowClient(uri)  # a later open finds a whole store
    assert sorted(e.name for e in client.search_experiments()) == ["Default", "bldseg"]


class _RacedClient:
    """A client whose first look-up misses the experiment that another job creates just then."""

    def __init__(self, client, artifacts: str):
        self.client = client
        self.artifacts = artifacts
        self.lookups = 0

    def get_experiment_by_name(self, name):
        self.lookups += 1
        if self.lookups == 1:
            # the other job, between look-up and create; its artifacts under the test's
            # folder (without a location MLflow makes ./mlruns in the working directory)
            self.client.create_experiment(name, artifact_location=self.artifacts)
            return None
        return self.client.get_experiment_by_name(name)

    def __getattr__(self, attr):
        return getattr(self.client, attr)


def test_experiment_created_by_another_job_meanwhile_is_used(tmp_path, made_store):
    # A tracking server has no lock file to share: the experiment another job created between
    # the look-up and the creation is the one to log into, not a failed start.
    uri = store_at(made_store, tmp_path / "mlflow.db")
    client = MlflowClient(uri)
    raced = _RacedClient(client, (tmp_path / "artifacts").as_uri())
    exp_id = tracking.ensure_experiment(raced, "bldseg", uri)
    assert exp_id == client.get_experiment_by_name("bldseg").experiment_id
    # the other job's experiment is tagged like one bldseg created
    assert client.get_experiment(exp_id).tags[tracking.EXPERIMENT_KIND_TAG] == (
        tracking.EXPERIMENT_KIND
    )


def test_other_experiment_errors_are_not_taken_for_a_race(tmp_path, made_store):
    uri = store_at(made_store, tmp_path / "mlflow.db")

    class Refusing(_RacedClient):
        def get_experiment_by_name(self, name):
            return None

        def create_experiment(self, *args, **kwargs):
            raise MlflowException("name taken", RESOURCE_ALREADY_EXISTS)

    # already exists, yet no experiment of that name: the error stands
    with pytest.raises(MlflowException, match="name taken"):
        tracking.ensure_experiment(Refusing(MlflowClient(uri), tmp_path.as_uri()), "bldseg", uri)


def test_artifacts_of_a_sqlite_store_lie_beside_it_not_in_the_current_folder(
    tmp_path, monkeypatch, made_store
):
    # --tracking-uri sqlite:... elsewhere: the artifacts went to the current folder, lost from a
    # read-only one (runs left RUNNING) and scattered over users' folders on a shared database.
    store, cwd = tmp_path / "store", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    uri = store_at(made_store, store / "mlflow.db")
    client = tracking.check_tracking(uri)
    exp_id = tracking.ensure_experiment(client, "bldseg", uri, project_dir=".")
    assert client.get_experiment(exp_id).artifact_location == (
        (store / "mlartifacts" / "bldseg").as_uri()
    )
    run_id = client.create_run(exp_id).info.run_id
    (tmp_path / "curve.txt").write_text("dice\n")
    tracking.log_artifacts(client, run_id, [tmp_path / "curve.txt"], "plots")
    assert (
        store / "mlartifacts" / "bldseg" / run_id / "artifacts" / "plots" / "curve.txt"
    ).is_file()
    assert list(cwd.iterdir()) == []


def test_existing_experiment_keeps_its_artifact_location(tmp_path, made_store):
    uri = store_at(made_store, tmp_path / "store" / "mlflow.db")
    client = tracking.check_tracking(uri)
    old = (tmp_path / "where-it-began" / "mlartifacts" / "bldseg").as_uri()
    exp_id = client.create_experiment("bldseg", artifact_location=old)
    assert tracking.ensure_experiment(client, "bldseg", uri) == exp_id
    assert client.get_experiment(exp_id).artifact_location == old


def test_default_store_keeps_artifacts_in_the_project_folder(tmp_path, made_store):
    # the default database lies in the project folder: its artifacts stay where they always were
    uri = tracking.default_tracking_uri(tmp_path)
    store_at(made_store, tracking.sqlite_path(uri))
    client = tracking.check_tracking(uri)
    exp_id = tracking.ensure_experiment(client, "bldseg", uri, project_dir=tmp_path)
    assert client.get_experiment(exp_id).artifact_location == (
        (tmp_path / "mlartifacts" / "bldseg").as_uri()
    )


def test_store_lock_serialises_openers_of_one_sqlite_store(tmp_path):
    uri = f"sqlite:///{tmp_path}/new/mlflow.db?timeout=30"
    holding = threading.Event()
    order = []

    def other():
        with tracking.store_lock(f"sqlite:///{tmp_path}/new/mlflow.db"):
            order.append("other")

    with tracking.store_lock(uri):  # the URI's ?options name the same database
        assert (tmp_path / "new" / "mlflow.db.lock").exists()
        thread = threading.Thread(target=other)
        thread.start()
        holding.wait(0.3)
        order.append("first")
    thread.join(10)
    assert order == ["first", "other"]
    with tracking.store_lock("http://127.0.0.1:1"):  # nothing to lock for a server
        pass

"""The MLflow call queue of a search: never stalls its caller, reports a failure once."""

import os
import pwd
import re
import stat
import threading
import time
from pathlib import Path

import pytest

from bldseg.tune import tracking
from tests.conftest import free_port


def test_silent_server_is_given_up_on_once():
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there: like a server that died
    errors = []
    # the test's pace; by default a server is probed every 5 s and given up on after 30 s
    tracker = tracking.Tracker(
        uri, "trial t", on_error=errors.append, dead_after_s=1.0, probe_every_s=0.2
    )
    release = threading.Event()
    started = threading.Event()

    def stuck(client):  # stands for MLflow retrying a request for minutes
        started.set()
        release.wait(60)

    t0 = time.monotonic()
    assert tracker.call(stuck) is None
    assert started.is_set() and time.monotonic() - t0 < 10
    ran = []
    assert tracker.call(lambda client: ran.append(1)) is None  # dropped, not queued behind
    tracker.close()
    release.set()
    assert not ran
    assert len(errors) == 1 and "stopped answering" in errors[0] and uri in errors[0]
    assert tracker.error == errors[0]
    # the next tracker of this process checks once instead of waiting again
    again = []
    t0 = time.monotonic()
    tracking.Tracker(uri, "trial u", on_error=again.append)
    assert again and "does not answer" in again[0] and time.monotonic() - t0 < 10


def test_first_exception_is_reported_once_and_later_calls_are_skipped(tmp_path):
    uri = "sqlite:///" + str(tmp_path / "mlflow.db")
    errors = []
    tracker = tracking.Tracker(uri, "trial t", on_error=errors.append)

    def boom(client):
        raise RuntimeError("no such run")

    ran = []
    assert tracker.call(lambda client: 7) == 7
    for _ in range(3):
        tracker.submit(boom)
    tracker.submit(lambda client: ran.append(1))
    tracker.close()
    assert errors == ["RuntimeError: no such run"] and not ran
    assert tracker.submit(lambda client: ran.append(2)).result(timeout=1) is None and not ran


def test_queued_calls_run_in_order_before_close_returns(tmp_path):
    tracker = tracking.Tracker("sqlite:///" + str(tmp_path / "mlflow.db"), "search")
    seen = []
    for i in range(20):
        tracker.submit(lambda client, i=i: seen.append(i))
    tracker.close()
    assert seen == list(range(20)) and tracker.error is None


def test_source_commit_only_for_the_checkout_itself(tmp_path):
    # bldseg installed from a wheel into a venv inside the user's own repository: the
    # repository's commit is not bldseg's, so no commit tag; the package version instead.
    import subprocess

    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "f.txt").write_text("x")
    subprocess.run([*git, "-C", str(tmp_path), "add", "f.txt"], check=True)
    subprocess.run([*git, "-C", str(tmp_path), "commit", "-qm", "c"], check=True)
    inner = tmp_path / ".venv" / "site-packages"
    inner.mkdir(parents=True)
    nested = tracking.source_tags(inner, entry="x.py")
    assert "mlflow.source.git.commit" not in nested and "bldseg.git_dirty" not in nested
    top = tracking.source_tags(tmp_path, entry="x.py")
    head = subprocess.run(
        ["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    assert top["mlflow.source.git.commit"] == head and top["bldseg.git_dirty"] == "false"
    assert nested["bldseg.version"] == top["bldseg.version"] != ""


def test_network_filesystem_of_a_path_is_its_deepest_mount(tmp_path):
    # sqlite's locks are unreliable on NFS and the like: the search warns when its MLflow
    # database lies there. The deepest mount point holding the path decides.
    from bldseg.tune.tracking import network_filesystem, sqlite_path

    mounts = tmp_path / "mounts"
    mounts.write_text(
        "overlay / overlay rw 0 0\n"
        f"server:/export {tmp_path}/shared nfs4 rw,relatime 0 0\n"
        f"tmpfs {tmp_path}/shared/local tmpfs rw 0 0\n"
        f"//srv/x {tmp_path}/my\\040share cifs rw 0 0\n"
    )
    assert network_filesystem(tmp_path / "shared" / "mlflow.db", mounts) == "nfs4"
    assert network_filesystem(tmp_path / "shared", mounts) == "nfs4"
    assert network_filesystem(tmp_path / "shared" / "local" / "m.db", mounts) is None
    assert network_filesystem(tmp_path / "sharedx" / "m.db", mounts) is None  # not a prefix
    assert network_filesystem(tmp_path / "my share" / "m.db", mounts) == "cifs"
    assert network_filesystem(tmp_path / "m.db", tmp_path / "absent") is None
    # An automounted share: autofs placeholder first, the real mount over it after.
    (tmp_path / "automount").write_text(
        "overlay / overlay rw 0 0\n"
        f"systemd-1 {tmp_path}/auto autofs rw,relatime,fd=45 0 0\n"
        f"nas:/export/shared {tmp_path}/auto nfs4 rw,relatime 0 0\n"
    )
    assert network_filesystem(tmp_path / "auto" / "m.db", tmp_path / "automount") == "nfs4"
    assert sqlite_path("sqlite:////abs/mlflow.db").as_posix() == "/abs/mlflow.db"
    assert sqlite_path("http://host:5000") is None


def test_check_tracking_names_a_sqlite_store_that_cannot_be_created(tmp_path):
    # The database's folder would be under a file: MLflow's own error (FileExistsError) is
    # turned into the one that names the store, as for every other unusable store.
    (tmp_path / "file").write_text("not a folder")
    uri = f"sqlite:///{tmp_path}/file/sub/mlflow.db"
    with pytest.raises(RuntimeError, match=rf"cannot use MLflow tracking store {re.escape(uri)}"):
        tracking.check_tracking(uri)


def as_group_member(path, mode, **kwargs):
    """``os.access`` for another user of ``path``'s group: its group bits decide (the tests run
    as root, who may write anything). Tests that use it also patch ``os.getuid``
    (:func:`another_user`): the files they make are root's."""
    st = os.stat(path)
    bits = ((os.R_OK, stat.S_IRGRP), (os.W_OK, stat.S_IWGRP), (os.X_OK, stat.S_IXGRP))
    return all(st.st_mode & bit for flag, bit in bits if mode & flag)


def as_owner(path, mode, **kwargs):
    """``os.access`` for ``path``'s owner without root's bypass: its user bits decide."""
    st = os.stat(path)
    bits = ((os.R_OK, stat.S_IRUSR), (os.W_OK, stat.S_IWUSR), (os.X_OK, stat.S_IXUSR))
    return all(st.st_mode & bit for flag, bit in bits if mode & flag)


def another_user(monkeypatch):
    """This process is a user of the group, not the owner (root) of the files the test made."""
    monkeypatch.setattr(os, "access", as_group_member)
    monkeypatch.setattr(os, "getuid", lambda: 12345)


def shared_store(folder, artifacts=None):
    """A store's database, lock file and folder, group-writable; ``mlartifacts/<artifacts>``
    beside them made as under umask 022 (``drwxr-xr-x``), as its owner left it after running
    the ``chmod g+w`` a refusal advised for the other three."""
    folder.mkdir()
    db = folder / "mlflow.db"
    db.write_bytes(b"")  # an empty database: enough, nothing is opened before the check
    Path(f"{db}.lock").write_bytes(b"")
    for path in (folder, db, Path(f"{db}.lock")):
        path.chmod(0o775 if path.is_dir() else 0o664)
    if artifacts is not None:
        (folder / "mlartifacts" / artifacts / "run1" / "artifacts").mkdir(parents=True)
        for path in (folder / "mlartifacts").rglob("*"):
            path.chmod(0o755)
        (folder / "mlartifacts").chmod(0o755)
    return db


def store_made_by_a_team(uri: str):
    """A client of a sqlite store created as a team member creates it (umask 002)."""
    old = os.umask(0o002)
    try:
        return tracking.check_tracking(uri)
    finally:
        os.umask(old)


def test_a_new_sqlite_store_is_as_writable_as_the_umask_makes_it(tmp_path, monkeypatch):
    # SQLite creates a database -rw-r--r-- whatever the umask: in a folder shared by a group
    # (umask 002) the store was read-only to all but its creator, whose teammates' searches
    # then failed in tracebacks ("attempt to write a readonly database") after the work.
    db = tmp_path / "shared" / "mlflow.db"
    uri = f"sqlite:///{db}"
    client = store_made_by_a_team(uri)
    assert stat.S_IMODE(db.stat().st_mode) == 0o664
    assert stat.S_IMODE(Path(f"{db}.lock").stat().st_mode) == 0o664
    # an empty file made for it is an empty database: MLflow made its tables
    assert tracking.ensure_experiment(client, "bldseg", uri) == "1"
    # a teammate (its group) may use it
    another_user(monkeypatch)
    tracking.check_tracking(uri)


@pytest.mark.parametrize("read_only", ["database", "lock file", "folder"])
def test_a_sqlite_store_this_user_cannot_write_is_refused_naming_it(
    read_only, tmp_path, monkeypatch
):
    # MLflow only reads the store until a search logs to it: a store its user could not write
    # was opened, and every write failed after the work (not a PermissionError: no hint either).
    folder = tmp_path / "shared"
    db = shared_store(folder)
    path = {"database": db, "lock file": Path(f"{db}.lock"), "folder": folder}[read_only]
    path.chmod(0o755 if path.is_dir() else 0o644)
    owner = pwd.getpwuid(os.getuid()).pw_name
    another_user(monkeypatch)
    uri = f"sqlite:///{db}"
    with pytest.raises(RuntimeError) as e:
        tracking.check_tracking(uri)
    mode = stat.filemode(path.stat().st_mode)
    assert str(e.value) == (
        f"cannot write MLflow tracking store {uri}: this user cannot write {path} (owner "
        f"{owner}, {mode}); everyone who logs to a shared store must be able to write the "
        "database, its lock file, its folder (SQLite writes a journal there) and the "
        f"artifact folders under {folder}/mlartifacts: ask {owner} to run `chmod g+w {path}` "
        "(their group must be one you are in), or pass another --tracking-uri"
    )
    assert db.read_bytes() == b""  # refused before MLflow opened it


def test_a_sqlite_store_whose_artifacts_this_user_cannot_write_is_refused(tmp_path, monkeypatch):
    # Its owner (umask 022) logged artifacts, then ran the chmod a refusal advised: the check
    # passed, and a teammate's ensemble search ran, published its outputs, then failed logging
    # them into mlartifacts/ (PermissionError traceback, exit 1).
    folder = tmp_path / "shared"
    db = shared_store(folder, artifacts="e")
    artifacts = folder / "mlartifacts"
    owner = pwd.getpwuid(os.getuid()).pw_name
    another_user(monkeypatch)
    uri = f"sqlite:///{db}"
    with pytest.raises(RuntimeError) as e:  # a new experiment's folder would go there
        tracking.check_tracking(uri)
    assert f"this user cannot write {artifacts} (owner {owner}, drwxr-xr-x);" in str(e.value)
    assert f"ask {owner} to run `chmod -R g+w {artifacts}` (their group" in str(e.value)
    # a job that logs to experiment e writes into its folder, not into mlartifacts itself
    with pytest.raises(RuntimeError, match=rf"cannot write {re.escape(str(artifacts))}/e "):
        tracking.check_tracking(uri, experiment="e")
    (artifacts / "e").chmod(0o775)
    with pytest.raises(RuntimeError):  # a new experiment would still fail
        tracking.check_tracking(uri, experiment="new")
    assert db.read_bytes() == b""  # refused before MLflow opened it
    tracking.check_tracking(uri, experiment="e")  # which it may


def test_an_experiment_made_elsewhere_is_checked_where_it_keeps_its_artifacts(
    tmp_path, monkeypatch
):
    # An experiment made by the MLflow UI or `mlflow experiments create` keeps its artifacts
    # where it was told, not in mlartifacts/<name>: the check looked at mlartifacts itself.
    folder = tmp_path / "shared"
    folder.mkdir()
    folder.chmod(0o775)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = store_made_by_a_team(uri)
    own = tmp_path / "team-artifacts"
    own.mkdir()
    own.chmod(0o755)
    client.create_experiment("made-elsewhere", artifact_location=own.as_uri())
    # `mlflow experiments create` records <its cwd>/mlruns/<id> and does not make it
    client.create_experiment("not-made-yet", artifact_location=(own / "mlruns" / "2").as_uri())
    another_user(monkeypatch)
    for experiment in ("made-elsewhere", "not-made-yet"):
        with pytest.raises(RuntimeError, match=rf"cannot write {re.escape(str(own))} \(owner"):
            tracking.check_tracking(uri, experiment=experiment)
    own.chmod(0o775)
    for experiment in ("made-elsewhere", "not-made-yet"):  # mlartifacts/ is not their folder
        tracking.check_tracking(uri, experiment=experiment)


def test_a_sqlite_store_on_a_read_only_filesystem_is_refused_as_that(tmp_path, monkeypatch):
    # Its files were group-writable, yet the refusal asked their owner to `chmod g+w` them: the
    # filesystem (a read-only mount, a snapshot) refuses every write, whatever the mode.
    folder = tmp_path / "shared"
    db = shared_store(folder)
    statvfs = os.statvfs

    def read_only_mount(path):
        st = statvfs(path)
        flags = st.f_flag | (os.ST_RDONLY if folder in (Path(path), *Path(path).parents) else 0)
        return os.statvfs_result((*st[:8], flags, st.f_namemax))

    monkeypatch.setattr(os, "statvfs", read_only_mount)
    monkeypatch.setattr(os, "access", lambda path, mode, **kwargs: not mode & os.W_OK)
    uri = f"sqlite:///{db}"
    with pytest.raises(RuntimeError) as e:
        tracking.check_tracking(uri)
    assert str(e.value) == (
        f"cannot write MLflow tracking store {uri}: {db}, {db}.lock, {folder} lie on a "
        "read-only filesystem; pass a --tracking-uri on a writable one (or have that "
        "filesystem mounted read-write)"
    )


def test_a_sqlite_store_its_owner_cannot_write_is_refused_with_what_the_owner_runs(
    tmp_path, monkeypatch
):
    # The owner's own store, made read-only by them: they were told to ask themselves to
    # `chmod g+w` it, which does not give its owner write access.
    folder = tmp_path / "shared"
    db = shared_store(folder)
    db.chmod(0o444)
    monkeypatch.setattr(os, "access", as_owner)
    uri = f"sqlite:///{db}"
    with pytest.raises(RuntimeError) as e:
        tracking.check_tracking(uri)
    assert str(e.value).endswith(f": run `chmod u+w {db}`, or pass another --tracking-uri")


def test_a_store_folder_that_cannot_be_made_names_its_existing_parent(tmp_path, monkeypatch):
    # The hint named the folder that could not be created: there is nothing to chmod there.
    shared = tmp_path / "share3"
    shared.mkdir()
    mkdir = os.mkdir

    def denied_in_shared(path, *args, **kwargs):
        if Path(path).parent == shared:
            raise PermissionError(13, "Permission denied", str(path))
        return mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", denied_in_shared)
    owner = pwd.getpwuid(os.getuid()).pw_name
    monkeypatch.setattr(os, "getuid", lambda: 12345)
    with pytest.raises(RuntimeError) as e:
        tracking.check_tracking(f"sqlite:///{shared}/sub/deeper/mlflow.db")
    assert str(e.value).endswith(
        f"its folder must be writable by everyone who logs there: ask {owner} to run "
        f"`chmod g+w {shared}` (their group must be one you are in))"
    )


def test_a_new_store_behind_a_dangling_symlink_follows_the_umask(tmp_path):
    # O_EXCL refuses a symlink, even a dangling one: SQLite then created its target -rw-r--r--.
    target = tmp_path / "stores" / "mlflow.db"
    target.parent.mkdir()
    link = tmp_path / "mlflow.db"
    link.symlink_to(target)
    old = os.umask(0o002)
    try:
        tracking.check_tracking(f"sqlite:///{link}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o664


def test_logged_thresholds_read_back_as_their_level(tmp_path):
    # Rounded to nearest, 86/255 = 0.3372549 was logged 0.337255, which typed back into
    # `predict --threshold` is level 87: another mask, for 123 of the 256 levels.
    from bldseg.metrics import level_from_threshold

    for level in range(256):
        for key in ("best_threshold", "val_thr_best", "thr_youden"):
            logged = tracking.logged_float(key, level / 255)
            assert level_from_threshold(logged) == level, (key, level, logged)
        assert level_from_threshold(float(tracking.param_text(level / 255, "threshold"))) == level
    assert tracking.logged_float("val_dice", 86 / 255) == 0.337255  # others: to nearest
    # floored on the decimal digits: a value read back and logged again stays itself
    assert tracking.logged_float("best_threshold", 0.0157) == 0.0157
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = tracking.check_tracking(uri)
    run = client.create_run(tracking.ensure_experiment(client, "e", uri))
    tracking.log_metrics(client, run.info.run_id, {"val_thr_best": 86 / 255}, step=0)
    logged = client.get_run(run.info.run_id).data.metrics["val_thr_best"]
    assert level_from_threshold(logged) == 86

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
    as root, who may write anything)."""
    st = os.stat(path)
    bits = ((os.R_OK, stat.S_IRGRP), (os.W_OK, stat.S_IWGRP), (os.X_OK, stat.S_IXGRP))
    return all(st.st_mode & bit for flag, bit in bits if mode & flag)


def test_a_new_sqlite_store_is_as_writable_as_the_umask_makes_it(tmp_path, monkeypatch):
    # SQLite creates a database -rw-r--r-- whatever the umask: in a folder shared by a group
    # (umask 002) the store was read-only to all but its creator, whose teammates' searches
    # then failed in tracebacks ("attempt to write a readonly database") after the work.
    db = tmp_path / "shared" / "mlflow.db"
    uri = f"sqlite:///{db}"
    old = os.umask(0o002)
    try:
        client = tracking.check_tracking(uri)
    finally:
        os.umask(old)
    assert stat.S_IMODE(db.stat().st_mode) == 0o664
    assert stat.S_IMODE(Path(f"{db}.lock").stat().st_mode) == 0o664
    # an empty file made for it is an empty database: MLflow made its tables
    assert tracking.ensure_experiment(client, "bldseg", uri) == "1"
    # a teammate (its group) may use it
    monkeypatch.setattr(os, "access", as_group_member)
    tracking.check_tracking(uri)


@pytest.mark.parametrize("read_only", ["database", "lock file", "folder"])
def test_a_sqlite_store_this_user_cannot_write_is_refused_naming_it(
    read_only, tmp_path, monkeypatch
):
    # MLflow only reads the store until a search logs to it: a store its user could not write
    # was opened, and every write failed after the work (not a PermissionError: no hint either).
    folder = tmp_path / "shared"
    folder.mkdir()
    db = folder / "mlflow.db"
    db.write_bytes(b"")  # an empty database: enough, nothing is opened before the check
    Path(f"{db}.lock").write_bytes(b"")
    for path in (folder, db, Path(f"{db}.lock")):
        path.chmod(0o775 if path.is_dir() else 0o664)
    path = {"database": db, "lock file": Path(f"{db}.lock"), "folder": folder}[read_only]
    path.chmod(0o755 if path.is_dir() else 0o644)
    monkeypatch.setattr(os, "access", as_group_member)
    uri = f"sqlite:///{db}"
    with pytest.raises(RuntimeError) as e:
        tracking.check_tracking(uri)
    owner = pwd.getpwuid(os.getuid()).pw_name
    mode = stat.filemode(path.stat().st_mode)
    assert str(e.value) == (
        f"cannot write MLflow tracking store {uri}: this user cannot write {path} (owner "
        f"{owner}, {mode}); everyone who logs to a shared store must be able to write the "
        "database, its lock file and its folder (SQLite writes a journal there): ask "
        f"{owner} to run `chmod g+w {path}` (their group must be one you are in), or pass "
        "another --tracking-uri"
    )
    assert db.read_bytes() == b""  # refused before MLflow opened it

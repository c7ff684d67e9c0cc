import errno
import fcntl
import json
import os

import numpy as np
import pytest

from bldseg.io import file_lock, write_json


def test_write_json_creates_folders_and_replaces_whole_files(tmp_path):
    path = tmp_path / "bench" / "deeper" / "out.json"  # folders that do not exist yet
    write_json(path, {"dice": np.float32(0.5), "n": 3})
    assert json.loads(path.read_text()) == {"dice": 0.5, "n": 3}
    write_json(path, {"n": 4})
    assert json.loads(path.read_text()) == {"n": 4}
    assert [p.name for p in path.parent.iterdir()] == ["out.json"]  # no temporary left


def test_write_json_passes_dumps_options(tmp_path):
    path = write_json(tmp_path / "a.json", {"p": tmp_path}, default=str, indent=None)
    assert path.read_text() == json.dumps({"p": str(tmp_path)}) + "\n"


def test_write_json_writes_strict_json_with_null_for_non_finite_numbers(tmp_path):
    # Python's NaN/Infinity words are not JSON: strict readers (JSON.parse, jq, the MLflow UI)
    # refuse the whole file.
    obj = {"a": float("nan"), "iv": (float("-inf"), 0.5, np.inf), "b": np.float32("nan"), "n": 2}
    path = write_json(tmp_path / "x.json", obj)

    def strict(word):
        raise ValueError(f"not JSON: {word}")

    assert json.loads(path.read_text(), parse_constant=strict) == {
        "a": None,
        "iv": [None, 0.5, None],
        "b": None,
        "n": 2,
    }


def test_write_json_failure_names_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "status.json"
    target.mkdir()  # a folder where the file should go: the rename fails
    (target / "keep").write_text("x")
    with pytest.raises(OSError, match=r"cannot write .*status\.json"):
        write_json(target, {"n": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]


def test_write_json_temporaries_are_unique_per_writer(tmp_path):
    # Two processes writing one file (K-fold processes on a shared folder) must not rename
    # each other's temporary: each writer's file is whole, and no write fails.
    import subprocess
    import sys

    code = (
        "import sys; from bldseg.io import write_json\n"
        "for i in range(300):\n"
        "    write_json(sys.argv[1], {'w': sys.argv[2], 'i': i, 'pad': 'x' * 4000})\n"
    )
    path = tmp_path / "shared.json"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(path), w], stderr=subprocess.PIPE)
        for w in "ab"
    ]
    errors = [p.communicate()[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    assert json.loads(path.read_text())["i"] == 299
    assert [p.name for p in tmp_path.iterdir()] == ["shared.json"]


def _no_flock(code):
    def flock(fd, op):
        raise OSError(code, os.strerror(code))

    return flock


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.ENOSYS])
def test_file_lock_holds_where_the_filesystem_cannot_lock(tmp_path, monkeypatch, code):
    # NFS without a lock daemon (ENOLCK) ended a run in "cannot write the build folder"; filelock
    # releases before 4 raised NotImplementedError on ENOSYS (Lustre without -o flock)
    from filelock import Timeout

    monkeypatch.setattr(fcntl, "flock", _no_flock(code))
    path = tmp_path / "x.lock"
    # held: another lock on the same file waits
    with file_lock(path), pytest.raises(Timeout), file_lock(path, timeout=0.05):
        pass
    with file_lock(path):  # released
        pass


def test_file_lock_falls_back_from_filelocks_not_implemented(tmp_path, monkeypatch):
    import filelock

    class OldFileLock(filelock.FileLock):
        def acquire(self, *args, **kwargs):
            raise NotImplementedError("FileSystem does not appear to support flock")

    monkeypatch.setattr(filelock, "FileLock", OldFileLock)
    with file_lock(tmp_path / "x.lock"):
        assert (tmp_path / "x.lock.soft").exists()
    assert not (tmp_path / "x.lock.soft").exists()


def test_file_lock_other_errors_are_raised(tmp_path, monkeypatch):
    monkeypatch.setattr(fcntl, "flock", _no_flock(errno.EIO))
    with pytest.raises(OSError, match="Input/output error"), file_lock(tmp_path / "x.lock"):
        pass


def test_a_left_lock_file_is_named_while_waiting(tmp_path, monkeypatch, caplog):
    # a holder killed on a filesystem without flock leaves <path>.soft: the wait was silent and
    # endless (every caller waits without a limit)
    import logging

    from filelock import Timeout

    from bldseg import io

    monkeypatch.setattr(fcntl, "flock", _no_flock(errno.ENOLCK))
    monkeypatch.setattr(io, "SOFT_LOCK_NOTE_S", 0.05)
    path = tmp_path / "x.lock"
    (tmp_path / "x.lock.soft").write_text("")  # what a killed holder leaves
    level = caplog.at_level(logging.WARNING, logger="bldseg.io")
    with level, pytest.raises(Timeout), file_lock(path, timeout=0.3):
        pass
    said = [r.getMessage() for r in caplog.records]
    assert said and all(f"the lock file {path}.soft" in m for m in said)
    assert "delete it if no bldseg process uses" in said[0]


def test_a_wait_on_a_held_lock_is_named(tmp_path, monkeypatch, caplog):
    # with flock the wait was silent: a process waiting for another's op build looked hung
    import logging

    import filelock
    from filelock import Timeout

    from bldseg import io

    monkeypatch.setattr(io, "SOFT_LOCK_NOTE_S", 0.05)
    path = tmp_path / "x.lock"
    holder = filelock.FileLock(str(path))  # another open file: flock conflicts as across processes
    holder.acquire()
    try:
        level = caplog.at_level(logging.WARNING, logger="bldseg.io")
        with level, pytest.raises(Timeout), file_lock(path, timeout=0.3):
            pass
    finally:
        holder.release()
    said = [r.getMessage() for r in caplog.records]
    assert said and all(f"for the lock on {path}: another process holds it" in m for m in said)
    assert not (tmp_path / "x.lock.soft").exists()
    with file_lock(path, timeout=0.3):  # released: taken at once
        pass

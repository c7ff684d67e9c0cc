"""Small file helpers shared by the library and the benchmarks."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def finite_json(obj: Any) -> Any:
    """``obj`` with every non-finite number (NaN, +-inf; Python or numpy) replaced by None.

    JSON has no NaN or Infinity: Python writes them as bare words that strict readers
    (JavaScript's ``JSON.parse``, the MLflow UI's artifact view, ``jq``, Go, Rust) refuse.
    ``null`` is what they read, as pandas' ``to_json`` and ``JSON.stringify`` write it.
    Tuples become lists, as :func:`json.dumps` writes them.
    """
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_json(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    return obj


def _number(obj: Any) -> float | None:
    """JSON value of a number type json does not know (numpy, torch scalars)."""
    return finite_json(float(obj))


@contextmanager
def atomic_path(
    path: str | os.PathLike, suffix: str = "", *, unique: bool = True
) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` when the block ends.

    The name is hidden and unique to the call (two processes writing one file each rename their
    own whole file), ends with ``suffix`` (writers that pick the format from it, or append it:
    ``".png"``, ``".npz"``), and is removed when the block raises, so a failed write (a full
    disk) leaves neither half a file nor a stray temporary. Creates the parent folders.
    ``unique=False``: ``<name>.tmp<suffix>``, for files one process writes (a run's checkpoints):
    a temporary that a killed process left is overwritten by the next write, not piled up.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = f".{os.getpid()}-{uuid.uuid4().hex[:8]}" if unique else ""
    name = f".{path.name}{tag}.tmp{suffix}" if unique else f"{path.name}.tmp{suffix}"
    tmp = path.with_name(name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj: Any, **dumps: Any) -> Path:
    """Writes ``obj`` as strict JSON through a temporary name, so a reader never sees half a file.

    Creates the parent folders. ``dumps`` go to :func:`json.dumps` (default: ``indent=2``,
    numpy scalars and other numbers as floats). Non-finite numbers are written as ``null``
    (:func:`finite_json`). The temporary file is unique to the call (two processes writing one
    file, e.g. K-fold processes on a shared folder, each rename their own whole file) and is
    removed when the write fails.

    Raises:
        OSError: The file cannot be written (full disk, quota, permissions); names ``path``.
    """
    path = Path(path)
    text = json.dumps(finite_json(obj), **{"indent": 2, "default": _number, **dumps}) + "\n"
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    except OSError as e:
        raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from e
    return path


#: What ``flock`` says on a filesystem that cannot lock: ENOSYS (Lustre without ``-o flock``,
#: some FUSE mounts), ENOLCK (NFS without a running lock daemon), EOPNOTSUPP.
NO_FLOCK_ERRNOS = frozenset({errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP})


@contextmanager
def file_lock(path: str | os.PathLike, timeout: float = -1) -> Iterator[None]:
    """Holds an exclusive lock on ``path`` (an OS file lock; a lock file's existence where the
    filesystem cannot lock files) for the block.

    Caches and native builds live on shared folders (an NFS home, a cluster's scratch): a
    filesystem without ``flock`` must not end a run in a traceback (filelock raises
    NotImplementedError or OSError there, by version). The fallback lock is another file,
    ``<path>.soft``: the OS lock's file stays in place after release. ``timeout`` seconds
    (-1: no limit) to wait for another holder, then ``filelock.Timeout``. A lock file outlives a
    killed holder (filelock clears it only for a dead process of this host), so waiting on one
    warns every :data:`SOFT_LOCK_NOTE_S` seconds, naming it.
    """
    from filelock import FileLock, SoftFileLock

    path = str(path)
    lock = FileLock(path)
    try:
        _acquire_noting(lock, timeout, soft=False)
    except (NotImplementedError, OSError) as err:
        if isinstance(err, OSError) and err.errno not in NO_FLOCK_ERRNOS:
            raise
        lock = SoftFileLock(path + ".soft")
        _acquire_noting(lock, timeout, soft=True)
    try:
        yield
    finally:
        lock.release()


#: Seconds between the warnings of a wait on a lock (:func:`file_lock`).
SOFT_LOCK_NOTE_S = 30.0


def _acquire_noting(lock: Any, timeout: float, soft: bool) -> None:
    """Acquires a filelock lock, warning every :data:`SOFT_LOCK_NOTE_S` seconds while it waits:
    a silent wait looks like a hang (another process building the op takes minutes), and a
    lock file (``soft``) may be a killed process's."""
    from filelock import Timeout

    start = time.monotonic()
    while True:
        left = None if timeout < 0 else timeout - (time.monotonic() - start)
        step = SOFT_LOCK_NOTE_S if left is None else max(0.0, min(SOFT_LOCK_NOTE_S, left))
        try:
            lock.acquire(timeout=step)
            return
        except Timeout:
            if left is not None and left <= SOFT_LOCK_NOTE_S:
                raise
            waited = time.monotonic() - start
            if soft:
                log.warning(
                    "waiting %.0f s for the lock file %s (this filesystem cannot lock files); a "
                    "killed process leaves it behind: delete it if no bldseg process uses %s",
                    waited,
                    lock.lock_file,
                    Path(lock.lock_file).parent,
                )
            else:
                log.warning(
                    "waiting %.0f s for the lock on %s: another process holds it (building the "
                    "native op, writing a cache or creating an MLflow store); the wait ends when "
                    "it does",
                    waited,
                    lock.lock_file,
                )

"""One process at a time trains into a run folder: ``fit`` holds ``<out>/.run.lock`` for the
whole run, refuses a folder that another process trains into (leaving its files as they are),
and lets the next ``fit`` in (a resume, a search's next trial) once it has returned or raised."""

import re
import subprocess
import sys

import pytest

from bldseg.io import file_lock
from bldseg.train.config import RunConfig
from bldseg.train.engine import RUN_LOCK_FILE, RunFolderInUseError, fit
from tests.train.test_fit_robustness import BASE  # two optimizer steps per epoch

# Another process holding the lock as a running fit does (flock), until its stdin closes.
HOLD = (
    "import fcntl, sys\n"
    "f = open(sys.argv[1], 'a')\n"
    "fcntl.flock(f, fcntl.LOCK_EX)\n"
    "print('held', flush=True)\n"
    "sys.stdin.read()\n"
)


def cfg(**kw) -> RunConfig:
    return RunConfig.from_flat({**BASE, **kw})


def listing(folder):
    """Every file under ``folder`` with its bytes (what a refused run must not touch)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def other_process():
    """Starts a process that holds the lock file ``path`` until the test ends."""
    procs = []

    def hold(path):
        p = subprocess.Popen(
            [sys.executable, "-c", HOLD, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(p)
        assert p.stdout.readline().strip() == "held"
        return p

    yield hold
    for p in procs:
        p.stdin.close()
        p.wait(timeout=30)


def test_a_folder_another_process_trains_into_is_refused(small_world, tmp_path, other_process):
    # Two jobs into one --out both trained and both reported success, the second's best.pt
    # holding the first's epoch.
    run = tmp_path / "run"
    assert fit(cfg(epochs=2), run, data=small_world, stop_after=1).status == "stopped"
    before = listing(run)
    holder = other_process(run / RUN_LOCK_FILE)
    for seed in (0, 2):  # the same run (a resume) or another one: both would write over it
        with pytest.raises(
            RunFolderInUseError, match=f"another process is training into {re.escape(str(run))}"
        ):
            fit(cfg(epochs=2, seed=seed), run, data=small_world)
    assert listing(run) == before
    # its process ended: the run continues where it stopped
    holder.stdin.close()
    holder.wait(timeout=30)
    result = fit(cfg(epochs=2), run, data=small_world)
    assert result.status == "completed" and [r["epoch"] for r in result.history] == [1, 2]


def test_the_lock_is_let_go_when_fit_returns_or_raises(small_world, tmp_path):
    run = tmp_path / "run"
    fit(cfg(epochs=2), run, data=small_world, stop_after=1)
    with file_lock(run / RUN_LOCK_FILE, timeout=0):
        pass
    with pytest.raises(ValueError, match="different config"):
        fit(cfg(epochs=2, seed=2), run, data=small_world)
    with file_lock(run / RUN_LOCK_FILE, timeout=0):
        pass


def test_a_trial_stopped_inside_its_report_lets_the_next_fit_in(small_world, tmp_path):
    # Ray ends a stopped trial's thread with SystemExit inside tune.report (on_epoch_end); a
    # reused worker, or the trial's resume, then fits in this process again.
    def stop(row, out):
        raise SystemExit(0)

    run = tmp_path / "trial"
    with pytest.raises(SystemExit):
        fit(cfg(epochs=2), run, data=small_world, on_epoch_end=stop)
    assert (run / "last.pt").is_file()  # a folder written into is kept
    result = fit(cfg(epochs=2), run, data=small_world)
    assert [r["epoch"] for r in result.history] == [1, 2]


def test_a_run_that_fails_its_checks_leaves_no_folder(small_world, tmp_path):
    # the folder made to hold the lock goes again: nothing was trained into it
    run = tmp_path / "new" / "run"
    with pytest.raises(ValueError, match=re.escape("no training step")):
        fit(cfg(epochs=1, samples_per_epoch=1), run, data=small_world)
    assert not run.exists()

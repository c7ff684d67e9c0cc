"""The local Ray that bldseg starts listens on the loopback interface only."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# A driver the way a search starts one (runner.init_ray without --address), with a worker
# process alive (an actor), so that every kind of Ray process has its servers up.
DRIVER = """
import os, sys
from bldseg.tune.runner import init_ray
address = init_ray(num_cpus=1)
import ray

@ray.remote
class Probe:
    def pid(self):
        return os.getpid()

probe = Probe.remote()
print("READY", address, ray.get(probe.pid.remote()), flush=True)
sys.stdin.readline()  # the test lists the sockets, then closes stdin
ray.shutdown()
"""


def _descendants(root: int) -> set[int]:
    """``root`` and every process below it (Ray's GCS, raylet, agents and workers)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process ended meanwhile
            continue
        pid = int(stat.parent.name)
        ppid = int(text.rsplit(")", 1)[1].split()[1])  # the name may hold spaces: after ")"
        children.setdefault(ppid, []).append(pid)
    out, todo = set(), [root]
    while todo:
        pid = todo.pop()
        out.add(pid)
        todo.extend(children.get(pid, []))
    return out


def _listening(pids: set[int]) -> list[tuple[str, str]]:
    """``(local address, process name)`` of every listening TCP socket owned by ``pids``."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        owners = re.findall(r'\("([^"]*)",pid=(\d+)', line)
        names = [name for name, pid in owners if int(pid) in pids]
        if names:
            found.append((line.split()[3], names[0]))
    return found


LOOPBACK = re.compile(r"^(127\.0\.0\.1|\[::1\]|\[::ffff:127\.0\.0\.1\]):\d+$")


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs `ss` (apt-get install iproute2)")
def test_local_ray_listens_on_loopback_only(tmp_path):
    env = {
        k: v
        for k, v in os.environ.items()
        # bldseg must keep Ray on loopback by itself: not through the switch the test harness
        # sets, and not by joining some other Ray
        if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")
    }
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("READY"), f"the driver did not start Ray: {line!r}"
        _, address, worker = line.split()
        assert address.startswith("127.0.0.1:"), address
        pids = _descendants(proc.pid)
        assert int(worker) in pids
        sockets = _listening(pids)
        names = {n for _, n in sockets}
        # not vacuous: the GCS, the raylet and the worker were seen listening
        assert {"gcs_server", "raylet"} <= names and any(n.startswith("ray::") for n in names), (
            sockets
        )
        exposed = [s for s in sockets if not LOOPBACK.match(s[0])]
        assert not exposed, f"Ray processes listen beyond loopback: {exposed}"
    finally:
        try:
            proc.stdin.close()
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=30)

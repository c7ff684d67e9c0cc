"""Shared fixtures: one small synthetic world per test session (fast, deterministic)."""

import os

import pytest

# Ray maps 127.0.0.1 to the host's network address unless it is told the cluster is one machine;
# the test harness keeps every Ray address on loopback (set before anything imports Ray, and
# inherited by the scripts the tests start).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Under pytest-xdist (`make test`: two workers on the 2-core machine) each worker computes with
# one thread, and so do the scripts it starts (they inherit this, set before torch is
# imported): two workers of two OpenMP threads each on two cores ran the training tests about
# 3x slower (measured: tests/train/test_coteaching.py beside test_folds.py, 217 s vs 71 s).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch

from bldseg.data.prepare import prepare_data

TEST_THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2


@pytest.fixture(scope="session", autouse=True)
def _threads():
    # The CI machine has 2 cores; more threads only add contention.
    torch.set_num_threads(TEST_THREADS)


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    """A 24-image 96-px synthetic world with 30% noisy masks, 32-px test tiles, cached."""
    root = tmp_path_factory.mktemp("world")
    return prepare_data(
        None,
        data_root=root,
        synthetic=dict(
            n_train=24,
            train_size=96,
            n_test=18,
            test_size=32,
            test_scene_size=96,
            noise_fraction=0.3,
            seed=0,
        ),
        progress=False,
    )


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (2 CPUs, no dashboard)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

"""Shared fixtures of the op tests."""

from __future__ import annotations

import pytest

from bldseg.ops import BuildError, BuildInfo, load_dcnv3_op


@pytest.fixture(scope="session")
def dcnv3_op() -> BuildInfo:
    """Builds the compiled DCNv3 op once per test session (reused from the build cache).

    A build failure fails the tests that need the op, with the compiler's message: the
    compiled op is a feature, not an optional extra.
    """
    try:
        return load_dcnv3_op()
    except BuildError as err:
        pytest.fail(f"the DCNv3 op did not build:\n{err}")

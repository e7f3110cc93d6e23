"""Shared fixtures: one local Ray instance for the whole test session; tests that start Ray carry
the ``ray`` marker (``-m "not ray"`` is the fast suite), which is checked, not trusted."""

from __future__ import annotations

import os
import sys

import pytest

# Every local Ray of the session (the fixture's, and those of the kdshield commands the tests run
# in subprocesses) starts without its dashboard: nobody watches it there.
os.environ.setdefault("KDSHIELD_RAY_DASHBOARD", "0")


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray (2 CPUs, as on the CI machine), started once and shut down at the end."""
    import ray

    from kdshield.cluster import connect

    connect(num_cpus=2)
    yield ray
    ray.shutdown()


def pytest_collection_modifyitems(items):
    for item in items:  # every test on the session's Ray is a Ray test
        if "ray_local" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(autouse=True)
def _starting_ray_needs_the_ray_marker(request):
    """A test without the ``ray`` marker that leaves a Ray instance running fails: it would slow
    the fast suite and hide there (Ray Data starts Ray implicitly on first use)."""
    was = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    yield
    if request.node.get_closest_marker("ray") is None and not was and "ray" in sys.modules \
            and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()
        pytest.fail("this test started Ray: mark it @pytest.mark.ray")

"""Shared fixtures: one local Ray instance for the whole test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray (2 CPUs, as on the CI machine), started once and shut down at the end."""
    import ray

    from kdshield.cluster import connect

    connect(num_cpus=2)
    yield ray
    ray.shutdown()

"""Shared fixtures for render tests: one embedded cluster (real worker processes) and a reference render."""

from __future__ import annotations

import pytest

from render_helpers import FAULT


@pytest.fixture(scope="session")
def render_cluster():
    """An embedded cluster of 2 worker processes shared by the render tests (renders pass its address)."""
    from cluster.backends import start

    session = start(workers=2)
    yield session
    session.close()


@pytest.fixture(scope="session")
def fault_reference(render_cluster, tmp_path_factory):
    """An uninterrupted render of the FAULT spec: what every interrupted render must reproduce."""
    from orchestrator.run import render
    from orchestrator.spec import JobSpec

    root = tmp_path_factory.mktemp("reference")
    spec = JobSpec.parse(dict(FAULT, output=str(root / "reference.mp4")))
    result = render(spec, scheduler=render_cluster.scheduler_address, engine="eager")
    return spec, result

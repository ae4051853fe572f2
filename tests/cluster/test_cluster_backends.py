"""Cluster backends: the embedded local cluster, an existing scheduler, optional backends that fail clearly."""

from __future__ import annotations

import importlib.util

import pytest
from distributed import LocalCluster

from cluster.backends import (
    GPU_RESOURCE,
    BackendUnavailable,
    NoModelWorkers,
    connect,
    describe,
    model_workers,
    start,
)

pytestmark = pytest.mark.timeout(180)


def test_local_cluster_has_single_threaded_gpu_workers_on_loopback():
    with connect(workers=2) as session:
        info = describe(session.client)
        assert info["scheduler"].startswith("tcp://127.0.0.1:")
        assert len(info["workers"]) == 2
        for worker in info["workers"]:
            assert worker["address"].startswith("tcp://127.0.0.1:")
            assert worker["threads"] == 1
            assert worker["resources"] == {GPU_RESOURCE: 1}
            assert isinstance(worker["pid"], int)
        assert len({w["pid"] for w in info["workers"]}) == 2  # separate processes
        assert len(model_workers(session.client)) == 2


def test_an_existing_scheduler_is_used_as_is():
    cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=True, resources={GPU_RESOURCE: 1},
                           host="127.0.0.1", dashboard_address=None)
    try:
        session = start(scheduler=cluster.scheduler_address)
        try:
            assert session.cluster is None and session.backend == "scheduler"
            assert session.scheduler_address == cluster.scheduler_address
        finally:
            session.close()
        assert len(cluster.scheduler_info["workers"]) == 1  # closing the client leaves the cluster running
    finally:
        cluster.close()


def test_a_cluster_without_gpu_workers_is_reported():
    cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tcp://",
                           host="127.0.0.1", dashboard_address=None)
    try:
        with pytest.raises(NoModelWorkers, match=f"--resources {GPU_RESOURCE}=1"):
            start(scheduler=cluster.scheduler_address, wait_timeout=2)
    finally:
        cluster.close()


def test_unreachable_scheduler():
    with pytest.raises(ConnectionError, match="scheduler='tcp://127.0.0.1:9'"):
        start(scheduler="tcp://127.0.0.1:9", wait_timeout=2)


@pytest.mark.parametrize("backend, package, module",
                         [("cuda", "dask-cuda", "dask_cuda"), ("slurm", "dask-jobqueue", "dask_jobqueue"),
                          ("kubernetes", "dask-kubernetes", "dask_kubernetes")])
def test_optional_backends_name_the_missing_package(backend, package, module):
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed")
    with pytest.raises(BackendUnavailable) as info:
        start(backend=backend, workers=1)
    assert f"pip install {package}" in str(info.value) and info.value.backend == backend


def test_bad_backend_and_worker_count():
    with pytest.raises(ValueError, match="backend='mpi'"):
        start(backend="mpi")
    with pytest.raises(ValueError, match="workers=0"):
        start(workers=0)

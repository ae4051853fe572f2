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


# Stand-ins for SLURM's commands, for a machine without SLURM: `sbatch` runs the job script it is given on this
# machine, in a session of its own, and prints what sbatch prints; `scancel` ends that session. Everything else
# is real: dask-jobqueue writes the job script from the backend's options, and its worker command starts a real
# worker process that joins the cluster's scheduler.
SBATCH = """#!/usr/bin/env bash
set -e
here="$(dirname "$0")"
n=$(ls "$here"/job-*.sh 2>/dev/null | wc -l)
script="$here/job-$n.sh"
cp "$1" "$script"  # the caller deletes its file once sbatch returns
setsid bash "$script" > "$script.log" 2>&1 < /dev/null &
echo "Submitted batch job $!"
"""
SCANCEL = """#!/usr/bin/env bash
kill -TERM -- "-$1" 2>/dev/null || true
"""


def test_the_slurm_backend_starts_gpu_workers_from_its_job_scripts_and_cancels_them(tmp_path, monkeypatch):
    pytest.importorskip("dask_jobqueue")
    import os
    import sys
    import time

    import psutil

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", SBATCH), ("scancel", SCANCEL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    # Two cores per job: dask-jobqueue would give the worker a thread per core; model workers run one task at a
    # time, so the backend's own "--nthreads 1" must win.
    with connect(backend="slurm", workers=1, cores=2, memory="2GB", python=sys.executable,
                 scheduler_options={"host": "127.0.0.1", "dashboard_address": ":0"},
                 local_directory=str(tmp_path), wait_timeout=120) as session:
        assert session.backend == "slurm"
        (worker,) = describe(session.client)["workers"]
        assert worker["resources"] == {GPU_RESOURCE: 1} and worker["threads"] == 1
        # A model task (it asks for the GPU resource) runs in the job's worker process, not in this one.
        pid = session.client.submit(os.getpid, resources={GPU_RESOURCE: 1}).result(timeout=60)
        assert pid == worker["pid"] != os.getpid()
    (script,) = bin_dir.glob("job-*.sh")
    text = script.read_text()
    assert "#SBATCH --gres=gpu:1" in text  # one GPU per job, as the worker's resource promises
    assert f"--resources {GPU_RESOURCE}=1" in text and "--nthreads 1" in text
    # Closing the session cancelled the job: its worker process ends.
    deadline = time.monotonic() + 30
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, f"worker {pid} still running after its job was cancelled"
        time.sleep(0.2)


def _slurm_job_script(site: dict) -> str:
    """The job script the slurm backend submits under the site's dask-jobqueue settings."""
    import dask

    from cluster.backends import slurm_cluster

    with dask.config.set(site):  # dask-jobqueue reads some settings when it writes each job's script
        cluster = slurm_cluster(scheduler_options={"host": "127.0.0.1", "dashboard_address": ":0"})
        try:
            return cluster.job_script()
        finally:
            cluster.close()


def test_the_slurm_backend_keeps_the_sites_jobqueue_settings_and_adds_what_model_workers_need():
    pytest.importorskip("dask_jobqueue")
    script = _slurm_job_script({"jobqueue.slurm.queue": "gpu-long", "jobqueue.slurm.account": "studio",
                                "jobqueue.slurm.cores": 8, "jobqueue.slurm.walltime": "12:00:00",
                                "jobqueue.slurm.worker-extra-args": ["--nthreads", "8"]})
    for directive in ("-p gpu-long", "-A studio", "--cpus-per-task=8", "-t 12:00:00", "--gres=gpu:1"):
        assert f"#SBATCH {directive}" in script, directive
    command = script.strip().splitlines()[-1]
    assert command.endswith(f"--resources {GPU_RESOURCE}=1 --nthreads 1")  # the last --nthreads wins

    # A site that already asks for GPUs its own way is not given a second request.
    script = _slurm_job_script({"jobqueue.slurm.job-extra-directives": ["--gpus-per-task=1"]})
    assert "#SBATCH --gpus-per-task=1" in script and "--gres" not in script


def test_the_kubernetes_cluster_gives_each_worker_a_gpu_and_the_scheduler_none():
    pytest.importorskip("dask_kubernetes")
    from cluster.backends import kubernetes_cluster_spec

    spec = kubernetes_cluster_spec(name="render-7", image="registry.example/longshot:1", workers=3,
                                   env={"LONGSHOT_STORE": "s3://renders"})
    assert spec["kind"] == "DaskCluster" and spec["metadata"]["name"] == "render-7"
    worker = spec["spec"]["worker"]
    assert worker["replicas"] == 3
    (container,) = worker["spec"]["containers"]
    assert container["image"] == "registry.example/longshot:1"
    assert container["resources"] == {"limits": {"nvidia.com/gpu": "1"}}
    assert container["args"][:6] == ["dask", "worker", "--resources", f"{GPU_RESOURCE}=1", "--nthreads", "1"]
    assert {"name": "LONGSHOT_STORE", "value": "s3://renders"} in container["env"]
    (scheduler,) = spec["spec"]["scheduler"]["spec"]["containers"]
    assert "resources" not in scheduler and scheduler["image"] == "registry.example/longshot:1"

    # The image comes from the site's Dask configuration unless that still names plain Dask's image.
    import dask

    with dask.config.set({"kubernetes.image": "registry.example/longshot:2"}):
        assert kubernetes_cluster_spec()["spec"]["worker"]["spec"]["containers"][0]["image"] == \
            "registry.example/longshot:2"
    assert kubernetes_cluster_spec()["spec"]["worker"]["spec"]["containers"][0]["image"] == "longshot:latest"

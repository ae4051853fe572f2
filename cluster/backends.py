"""Where Dask workers come from.

Every backend yields a `distributed.Client` whose workers each advertise one unit of the abstract resource
"GPU", which is what model tasks ask for, so one worker process runs one model task at a time:

- ``local`` (default): an embedded `LocalCluster` of worker processes on the loopback interface;
- an existing scheduler address (``tcp://host:port``) started with ``dask scheduler`` and
  ``dask worker ADDR --resources GPU=1``;
- ``cuda``: dask-cuda's `LocalCUDACluster`, one worker per visible GPU;
- ``slurm``: dask-jobqueue's `SLURMCluster` (one GPU job per worker, adaptive);
- ``kubernetes``: the dask-kubernetes operator's `KubeCluster` (adaptive).

The optional backends import their package only when chosen and say which package to install if it is
missing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import threading
import time
from typing import Any, Iterator

import dask
from distributed import Client, LocalCluster

log = logging.getLogger(__name__)

BACKENDS = ("local", "cuda", "slurm", "kubernetes")
GPU_RESOURCE = "GPU"


class BackendUnavailable(RuntimeError):
    """A cluster backend was chosen whose package is not installed."""

    def __init__(self, backend: str, package: str, cause: BaseException | None = None):
        self.backend, self.package = backend, package
        super().__init__(
            f"the {backend!r} cluster backend needs the {package} package: pip install {package}"
            + (f" ({cause})" if cause else "")
        )


class NoModelWorkers(RuntimeError):
    """The cluster has no worker that offers the GPU resource model tasks need."""


@dataclasses.dataclass
class ClusterSession:
    """A connected client and, for embedded or launched clusters, the cluster this process owns."""

    client: Client
    cluster: Any = None
    backend: str = "scheduler"

    @property
    def scheduler_address(self) -> str:
        return self.client.scheduler.address

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()
        if self.cluster is not None:
            with contextlib.suppress(Exception):
                self.cluster.close()


def default_workers() -> int:
    """One worker per GPU when there are GPUs, else one per CPU core (each runs one torch thread)."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.device_count()
    except ImportError:
        pass
    return max(1, min(os.cpu_count() or 1, 8))


def local_cluster(workers: int | None = None, *, threads_per_worker: int = 1, dashboard: bool = False,
                  **options) -> LocalCluster:
    """Embedded cluster: in-process scheduler and `workers` worker processes on 127.0.0.1."""
    n = workers if workers is not None else default_workers()
    if n < 1:
        raise ValueError(f"workers={n}: need at least 1 worker")
    with _workers_ignore_interrupts():
        return LocalCluster(
            n_workers=n,
            processes=True,
            threads_per_worker=threads_per_worker,
            resources={GPU_RESOURCE: 1},
            host="127.0.0.1",
            dashboard_address=":0" if dashboard else None,
            # The scheduler serves /health and /metrics even without a dashboard; a free port avoids clashing
            # with another cluster on the default 8787.
            scheduler_kwargs={"dashboard": dashboard, "dashboard_address": "127.0.0.1:0"},
            **options,
        )


@contextlib.contextmanager
def _workers_ignore_interrupts():
    """Worker processes started inside this block ignore SIGINT.

    Ctrl-C in a terminal reaches the whole process group; the client turns it into a clean cancel and closes
    the cluster, so the workers must not die mid-write with a KeyboardInterrupt of their own. An ignored
    signal stays ignored across the exec that starts a worker process; the client's own handler comes back
    when the block ends (a Ctrl-C in between is not lost on the user: the cluster is only being started).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def cuda_cluster(workers: int | None = None, **options):
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError as err:
        raise BackendUnavailable("cuda", "dask-cuda", err) from None
    kwargs = dict(threads_per_worker=1, resources={GPU_RESOURCE: 1})
    if workers is not None:
        kwargs["n_workers"] = workers
    return LocalCUDACluster(**kwargs, **options)


def slurm_cluster(workers: int | None = None, *, adapt: tuple[int, int] | None = None, **options):
    """One SLURM job per model worker: one GPU, one worker process with one thread.

    Site settings (partition, account, walltime, cores, memory, prologue) come from dask-jobqueue's own
    configuration (``jobqueue.slurm`` in ``~/.config/dask/jobqueue.yaml`` or ``DASK_JOBQUEUE__SLURM__*``) or from
    ``options``, as for any dask-jobqueue deployment; what a model worker needs is added to them: the GPU
    resource and a single thread on the worker, and a GPU per job unless the site already asks for one.
    """
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError as err:
        raise BackendUnavailable("slurm", "dask-jobqueue", err) from None

    def setting(key: str, default):  # the caller's option, else the site's dask-jobqueue setting, else ours
        value = options.pop(key, None)
        return value if value is not None else dask.config.get(f"jobqueue.slurm.{key.replace('_', '-')}",
                                                               None) or default

    directives = list(setting("job_extra_directives", []))
    if not any("--gres" in d or "--gpus" in d for d in directives):
        directives.append("--gres=gpu:1")
    kwargs = dict(
        cores=setting("cores", 4),
        memory=setting("memory", "32GB"),
        processes=1,
        # After the site's own worker arguments, so that these win where both are given.
        worker_extra_args=[*setting("worker_extra_args", []), "--resources", f"{GPU_RESOURCE}=1",
                           "--nthreads", "1"],
        job_extra_directives=directives,
    )
    cluster = SLURMCluster(**kwargs, **options)
    _scale(cluster, workers, adapt)
    return cluster


# dask-kubernetes's default image: plain Dask, without Longshot and its model, so it cannot run model tasks.
DASK_DEFAULT_IMAGE = "ghcr.io/dask/dask:latest"


def kubernetes_cluster_spec(*, name: str = "longshot", image: str | None = None, workers: int | None = None,
                            resources: dict | None = None, env: dict | None = None) -> dict:
    """The DaskCluster resource the kubernetes backend creates: model workers that each hold one GPU and run
    one task at a time, and a scheduler pod without a GPU.

    ``image``: an image with Longshot installed; by default the site's ``kubernetes.image`` in the Dask
    configuration (``DASK_KUBERNETES__IMAGE``) unless that is still plain Dask's, else ``longshot:latest``.

    ``resources`` (default one ``nvidia.com/gpu``) are each worker container's; the dask-kubernetes operator
    would give them to the scheduler's container too, where a GPU would be held for the whole render and never
    used, so they are taken off it.
    """
    try:
        from dask_kubernetes.operator import make_cluster_spec
    except ImportError as err:
        raise BackendUnavailable("kubernetes", "dask-kubernetes", err) from None
    if image is None:
        configured = dask.config.get("kubernetes.image", None)
        image = configured if configured and configured != DASK_DEFAULT_IMAGE else "longshot:latest"
    spec = make_cluster_spec(name=name, image=image, n_workers=workers or 1, env=env,
                             resources=resources or {"limits": {"nvidia.com/gpu": "1"}},
                             worker_command=["dask", "worker", "--resources", f"{GPU_RESOURCE}=1", "--nthreads", "1"])
    for container in spec["spec"]["scheduler"]["spec"]["containers"]:
        container.pop("resources", None)
    return spec


def kubernetes_cluster(workers: int | None = None, *, adapt: tuple[int, int] | None = None, **options):
    try:
        from dask_kubernetes.operator import KubeCluster
    except ImportError as err:
        raise BackendUnavailable("kubernetes", "dask-kubernetes", err) from None
    spec = kubernetes_cluster_spec(**{key: options.pop(key) for key in ("name", "image", "resources", "env")
                                      if key in options}, workers=workers)
    cluster = KubeCluster(custom_cluster_spec=spec, **options)
    _scale(cluster, workers, adapt)
    return cluster


def _scale(cluster, workers: int | None, adapt: tuple[int, int] | None) -> None:
    if adapt is not None:
        cluster.adapt(minimum=adapt[0], maximum=adapt[1])
    elif workers is not None:
        cluster.scale(workers)


_LAUNCHERS = {"local": local_cluster, "cuda": cuda_cluster, "slurm": slurm_cluster, "kubernetes": kubernetes_cluster}


def start(*, scheduler: str | None = None, backend: str = "local", workers: int | None = None,
          adapt: tuple[int, int] | None = None, wait_timeout: float = 120.0, **options) -> ClusterSession:
    """Connect to `scheduler`, or launch a cluster with `backend`; wait until a model worker is there.

    `adapt=(minimum, maximum)` lets the launched cluster scale its workers with the queue (Dask's adaptive
    deployment); `options` go to the backend's cluster class."""
    if adapt is not None and not (1 <= adapt[0] <= adapt[1]):
        raise ValueError(f"adapt={adapt}: need 1 <= minimum <= maximum")
    if scheduler:
        try:
            client = Client(scheduler, timeout=f"{int(wait_timeout)}s")
        except OSError as err:
            raise ConnectionError(f"scheduler={scheduler!r}: cannot connect: {err}") from None
        session = ClusterSession(client=client, backend="scheduler")
    else:
        if backend not in _LAUNCHERS:
            raise ValueError(f"backend={backend!r}: choose one of {', '.join(BACKENDS)}")
        launcher = _LAUNCHERS[backend]
        if backend in ("slurm", "kubernetes"):
            cluster = launcher(workers, adapt=adapt, **options)
        else:
            cluster = launcher(workers, **options)
            if adapt is not None:
                cluster.adapt(minimum=adapt[0], maximum=adapt[1])
        session = ClusterSession(client=Client(cluster), cluster=cluster, backend=backend)
    try:
        wait_for_model_workers(session.client, timeout=wait_timeout)
    except BaseException:
        session.close()
        raise
    return session


@contextlib.contextmanager
def connect(**kwargs) -> Iterator[ClusterSession]:
    """`start(...)` as a context manager that closes what it opened."""
    session = start(**kwargs)
    try:
        yield session
    finally:
        session.close()


def model_workers(client: Client) -> dict[str, dict]:
    """Workers that offer the GPU resource, by address."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    return {addr: info for addr, info in workers.items() if info.get("resources", {}).get(GPU_RESOURCE, 0) >= 1}


def wait_for_model_workers(client: Client, n: int = 1, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while len(model_workers(client)) < n:
        if time.monotonic() > deadline:
            found = len(client.scheduler_info(n_workers=-1)["workers"])
            raise NoModelWorkers(
                f"the cluster at {client.scheduler.address} has {found} worker(s) but none offers the "
                f"{GPU_RESOURCE} resource; start workers with `dask worker {client.scheduler.address} "
                f"--resources {GPU_RESOURCE}=1 --nthreads 1`"
            )
        time.sleep(0.1)


def describe(client: Client) -> dict:
    """A JSON-able picture of the cluster: scheduler address and each worker's pid, resources and threads."""
    info = client.scheduler_info(n_workers=-1)
    pids = client.run(os.getpid)
    return {
        "scheduler": info.get("address", client.scheduler.address),
        "dashboard": client.dashboard_link if "dashboard" in info.get("services", {}) else None,
        "workers": [
            {
                "address": addr,
                "name": str(worker.get("name")),
                "pid": pids.get(addr),
                "threads": worker.get("nthreads"),
                "memory_limit": worker.get("memory_limit"),
                "resources": worker.get("resources", {}),
            }
            for addr, worker in sorted(info["workers"].items())
        ],
    }

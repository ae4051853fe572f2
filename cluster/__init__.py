"""Where Dask workers come from (backends) and what each worker process holds (the Generator plugin)."""

from cluster.backends import (
    BACKENDS,
    BackendUnavailable,
    ClusterSession,
    NoModelWorkers,
    connect,
    describe,
    start,
)
from cluster.worker import GeneratorPlugin, get_generator, resolve_model, worker_info

__all__ = ["BACKENDS", "BackendUnavailable", "ClusterSession", "GeneratorPlugin", "NoModelWorkers", "connect",
           "describe", "get_generator", "resolve_model", "start", "worker_info"]

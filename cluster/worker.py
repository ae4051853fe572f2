"""What a worker process holds: one Generator, loaded once, on this worker's device.

`GeneratorPlugin` is registered with the client (`client.register_plugin(...)`); Dask runs its `setup` in
every current and future worker process (including ones restarted after a crash). Tasks reach the model
through `get_generator()`, so nothing large ever travels through the scheduler.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import logging
import os
import re
import sys
import threading
import warnings
from typing import Any

from distributed import WorkerPlugin

log = logging.getLogger(__name__)

ENGINES = ("deepspeed", "eager")

_lock = threading.Lock()
_loaded: dict[str, Any] = {"key": None, "generator": None, "info": {}}


class DeepSpeedUnavailableWarning(RuntimeWarning):
    """The DeepSpeed engine was asked for but DeepSpeed cannot be imported; the model runs eagerly."""


def resolve_model(model: str | None) -> str:
    """The model reference a job uses: a preset name or a checkpoint directory.

    None means the shipped demo checkpoint if it is installed, else the `tiny` preset. Raises ValueError
    naming the value when it is neither a known preset nor a checkpoint directory.
    """
    import model as model_pkg

    if model is None:
        checkpoint = model_pkg.Generator.default_checkpoint()
        return str(checkpoint) if checkpoint is not None else "tiny"
    if model in model_pkg.preset_names():
        return model
    if os.path.isdir(model) and os.path.exists(os.path.join(model, "config.json")):
        return os.path.abspath(model)
    raise ValueError(
        f"model={model!r}: neither a preset ({', '.join(model_pkg.preset_names())}) "
        "nor a checkpoint directory holding config.json"
    )


def pick_device(worker_name: Any = None) -> str:
    """cuda:<local rank> when CUDA is there, else cpu.

    The local rank is LOCAL_RANK if set, else the worker's integer name (LocalCluster names workers 0..n-1),
    taken modulo the visible devices; dask-cuda already restricts each worker to one visible device.
    """
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    count = torch.cuda.device_count()
    rank = os.environ.get("LOCAL_RANK")
    if rank is None:
        match = re.search(r"(\d+)$", str(worker_name or ""))
        rank = match.group(1) if match else "0"
    return f"cuda:{int(rank) % count}"


def load_generator(model: str, *, engine: str = "deepspeed", device: str | None = None,
                   torch_threads: int | None = 1, worker_name: Any = None):
    """Load (or reuse) this process's Generator for `model` and return it."""
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r}: choose one of {', '.join(ENGINES)}")
    import torch

    device = device or pick_device(worker_name)
    key = f"{model}|{engine}|{device}"
    with _lock:
        if _loaded["key"] == key:
            return _loaded["generator"]
        if device == "cpu" and torch_threads:
            # Several worker processes share the CPU cores; one thread each avoids oversubscription.
            torch.set_num_threads(torch_threads)
        from model import Generator

        # Presets build with a fixed seed, so every worker process holds identical random weights.
        generator = Generator.from_name(model, device=device)
        used = engine
        if engine == "deepspeed":
            if importlib.util.find_spec("deepspeed") is None:
                message = ("engine='deepspeed' was requested but DeepSpeed is not installed; "
                           "running the DiT eagerly (pip install deepspeed)")
                warnings.warn(message, DeepSpeedUnavailableWarning, stacklevel=2)
                log.warning(message)
                used = "eager"
            else:
                generator.enable_deepspeed()
                used = generator.engine
        _loaded.update(key=key, generator=generator,
                       info={"model": model, "engine": used, "requested_engine": engine, "device": device,
                             "pid": os.getpid(), "torch_threads": torch.get_num_threads()})
        return generator


def get_generator(model: str | None = None, engine: str | None = None):
    """The Generator loaded in this worker process by GeneratorPlugin.

    With `model` (and `engine`), the caller names the model it needs: if another job's plugin has replaced
    this worker's model in the meantime (two renders sharing one cluster), the right one is loaded again
    rather than silently sampling with the wrong weights.
    """
    info = _loaded["info"]
    if model is not None and (info.get("model") != model or (engine and info.get("requested_engine") != engine)):
        return load_generator(model, engine=engine or "deepspeed")
    generator = _loaded["generator"]
    if generator is None:
        raise RuntimeError("no Generator is loaded in this process; register cluster.worker.GeneratorPlugin")
    return generator


def worker_info() -> dict:
    """Model, engine actually in use, device and pid of this worker process."""
    return dict(_loaded["info"])


def unload_generator() -> None:
    with _lock:
        _loaded.update(key=None, generator=None, info={})


_exit_registered = False


def _exit_without_finalizing() -> None:
    # The interpreter's final garbage collection over the torch / open_clip object graph takes seconds on a
    # busy machine, long enough for the nanny to give up and kill the process. Everything a task writes is
    # durable when the task ends, so a worker that is shutting down has nothing left to finalize.
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


def _exit_fast_at_shutdown() -> None:
    global _exit_registered
    if not _exit_registered:
        atexit.register(_exit_without_finalizing)  # runs first: atexit handlers run last-registered first
        _exit_registered = True


class GeneratorPlugin(WorkerPlugin):
    """Load the job's Generator once per worker process, on the worker's device, with the chosen engine."""

    name = "longshot-generator"

    def __init__(self, model: str, engine: str = "deepspeed", device: str | None = None,
                 torch_threads: int | None = 1):
        if engine not in ENGINES:
            raise ValueError(f"engine={engine!r}: choose one of {', '.join(ENGINES)}")
        self.model, self.engine, self.device, self.torch_threads = model, engine, device, torch_threads

    def setup(self, worker=None):
        _exit_fast_at_shutdown()
        load_generator(self.model, engine=self.engine, device=self.device, torch_threads=self.torch_threads,
                       worker_name=getattr(worker, "name", None))

    def teardown(self, worker=None):
        # Kept on purpose: a replacement plugin for the same model (every render registers one) reuses the
        # loaded Generator instead of loading it again; a different model replaces it in load_generator.
        pass

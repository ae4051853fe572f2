"""The worker plugin: one Generator per worker process, one torch thread, a chosen engine."""

from __future__ import annotations

import importlib.util
import os

import pytest

from cluster.backends import connect
from cluster.worker import GeneratorPlugin, get_generator, pick_device, resolve_model

pytestmark = pytest.mark.timeout(240)


def _generator_facts():
    import torch

    from cluster.worker import get_generator, worker_info

    gen = get_generator()
    return {"pid": os.getpid(), "generator": id(gen), "threads": torch.get_num_threads(),
            "preset": gen.identity["preset"], **worker_info()}


def test_plugin_loads_the_generator_once_per_worker_process():
    with connect(workers=2) as session:
        client = session.client
        client.register_plugin(GeneratorPlugin("tiny", engine="deepspeed"))
        first = client.run(_generator_facts)
        assert len({facts["pid"] for facts in first.values()}) == 2
        for facts in first.values():
            assert facts["preset"] == "tiny" and facts["device"] == "cpu" and facts["threads"] == 1
            assert facts["requested_engine"] == "deepspeed"
            assert facts["engine"] == ("deepspeed" if importlib.util.find_spec("deepspeed") else "eager")
        # Tasks reach the same Generator object; registering the plugin again (every render does) reuses it.
        client.register_plugin(GeneratorPlugin("tiny", engine="deepspeed"))
        again = client.run(_generator_facts)
        assert {a: f["generator"] for a, f in again.items()} == {a: f["generator"] for a, f in first.items()}
        # A different engine is a different load.
        client.register_plugin(GeneratorPlugin("tiny", engine="eager"))
        eager = client.run(_generator_facts)
        assert all(f["engine"] == "eager" for f in eager.values())
        # A task that names its model gets it even if another job's plugin replaced the worker's model.
        assert set(client.run(_named_model_engine).values()) == {"tiny/deepspeed"}


def _named_model_engine():
    from cluster.worker import get_generator, worker_info

    get_generator("tiny", "deepspeed")
    return f"{worker_info()['model']}/{worker_info()['requested_engine']}"


def test_get_generator_without_the_plugin_says_what_is_missing():
    with pytest.raises(RuntimeError, match="GeneratorPlugin"):
        get_generator()


def test_model_references():
    from model import Generator

    default = resolve_model(None)
    checkpoint = Generator.default_checkpoint()
    assert default == (str(checkpoint) if checkpoint is not None else "tiny")
    assert resolve_model("tiny") == "tiny"
    with pytest.raises(ValueError, match="model='no-such-model'"):
        resolve_model("no-such-model")
    with pytest.raises(ValueError, match="engine='tensorrt'"):
        GeneratorPlugin("tiny", engine="tensorrt")


def test_device_is_cpu_without_cuda():
    import torch

    if torch.cuda.is_available():
        assert pick_device("3").startswith("cuda:")
    else:
        assert pick_device("3") == "cpu"

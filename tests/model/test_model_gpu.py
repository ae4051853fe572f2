"""CUDA checks: bf16 sampling and fp32 VAE on a GPU (skipped without one)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from model import Generator, Window
from model_test_helpers import latents, randomize_

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

WINDOW = Window(observed_times=(0, 5), latent_times=(1, 2, 3), height=8, width=8)


@pytest.fixture(scope="module")
def gpu_gen():
    # The fp32 VAE comparisons below need true fp32 convolutions, not TF32.
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    gen = Generator.from_preset("tiny", device="cuda", seed=0)
    randomize_(gen.model.dit, 1000)
    yield gen
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_cuda_samples_in_bf16_deterministically(gpu_gen):
    assert gpu_gen.dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32)
    observed = latents(2, gpu_gen.latent_channels, 8, 8, seed=1)
    a = gpu_gen.sample(WINDOW, observed, "a comet", seed=4, steps=3, guidance=4.0, sampler="heun")
    b = gpu_gen.sample(WINDOW, observed, "a comet", seed=4, steps=3, guidance=4.0, sampler="heun")
    assert a.device.type == "cpu" and a.dtype == torch.float32 and a.shape == (3, 4, 8, 8)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)


def test_cuda_cached_sampling_is_close_to_uncached(gpu_gen):
    observed = latents(2, gpu_gen.latent_channels, 8, 8, seed=1)
    kw = dict(seed=4, steps=3, guidance=2.0, causal=True)
    cached = gpu_gen.sample(WINDOW, observed, "a comet", use_cache=True, **kw)
    uncached = gpu_gen.sample(WINDOW, observed, "a comet", use_cache=False, **kw)
    # bf16 rounds differently when the keys come in another order, so only a loose bound holds; a real
    # mismatch between the two paths shows up as an error of order one.
    assert float((cached - uncached).abs().amax() / uncached.abs().amax()) < 0.1


def test_cuda_chunked_decode_equals_one_shot(gpu_gen):
    z = latents(8, gpu_gen.latent_channels, 4, 4, seed=2)
    full = gpu_gen.decode_float(z)
    part = gpu_gen.decode_float(z[5:8], context=z[1:5])
    assert (part - full[17:29]).abs().amax() <= 1e-3


def test_cuda_matches_cpu(gpu_gen):
    cpu = Generator.from_preset("tiny", device="cpu", seed=0)
    randomize_(cpu.model.dit, 1000)
    z = latents(3, 4, 4, 4, seed=3)
    assert (gpu_gen.decode_float(z) - cpu.decode_float(z)).abs().amax() <= 5e-2


def test_cuda_trains_every_part_and_resumes_on_the_cpu(tmp_path):
    import json

    from model.train import main

    run = tmp_path / "run"
    common = ["--preset", "tiny", "--run", str(run), "--save-every", "1", "--log-every", "1", "--warmup", "1"]
    assert main(["vae", *common, "--steps", "2", "--batch", "1", "--device", "cuda"]) == 0
    assert main(["text", *common, "--steps", "2", "--batch", "4", "--device", "cuda"]) == 0
    assert main(["dit", *common, "--steps", "2", "--batch", "2", "--device", "cuda"]) == 0
    assert main(["dit", *common, "--steps", "3", "--batch", "2", "--device", "cpu"]) == 0
    compute = json.loads((run / "dit" / "dit.json").read_text())["compute"]
    assert [(r["device"].split(":")[0], r["from"], r["to"]) for r in compute] == [("cuda", 0, 2), ("cpu", 2, 3)]
    weights = load_file(str(run / "dit" / "dit.safetensors"))
    assert all(torch.isfinite(v.float()).all() for v in weights.values())

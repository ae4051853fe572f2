"""DeepSpeed-inference wrapping of the DiT on the CPU gives the eager output."""
from __future__ import annotations

import copy

import pytest
import torch

from model import Window
from model.deepspeed_compat import ROW_PARALLEL_LINEARS, injection_policy
from model.dit import DiTBlock
from model_test_helpers import latents, tiny_generator

WINDOW = Window(observed_times=(0, 6), latent_times=(2, 3, 4), height=8, width=8)


@pytest.fixture(scope="module")
def wrapped():
    """One tiny generator with its eager outputs recorded, then wrapped by DeepSpeed."""
    gen = tiny_generator(seed=7)
    observed = latents(2, gen.latent_channels, 8, 8, seed=8)
    eager = {use_cache: gen.sample(WINDOW, observed, "a glacier", seed=2, steps=2, guidance=4.0, sampler="heun",
                                   use_cache=use_cache)
             for use_cache in (True, False)}
    gen.enable_deepspeed()
    return gen, observed, eager


def test_policy_names_the_row_parallel_linears():
    policy = injection_policy()
    assert set(policy) == {DiTBlock}
    assert set(policy[DiTBlock]) == {"spatial_attn.proj", "temporal_attn.proj", "cross_attn.proj", "mlp.fc2"}


@pytest.mark.parametrize("use_cache", [True, False])
def test_deepspeed_gives_the_eager_output(wrapped, use_cache):
    gen, observed, eager = wrapped
    assert gen.engine == "deepspeed"
    out = gen.sample(WINDOW, observed, "a glacier", seed=2, steps=2, guidance=4.0, sampler="heun",
                     use_cache=use_cache)
    torch.testing.assert_close(out, eager[use_cache], rtol=1e-5, atol=1e-5)


def test_row_parallel_linears_become_allreduce_layers(wrapped):
    from deepspeed.module_inject.layers import LinearAllreduce

    gen, _, _ = wrapped
    for block in gen.model.dit.blocks:
        modules = dict(block.named_modules())
        for name in ROW_PARALLEL_LINEARS:
            assert isinstance(modules[name], LinearAllreduce), name
        # Column-parallel layers (split by output features) must not sum across ranks.
        for name in ("spatial_attn.q", "temporal_attn.k", "cross_attn.v", "mlp.fc1"):
            assert not isinstance(modules[name], LinearAllreduce), name


def test_a_dit_swapped_in_after_wrapping_is_the_one_sampled():
    # Scripts that train a DiT score it by putting it in model.dit; the engine wraps the one loaded before.
    gen = tiny_generator(seed=7)
    observed = latents(2, gen.latent_channels, 8, 8, seed=8)
    other = copy.deepcopy(gen)  # the same text encoder and VAE; another DiT
    with torch.no_grad():
        for weight in other.model.dit.parameters():
            weight.add_(0.05 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(weight.numel())))
    expected = other.sample(WINDOW, observed, "a glacier", seed=2, steps=2, guidance=4.0)
    gen.enable_deepspeed()
    before = gen.sample(WINDOW, observed, "a glacier", seed=2, steps=2, guidance=4.0)
    gen.model.dit = other.model.dit
    assert gen.engine == "eager"
    out = gen.sample(WINDOW, observed, "a glacier", seed=2, steps=2, guidance=4.0)
    assert not torch.allclose(before, expected, atol=1e-3)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)

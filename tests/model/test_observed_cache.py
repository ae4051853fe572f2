"""Generator.sample: the observed key/value cache, determinism, ordering and progress."""
from __future__ import annotations

import pytest
import torch

from model import Window
from model.dit import BlockCache, VideoDiT
from model_test_helpers import latents

WINDOW = Window(observed_times=(9, 0, 3), latent_times=(5, 1, 7), height=8, width=8)


@pytest.fixture(scope="module")
def observed(tiny_gen):
    return latents(3, tiny_gen.latent_channels, 8, 8, seed=20)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().amax() / b.abs().amax())


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sampler", ["euler", "heun"])
@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_cached_and_uncached_sampling_agree(tiny_gen, observed, guidance, sampler, causal):
    kw = dict(seed=5, steps=3, guidance=guidance, sampler=sampler, causal=causal)
    cached = tiny_gen.sample(WINDOW, observed, "a red kite", use_cache=True, **kw)
    uncached = tiny_gen.sample(WINDOW, observed, "a red kite", use_cache=False, **kw)
    assert cached.shape == (3, tiny_gen.latent_channels, 8, 8) and cached.dtype == torch.float32
    assert relative_error(cached, uncached) <= 1e-5
    # The result moved away from the initial noise, so the DiT really took part.
    noise = torch.randn((3, tiny_gen.latent_channels, 8, 8), generator=torch.Generator().manual_seed(5))
    assert (cached - noise[[1, 0, 2]]).abs().amax() > 1e-2


def test_window_without_observed_frames(tiny_gen):
    window = Window(observed_times=(), latent_times=(0, 1, 2), height=4, width=6)
    a = tiny_gen.sample(window, None, "fog", seed=1, steps=2, guidance=3.0, use_cache=True)
    b = tiny_gen.sample(window, None, "fog", seed=1, steps=2, guidance=3.0, use_cache=False)
    assert a.shape == (3, tiny_gen.latent_channels, 4, 6)
    assert torch.equal(a, b)


def test_block_cache_joins_history_and_window_in_a_buffer_kept_across_steps():
    g = torch.Generator().manual_seed(0)
    history_k, history_v = torch.randn(6, 2, 5, 4, generator=g), torch.randn(6, 2, 5, 4, generator=g)
    cache = BlockCache(history_k.clone(), history_v.clone())
    steps = [(torch.randn(6, 2, 3, 4, generator=g), torch.randn(6, 2, 3, 4, generator=g)) for _ in range(3)]
    pointers = set()
    for k, v in steps:
        joined_k, joined_v = cache.with_window(k, v)
        torch.testing.assert_close(joined_k, torch.cat([history_k, k], dim=2), rtol=0, atol=0)
        torch.testing.assert_close(joined_v, torch.cat([history_v, v], dim=2), rtol=0, atol=0)
        pointers.add((joined_k.data_ptr(), joined_v.data_ptr()))
    assert len(pointers) == 1  # one allocation for all steps
    # The history itself is never written to.
    assert torch.equal(cache.k, history_k) and torch.equal(cache.v, history_v)
    # A window of another length gets its own buffer.
    k, v = torch.randn(6, 2, 1, 4, generator=g), torch.randn(6, 2, 1, 4, generator=g)
    joined_k, _ = cache.with_window(k, v)
    assert joined_k.shape == (6, 2, 6, 4) and torch.equal(joined_k[:, :, 5:], k)


class ForwardCounter:
    """Counts DiT forwards that run observed frames, and cache builds, by wrapping the real methods."""

    def __init__(self, monkeypatch, dit: VideoDiT):
        self.observed_forwards = self.latent_forwards = self.cache_builds = 0
        forward, build = dit.forward, dit.observed_cache

        def counting_forward(windows, *args, **kwargs):
            if any(bool(w.observed.any()) for w in windows):
                self.observed_forwards += 1
            else:
                self.latent_forwards += 1
            return forward(windows, *args, **kwargs)

        def counting_cache(*args, **kwargs):
            self.cache_builds += 1
            return build(*args, **kwargs)

        monkeypatch.setattr(dit, "forward", counting_forward)
        monkeypatch.setattr(dit, "observed_cache", counting_cache)


@pytest.mark.parametrize(("sampler", "evaluations"), [("euler", 3), ("heun", 5)])
@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_observed_frames_are_computed_once_per_sampling_call(tiny_gen, observed, monkeypatch, sampler,
                                                             evaluations, guidance):
    count = ForwardCounter(monkeypatch, tiny_gen.model.dit)
    tiny_gen.sample(WINDOW, observed, "a red kite", seed=5, steps=3, guidance=guidance, sampler=sampler)
    # One pass over the observed frames serves every step and both guidance branches (one batched forward).
    assert (count.cache_builds, count.observed_forwards, count.latent_forwards) == (1, 1, evaluations)

    count = ForwardCounter(monkeypatch, tiny_gen.model.dit)
    tiny_gen.sample(WINDOW, observed, "a red kite", seed=5, steps=3, guidance=guidance, sampler=sampler,
                    use_cache=False)
    assert (count.cache_builds, count.observed_forwards, count.latent_forwards) == (0, evaluations, 0)


def test_same_seed_same_latents_different_seed_different(tiny_gen, observed):
    kw = dict(steps=2, guidance=4.0)
    a = tiny_gen.sample(WINDOW, observed, "a red kite", seed=11, **kw)
    b = tiny_gen.sample(WINDOW, observed, "a red kite", seed=11, **kw)
    c = tiny_gen.sample(WINDOW, observed, "a red kite", seed=12, **kw)
    assert torch.equal(a, b)
    assert (a - c).abs().amax() > 1e-2


def test_results_follow_the_order_of_latent_times(tiny_gen, observed):
    shuffled = tiny_gen.sample(WINDOW, observed, "a red kite", seed=3, steps=2, guidance=1.0)
    ordered = tiny_gen.sample(Window(WINDOW.observed_times, (1, 5, 7), 8, 8), observed, "a red kite", seed=3,
                              steps=2, guidance=1.0)
    torch.testing.assert_close(shuffled, ordered[[1, 0, 2]], rtol=0, atol=1e-6)


def test_prompt_and_observed_frames_matter(tiny_gen, observed):
    kw = dict(seed=3, steps=2, guidance=4.0)
    a = tiny_gen.sample(WINDOW, observed, "a red kite", **kw)
    assert (a - tiny_gen.sample(WINDOW, observed, "a submarine", **kw)).abs().amax() > 1e-3
    assert (a - tiny_gen.sample(WINDOW, observed + 1.0, "a red kite", **kw)).abs().amax() > 1e-3


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_progress_callback(tiny_gen, observed, sampler):
    calls = []
    tiny_gen.sample(WINDOW, observed, "a red kite", seed=1, steps=4, guidance=2.0, sampler=sampler,
                    callback=lambda step, total: calls.append((step, total)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]

"""Rectified flow: loss over frame subsets, per-frame noise levels, Euler and Heun samplers."""
from __future__ import annotations

import inspect
import math

import pytest
import torch

from model.flow import (SAMPLERS, flow_loss, get_sampler, guided, noisy, sample_euler, sample_heun,
                        sample_training_times, shift_time, time_schedule, velocity_target, video_noise,
                        window_flow_losses, windows_noise)


def frames(seed: int, n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))


def test_flow_loss_is_zero_for_the_true_velocity_and_ignores_observed_frames():
    x0, noise = frames(0), frames(1)
    latent = torch.tensor([False, True, True, False])
    prediction = velocity_target(x0, noise).clone()
    prediction[~latent] = 1e3  # observed frames' outputs are meaningless and must not count
    assert flow_loss(prediction, x0, noise, latent) == 0.0
    prediction[2] += 0.5
    # Mean over latent frames only: one of two latent frames is off by 0.5 everywhere.
    assert flow_loss(prediction, x0, noise, latent).item() == pytest.approx(0.25 / 2)


def test_flow_loss_with_no_latent_frames_is_zero_not_nan():
    x0, noise = frames(0), frames(1)
    loss = flow_loss(torch.zeros_like(x0), x0, noise, torch.zeros(4, dtype=torch.bool))
    assert loss.item() == 0.0


def test_flow_loss_pixel_weight_shifts_the_share_of_pixels_not_the_scale():
    x0, noise = frames(0), frames(1)
    latent = torch.ones(4, dtype=torch.bool)
    prediction = velocity_target(x0, noise).clone()
    prediction[:, :, 0, 0] += 1.0  # one latent pixel of 16 is wrong in every frame
    plain = flow_loss(prediction, x0, noise, latent).item()
    assert plain == pytest.approx(3 / (3 * 16))
    uniform = torch.full((4, 4, 4), 7.0)
    assert flow_loss(prediction, x0, noise, latent, uniform).item() == pytest.approx(plain)
    on_error = torch.ones(4, 4, 4)
    on_error[:, 0, 0] = 5.0  # the wrong pixel weighs 5 of a frame's total 20
    assert flow_loss(prediction, x0, noise, latent, on_error).item() == pytest.approx(5 / 20)
    elsewhere = torch.ones(4, 4, 4)
    elsewhere[:, 1, 1] = 5.0
    assert flow_loss(prediction, x0, noise, latent, elsewhere).item() == pytest.approx(1 / 20)


def test_window_flow_losses_score_each_window_as_flow_loss_does():
    # Three windows of 3, 1 and 4 frames in one batch: the batched loss is each window's own flow_loss, with
    # pixel weights and observed frames, and a window with no latent frame scores 0.
    lengths = [3, 1, 4]
    x0, noise, prediction = frames(0, 8), frames(1, 8), frames(2, 8)
    latent = torch.tensor([True, False, True, False, False, True, True, True])
    weight = torch.rand(8, 4, 4, generator=torch.Generator().manual_seed(3)) + 0.1
    window = torch.arange(3).repeat_interleave(torch.tensor(lengths))
    batched = window_flow_losses(prediction, x0, noise, latent, window, 3, weight)
    own = [flow_loss(*(t.split(lengths)[i] for t in (prediction, x0, noise, latent, weight))) for i in range(3)]
    torch.testing.assert_close(batched, torch.stack(own))
    assert batched[1].item() == 0.0 and batched[0].item() > 0 and batched[2].item() > 0


def test_windows_noise_shares_a_field_within_each_window_only():
    torch.manual_seed(0)
    window = torch.arange(2).repeat_interleave(200)
    noise = windows_noise(window, 2, (4, 8, 8), 0.8).flatten(1)
    assert noise.std().item() == pytest.approx(1.0, abs=0.1)
    corr = torch.corrcoef(torch.cat([noise[:20], noise[200:220]]))
    within = corr[:20, :20][~torch.eye(20, dtype=torch.bool)]
    assert within.mean().item() == pytest.approx(0.8, abs=0.05)
    assert corr[:20, 20:].abs().mean().item() < 0.1  # another window's frames: another field
    assert torch.corrcoef(windows_noise(window, 2, (4, 8, 8), 0.0).flatten(1)[:20]).fill_diagonal_(0).abs().max() < 0.4


def test_per_frame_noise_levels():
    x0, noise = frames(2), frames(3)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    xt = noisy(x0, noise, t)
    torch.testing.assert_close(xt[0], x0[0])
    torch.testing.assert_close(xt[3], noise[3])
    for i in (1, 2):
        torch.testing.assert_close(xt[i], (1 - t[i]) * x0[i] + t[i] * noise[i])


def test_schedule_and_training_times():
    times = time_schedule(4, shift=3.0)
    assert times[0] == 1.0 and times[-1] == 0.0 and len(times) == 5
    assert (times[1:] < times[:-1]).all()
    # A shift above 1 spends more of the steps at high noise.
    assert (times[1:-1] > time_schedule(4)[1:-1]).all()
    assert shift_time(torch.tensor(0.5), 1.0) == 0.5
    t = sample_training_times(1000, generator=torch.Generator().manual_seed(0))
    assert ((t > 0) & (t < 1)).all()
    with pytest.raises(ValueError, match="steps: must be at least 1, got 0"):
        time_schedule(0)


def point_mass_field(x0: torch.Tensor):
    """The exact rectified-flow velocity when all data is x0: straight lines from x_t to x0."""
    return lambda x, t: (x - x0) / t


@pytest.mark.parametrize("steps", [1, 3, 8])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_is_exact_on_straight_paths(steps, shift):
    x0, x1 = frames(4), frames(5)
    out = sample_euler(point_mass_field(x0), x1.clone(), time_schedule(steps, shift))
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-5)
    # A constant field too: one step, exact.
    v = frames(6)
    torch.testing.assert_close(sample_euler(lambda x, t: v, x1.clone(), time_schedule(steps, shift)), x1 - v,
                               rtol=0, atol=1e-5)


def curved_error(sampler, steps: int) -> float:
    # dx/dt = t * x from t = 1 down to 0: x(0) = x(1) * exp(-1/2).
    x1 = torch.ones(1, dtype=torch.float64)
    times = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    out = sampler(lambda x, t: t * x, x1.clone(), times)
    return abs(float(out) - math.exp(-0.5))


def test_heun_is_second_order_and_euler_first_order():
    euler = [curved_error(sample_euler, n) for n in (8, 16, 32)]
    heun = [curved_error(sample_heun, n) for n in (8, 16, 32)]
    euler_order = math.log2(euler[1] / euler[2])
    heun_order = math.log2(heun[1] / heun[2])
    assert 0.8 < euler_order < 1.3
    assert heun_order > 1.7
    assert all(h < e / 5 for h, e in zip(heun, euler))


def test_heun_does_not_query_the_model_at_zero_noise():
    seen = []
    sample_heun(lambda x, t: seen.append(float(t)) or torch.zeros_like(x), torch.zeros(2), time_schedule(3))
    assert len(seen) == 5 and min(seen) > 0


def test_samplers_share_one_signature_and_report_progress():
    assert inspect.signature(sample_euler) == inspect.signature(sample_heun)
    assert set(SAMPLERS) == {"euler", "heun"}
    for name in SAMPLERS:
        calls = []
        get_sampler(name)(lambda x, t: torch.zeros_like(x), torch.zeros(2), time_schedule(5),
                          callback=lambda step, total: calls.append((step, total)))
        assert calls == [(i, 5) for i in range(1, 6)]
    with pytest.raises(ValueError, match="sampler: unknown sampler 'ddim'; allowed: euler, heun"):
        get_sampler("ddim")


def test_classifier_free_guidance_combines_the_branches():
    cond, uncond = torch.tensor([3.0]), torch.tensor([1.0])
    model = guided(lambda x, t: (cond, uncond), guidance=4.0)
    assert model(torch.zeros(1), torch.tensor(0.5)).item() == pytest.approx(1.0 + 4.0 * 2.0)
    assert guided(lambda x, t: (cond, uncond), guidance=1.0)(None, None).item() == 3.0


def test_guidance_rescale_pulls_the_clean_prediction_back_to_the_conditional_spread():
    x, t = frames(1), torch.tensor(0.6)
    v_cond, v_uncond = frames(2), frames(3)
    dims = (1, 2, 3)

    def x0_std(v):
        return (x - t * v).std(dim=dims)

    plain = guided(lambda x, t: (v_cond, v_uncond), guidance=4.0)(x, t)
    assert torch.equal(guided(lambda x, t: (v_cond, v_uncond), guidance=4.0, rescale=0.0)(x, t), plain)
    full = guided(lambda x, t: (v_cond, v_uncond), guidance=4.0, rescale=1.0)(x, t)
    torch.testing.assert_close(x0_std(full), x0_std(v_cond))  # frame by frame
    assert (x0_std(plain) > 1.5 * x0_std(v_cond)).all(), "guidance 4 must spread the prediction for this test"
    half = guided(lambda x, t: (v_cond, v_uncond), guidance=4.0, rescale=0.5)(x, t)
    assert (x0_std(full) < x0_std(half)).all() and (x0_std(half) < x0_std(plain)).all()
    with pytest.raises(ValueError, match=r"guidance_rescale: must be in \[0, 1\], got 1.5"):
        guided(lambda x, t: (v_cond, v_uncond), guidance=4.0, rescale=1.5)


def test_video_noise_shares_a_field_across_frames():
    own = video_noise(6, (4, 8, 8), 0.0, own=torch.Generator().manual_seed(3))
    assert torch.equal(own, torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(3)))
    noise = video_noise(400, (4, 8, 8), 0.8, own=torch.Generator().manual_seed(3),
                        shared=torch.Generator().manual_seed(9))
    flat = noise.flatten(1)
    assert flat.std().item() == pytest.approx(1.0, abs=0.1)  # still unit variance per element
    corr = torch.corrcoef(flat[:50])
    off_diagonal = corr[~torch.eye(50, dtype=torch.bool)]
    assert off_diagonal.mean().item() == pytest.approx(0.8, abs=0.05)
    # Windows of one video (own seeds differ, the shared seed is the video's) share the field.
    a = video_noise(2, (4, 8, 8), 0.8, own=torch.Generator().manual_seed(1), shared=torch.Generator().manual_seed(9))
    b = video_noise(2, (4, 8, 8), 0.8, own=torch.Generator().manual_seed(2), shared=torch.Generator().manual_seed(9))
    assert torch.corrcoef(torch.stack([a[0].flatten(), b[0].flatten()]))[0, 1] > 0.6

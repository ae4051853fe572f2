"""Rectified flow: the training objective, noise schedules and samplers.

Convention: ``x_t = (1 - t) * x_0 + t * noise`` with t in [0, 1]; the model predicts the velocity
``v = noise - x_0``; sampling integrates dx/dt = v from t = 1 (pure noise) down to t = 0.
Samplers see the model as a callable ``model(x, t) -> v`` and nothing more; all share one signature.
"""
from __future__ import annotations

from typing import Callable

import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, int], None]


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3-style resolution shift: maps t to shift*t / (1 + (shift-1)*t); shift > 1 favours high noise."""
    return shift * t / (1 + (shift - 1) * t)


def time_schedule(steps: int, shift: float = 1.0, device=None) -> torch.Tensor:
    """Descending times (steps + 1,) from 1 to 0."""
    if steps < 1:
        raise ValueError(f"steps: must be at least 1, got {steps}")
    return shift_time(torch.linspace(1.0, 0.0, steps + 1, device=device), shift)


def sample_training_times(n: int, shift: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Logit-normal times (SD3), shifted like the sampling schedule so training matches inference."""
    t = torch.sigmoid(torch.randn(n, generator=generator))
    return shift_time(t, shift)


def noisy(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t for per-frame times t (F,) and frames x0 (F, ...)."""
    t = t.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - t) * x0 + t * noise


def video_noise(frames: int, shape: tuple[int, ...], correlation: float, *, own: torch.Generator | None = None,
                shared: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Noise (frames, *shape) of unit variance per element: each frame's own noise mixed with one field common
    to all (``correlation`` is the common share of the variance; see ``FlowConfig.noise_correlation``).

    ``own`` draws first, so with ``correlation == 0`` the result is exactly ``torch.randn`` from ``own``.
    Sampling a long video passes the same ``shared`` seed to every window, so all its frames share the field.
    """
    noise = torch.randn((frames, *shape), generator=own, device=device)
    if correlation > 0:
        common = torch.randn((1, *shape), generator=shared, device=device)
        noise = correlation ** 0.5 * common + (1.0 - correlation) ** 0.5 * noise
    return noise


def windows_noise(window: torch.Tensor, windows: int, shape: tuple[int, ...], correlation: float) -> torch.Tensor:
    """:func:`video_noise` for the frames of many windows at once (F, *shape): frame i belongs to window
    ``window[i]`` (F,), and the frames of one window share their common field, as each window's frames do in
    :func:`video_noise`. Drawn on ``window``'s device in two calls, whatever the number of windows."""
    noise = torch.randn((len(window), *shape), device=window.device)
    if correlation > 0:
        common = torch.randn((windows, *shape), device=window.device)
        noise = correlation ** 0.5 * common[window] + (1.0 - correlation) ** 0.5 * noise
    return noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def flow_loss(prediction: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, latent: torch.Tensor,
              pixel_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared velocity error over latent frames only (observed frames are given, not learned).

    ``pixel_weight`` (F, h, w), optional: a weight for every latent pixel, normalised within each frame so that a
    frame's loss keeps its scale and only the share of its pixels changes.
    """
    window = torch.zeros(len(x0), dtype=torch.long, device=x0.device)
    return window_flow_losses(prediction, x0, noise, latent, window, 1, pixel_weight)[0]


def window_flow_losses(prediction: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, latent: torch.Tensor,
                       window: torch.Tensor, windows: int, pixel_weight: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`flow_loss` of each of ``windows`` windows (W,), for the frames of many windows at once: frame i
    (of all F) belongs to window ``window[i]``. One call for a training batch's frames instead of one per window:
    on a GPU a training step of hundreds of windows otherwise spends its time launching small kernels."""
    err = (prediction.float() - velocity_target(x0, noise).float()).pow(2).mean(1)  # (F, h, w)
    if pixel_weight is not None:
        w = pixel_weight.float()
        err = err * (w / w.flatten(1).mean(1).clamp(min=1e-6)[:, None, None])
    err = err.flatten(1).mean(1)  # (F,)
    weight = latent.float()
    total = err.new_zeros(windows).index_add(0, window, err * weight)
    count = err.new_zeros(windows).index_add(0, window, weight)
    return total / count.clamp(min=1.0)


@torch.no_grad()
def sample_euler(model: ModelFn, x: torch.Tensor, times: torch.Tensor, callback: Callback | None = None) -> torch.Tensor:
    total = len(times) - 1
    for i in range(total):
        v = model(x, times[i])
        x = x + (times[i + 1] - times[i]) * v
        if callback is not None:
            callback(i + 1, total)
    return x


@torch.no_grad()
def sample_heun(model: ModelFn, x: torch.Tensor, times: torch.Tensor, callback: Callback | None = None) -> torch.Tensor:
    """Heun's second-order method; the final step to t = 0 is an Euler step (the model is not queried at 0)."""
    total = len(times) - 1
    for i in range(total):
        dt = times[i + 1] - times[i]
        v = model(x, times[i])
        x_euler = x + dt * v
        if float(times[i + 1]) > 0:
            x = x + dt * 0.5 * (v + model(x_euler, times[i + 1]))
        else:
            x = x_euler
        if callback is not None:
            callback(i + 1, total)
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {"euler": sample_euler, "heun": sample_heun}


def get_sampler(name: str):
    if name not in SAMPLERS:
        raise ValueError(f"sampler: unknown sampler {name!r}; allowed: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def guided(model_cond_uncond: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
           guidance: float, rescale: float = 0.0) -> ModelFn:
    """Classifier-free guidance: v = v_uncond + guidance * (v_cond - v_uncond).

    ``rescale`` in [0, 1] (guidance rescale, Lin et al. 2024, "Common diffusion noise schedules and sample steps
    are flawed"): a high guidance scale also inflates the spread of the predicted clean frame, which a video shows
    as colours too strong and a picture that jumps from one latent frame to the next. The guided clean-frame
    prediction ``x0 = x - t * v`` is scaled, frame by frame, to the standard deviation of the conditional one,
    and mixed with the unscaled one in the proportion ``rescale``.
    """
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"guidance_rescale: must be in [0, 1], got {rescale}")

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v_cond, v_uncond = model_cond_uncond(x, t)
        v = v_uncond + guidance * (v_cond - v_uncond)
        if rescale == 0.0 or float(t) <= 0.0:
            return v
        dims = tuple(range(1, x.dim()))
        x0_cond, x0 = x - t * v_cond, x - t * v
        ratio = x0_cond.std(dim=dims, keepdim=True) / x0.std(dim=dims, keepdim=True).clamp(min=1e-6)
        x0 = rescale * x0 * ratio + (1.0 - rescale) * x0
        return (x - x0) / t
    return model

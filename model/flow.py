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


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def flow_loss(prediction: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """Mean squared velocity error over latent frames only (observed frames are given, not learned)."""
    err = (prediction.float() - velocity_target(x0, noise).float()).pow(2).flatten(1).mean(1)  # (F,)
    weight = latent.float()
    return (err * weight).sum() / weight.sum().clamp(min=1.0)


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
           guidance: float) -> ModelFn:
    """Classifier-free guidance: v = v_uncond + guidance * (v_cond - v_uncond)."""
    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v_cond, v_uncond = model_cond_uncond(x, t)
        return v_uncond + guidance * (v_cond - v_uncond)
    return model

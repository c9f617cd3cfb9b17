"""Samplers for SiT-style flow models, following REPA's ``samplers.py`` conventions.

Time runs from t = 1 (noise) to t = 0 (data). Linear path: x_t = (1 − t)·x₀ + t·ε, v = ε − x₀.
Cosine path: α = cos(πt/2), σ = sin(πt/2).

All samplers keep their state in float64 and call the model with inputs (latent and time) cast to
the dtype of ``latents``; model outputs are cast back to float64. Time grids are Python floats
computed up front, so the guidance-interval test and step sizes cost no host syncs.

Classifier-free guidance (REPA): when ``cfg_scale > 1`` and ``guidance_low <= t_cur <=
guidance_high``, the model sees the batch [x; x] with labels [y; null] and the velocity becomes
u + s·(c − u) on all channels (or, for the DiT/SiT legacy quirk, only on the first
``guided_channels``). Outside the interval a single conditional pass is made.

Euler–Maruyama (reverse SDE with g²(t) = 2t on both paths, as in REPA): with ρ = α/α̇ the score
implied by a velocity v is  s = (ρ·v − x) / (σ² − ρ·σ·σ̇)  and the drift is  d = v − ½·g²·s.
For the linear path this reduces to s = −((1 − t)·v + x)/t and d = (2 − t)·v + x. REPA applies
CFG to d; since d is affine in v with the same x in both halves, applying it to v (done here) is
the same map.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from itertools import pairwise
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "euler_maruyama_sampler",
    "euler_sampler",
    "guided_velocity",
    "meanflow_sampler",
    "sample",
    "score_from_velocity",
    "sde_drift",
]

PATHS = ("linear", "cosine")
SAMPLERS = ("ode", "ode_heun", "sde", "meanflow")


def _first(out: Any) -> Tensor:
    """Model output tensor; REPA-style models returning ``(out, features)`` give ``out``."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _double(value: Any, n: int) -> Any:
    """Repeat batch-shaped tensors (leading dim ``n``) for the [cond; uncond] batch."""
    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == n:
        return torch.cat([value, value], dim=0)
    return value


def guided_velocity(
    model: Callable[..., Any],
    x: Tensor,
    t: Tensor,
    y: Tensor,
    *,
    cfg_scale: float = 1.0,
    null_label: int | None = None,
    guided_channels: int | None = None,
    out_dtype: torch.dtype | None = None,
    **model_kwargs: Any,
) -> Tensor:
    """One model evaluation with classifier-free guidance.

    ``cfg_scale == 1`` makes a single conditional pass. Otherwise the model sees [x; x] with labels
    [y; null_label] (batch-shaped tensors in ``model_kwargs`` are repeated too) and the result is
    u + cfg_scale·(c − u), on all channels or only the first ``guided_channels`` (the remaining
    channels take the conditional output). ``out_dtype``, if given, is the dtype the model output
    is cast to before guidance is combined (the samplers use float64). Not wrapped in no_grad, so
    it can also serve training-time guidance targets.
    """
    if cfg_scale == 1.0:
        out = _first(model(x, t, y, **model_kwargs))
        return out if out_dtype is None else out.to(out_dtype)
    if null_label is None:
        raise ValueError("classifier-free guidance needs null_label")
    n = x.shape[0]
    kwargs = {k: _double(v, n) for k, v in model_kwargs.items()}
    y_null = torch.full_like(y, null_label)
    out = _first(model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null]), **kwargs))
    if out_dtype is not None:
        out = out.to(out_dtype)
    cond, uncond = out.chunk(2, dim=0)
    guided = uncond + cfg_scale * (cond - uncond)
    if guided_channels is not None:
        guided = torch.cat([guided[:, :guided_channels], cond[:, guided_channels:]], dim=1)
    return guided


def _path_coeffs(t: float | Tensor, path: str) -> tuple[Any, Any, Any, Any]:
    """(α, α̇, σ, σ̇) at time ``t`` (Python float or broadcastable tensor)."""
    if path == "linear":
        return 1 - t, -1.0, t, 1.0
    if path == "cosine":
        half_pi = math.pi / 2
        if isinstance(t, Tensor):
            cos, sin = torch.cos(half_pi * t), torch.sin(half_pi * t)
        else:
            cos, sin = math.cos(half_pi * t), math.sin(half_pi * t)
        return cos, -half_pi * sin, sin, half_pi * cos
    raise ValueError(f"unknown path {path!r}; expected one of {PATHS}")


def _broadcast_t(t: float | Tensor, x: Tensor) -> float | Tensor:
    if isinstance(t, Tensor) and t.dim() == 1:
        return t.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return t


def score_from_velocity(v: Tensor, x: Tensor, t: float | Tensor, path: str = "linear") -> Tensor:
    """Score ∇log p_t(x) implied by the velocity ``v``: (ρ·v − x)/(σ² − ρ·σ·σ̇), ρ = α/α̇.

    ``t`` is a float or an (N,) tensor. Undefined where α̇ = 0 or the denominator vanishes (t = 0).
    """
    t = _broadcast_t(t, x)
    alpha, d_alpha, sigma, d_sigma = _path_coeffs(t, path)
    rho = alpha / d_alpha
    return (rho * v - x) / (sigma**2 - rho * d_sigma * sigma)


def sde_drift(v: Tensor, x: Tensor, t: float | Tensor, path: str = "linear") -> Tensor:
    """Reverse-SDE drift v − ½·g²·score with REPA's g²(t) = 2t (linear: (2 − t)·v + x)."""
    g2 = 2 * _broadcast_t(t, x)
    return v - 0.5 * g2 * score_from_velocity(v, x, t, path)


def _interval_scale(cfg_scale: float, low: float, high: float, t: float) -> float:
    return cfg_scale if cfg_scale > 1.0 and low <= t <= high else 1.0


def _check_cfg(cfg_scale: float, null_label: int | None) -> None:
    if cfg_scale > 1.0 and null_label is None:
        raise ValueError("cfg_scale > 1 needs null_label")


def _velocity(
    model: Callable[..., Any],
    x: Tensor,
    t: float,
    y: Tensor,
    dtype: torch.dtype,
    scale: float,
    null_label: int | None,
    guided_channels: int | None,
) -> Tensor:
    """Guided float64 velocity at the float64 state ``x`` and grid time ``t``."""
    t_in = torch.full((x.shape[0],), t, dtype=torch.float64, device=x.device).to(dtype)
    return guided_velocity(
        model,
        x.to(dtype),
        t_in,
        y,
        cfg_scale=scale,
        null_label=null_label,
        guided_channels=guided_channels,
        out_dtype=torch.float64,
    )


@torch.no_grad()
def euler_sampler(
    model: Callable[..., Any],
    latents: Tensor,
    y: Tensor,
    *,
    num_steps: int = 50,
    cfg_scale: float = 1.0,
    guidance_low: float = 0.0,
    guidance_high: float = 1.0,
    heun: bool = False,
    null_label: int | None = None,
    guided_channels: int | None = None,
) -> Tensor:
    """Probability-flow ODE from t = 1 to 0 on linspace(1, 0, num_steps + 1); returns float64.

    Euler, or Heun (second evaluation at (x_Euler, t_next), skipped on the last step; its guidance
    decision uses t_cur, as in REPA).
    """
    if num_steps < 1:
        raise ValueError("num_steps must be >= 1")
    _check_cfg(cfg_scale, null_label)
    dtype = latents.dtype
    grid = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64).tolist()
    x = latents.to(torch.float64)
    for i in range(num_steps):
        t_cur, t_next = grid[i], grid[i + 1]
        dt = t_next - t_cur
        scale = _interval_scale(cfg_scale, guidance_low, guidance_high, t_cur)
        d_cur = _velocity(model, x, t_cur, y, dtype, scale, null_label, guided_channels)
        x_next = x + dt * d_cur
        if heun and i < num_steps - 1:
            d_prime = _velocity(model, x_next, t_next, y, dtype, scale, null_label, guided_channels)
            x_next = x + dt * (0.5 * d_cur + 0.5 * d_prime)
        x = x_next
    return x


@torch.no_grad()
def euler_maruyama_sampler(
    model: Callable[..., Any],
    latents: Tensor,
    y: Tensor,
    *,
    num_steps: int = 250,
    cfg_scale: float = 1.0,
    guidance_low: float = 0.0,
    guidance_high: float = 1.0,
    path: str = "linear",
    null_label: int | None = None,
    guided_channels: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Reverse SDE (REPA): grid linspace(1, 0.04, num_steps) then 0; returns float64.

    The first num_steps − 1 intervals are Euler–Maruyama steps
    x ← x + d·Δt + √(2t)·√|Δt|·ξ; the last (0.04 → 0) is the deterministic mean step x + d·Δt.
    NFE = num_steps (doubled inside the guidance interval). Noise ξ comes from ``generator``
    (global RNG if None) and is drawn before each model call.
    """
    if num_steps < 1:
        raise ValueError("num_steps must be >= 1")
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; expected one of {PATHS}")
    _check_cfg(cfg_scale, null_label)
    dtype = latents.dtype
    grid = [*torch.linspace(1.0, 0.04, num_steps, dtype=torch.float64).tolist(), 0.0]
    x = latents.to(torch.float64)

    def drift(x: Tensor, t: float) -> Tensor:
        scale = _interval_scale(cfg_scale, guidance_low, guidance_high, t)
        v = _velocity(model, x, t, y, dtype, scale, null_label, guided_channels)
        return sde_drift(v, x, t, path)

    for i in range(num_steps - 1):
        t_cur, t_next = grid[i], grid[i + 1]
        dt = t_next - t_cur
        xi = torch.randn(x.shape, generator=generator, dtype=torch.float64, device=x.device)
        d_cur = drift(x, t_cur)
        x = x + d_cur * dt + math.sqrt(2 * t_cur) * (xi * math.sqrt(abs(dt)))
    t_cur, t_next = grid[-2], grid[-1]
    return x + (t_next - t_cur) * drift(x, t_cur)


@torch.no_grad()
def meanflow_sampler(
    model: Callable[..., Any],
    latents: Tensor,
    y: Tensor,
    *,
    num_steps: int = 1,
    cfg_scale: float = 1.0,
) -> Tensor:
    """MeanFlow sampling on linspace(1, 0, num_steps + 1): z_r = z_t − (t − r)·u(z_t, r, t).

    One step gives z₀ = ε − u(ε, r=0, t=1); two steps use the schedule [1, 0.5, 0]. Guidance is
    baked in at training time, so ``cfg_scale`` must be 1. Returns float64.
    """
    if num_steps < 1:
        raise ValueError("num_steps must be >= 1")
    if cfg_scale != 1.0:
        raise ValueError("MeanFlow sampling uses cfg_scale = 1 (guidance is baked in)")
    dtype = latents.dtype
    grid = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64).tolist()
    z = latents.to(torch.float64)
    n = z.shape[0]
    for t_cur, t_next in pairwise(grid):
        t_in = torch.full((n,), t_cur, dtype=torch.float64, device=z.device).to(dtype)
        r_in = torch.full((n,), t_next, dtype=torch.float64, device=z.device).to(dtype)
        u = _first(model(z.to(dtype), t_in, y, r=r_in)).to(torch.float64)
        z = z - (t_cur - t_next) * u
    return z


@torch.no_grad()
def sample(
    model: Callable[..., Any],
    num: int,
    *,
    latent_shape: tuple[int, int, int],
    num_classes: int,
    seed: int,
    sampler: str = "sde",
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    labels: Tensor | None = None,
    **sampler_kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """Seeded sampling: returns (float32 samples (num, *latent_shape), long labels (num,)).

    One ``torch.Generator`` seeded with ``seed`` draws, in order, the initial noise (N(0, I), cast
    to ``dtype``, the dtype the model runs in), the labels (uniform in [0, num_classes) unless
    ``labels`` is given) and, for ``"sde"``, the per-step noise. ``sampler`` is one of "ode",
    "ode_heun", "sde", "meanflow"; ``null_label`` defaults to ``num_classes`` for the guided ones.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    device = torch.device("cpu") if device is None else torch.device(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    noise_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    z = torch.randn((num, *latent_shape), generator=gen, dtype=noise_dtype, device=device)
    z = z.to(dtype)
    if labels is None:
        y = torch.randint(0, num_classes, (num,), generator=gen, device=device)
    else:
        if labels.shape != (num,):
            raise ValueError(f"labels must have shape ({num},), got {tuple(labels.shape)}")
        y = labels.to(device=device, dtype=torch.long)
    if sampler == "meanflow":
        out = meanflow_sampler(model, z, y, **sampler_kwargs)
    else:
        sampler_kwargs.setdefault("null_label", num_classes)
        if sampler == "sde":
            sampler_kwargs.setdefault("generator", gen)
            out = euler_maruyama_sampler(model, z, y, **sampler_kwargs)
        else:
            out = euler_sampler(model, z, y, heun=sampler == "ode_heun", **sampler_kwargs)
    return out.to(torch.float32), y

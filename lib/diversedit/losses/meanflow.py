"""MeanFlow (Geng et al., 2025): learn the average velocity u(z_t, r, t) with the JVP identity
u = v − (t − r)·du/dt, training-time guidance and adaptive loss weighting.

REPA's convention: z_t = (1 − t)·x0 + t·ε, v = ε − x0, t = 1 is noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .flow import expand_like, noisy_input


@dataclass(frozen=True)
class MeanFlowConfig:
    """MeanFlow objective (defaults: the B/2 setting of the paper)."""

    time_mu: float = -0.4  # logit-normal location of both time draws
    time_sigma: float = 1.0
    r_equals_t_fraction: float = 0.75  # official data_proportion: share of samples with r = t
    omega: float = 1.0  # training-time guidance weight of the true velocity
    kappa: float = 0.5  # weight of the conditional average velocity at r = t
    guidance_t_start: float = 0.0  # guidance applies for t in [start, end] (both inclusive)
    guidance_t_end: float = 1.0
    norm_p: float = 1.0  # adaptive weighting: loss = err / stopgrad((err + c)^p)
    norm_eps: float = 1e-3  # c (paper text; the JAX code reportedly uses 0.01)
    class_dropout_prob: float = 0.1

    def __post_init__(self) -> None:
        checks = {
            "time_sigma": self.time_sigma > 0,
            "r_equals_t_fraction": 0 <= self.r_equals_t_fraction <= 1,
            "guidance_t_start": 0 <= self.guidance_t_start <= self.guidance_t_end,
            "guidance_t_end": self.guidance_t_end <= 1,
            "norm_p": self.norm_p >= 0,
            "norm_eps": self.norm_eps > 0,
            "class_dropout_prob": 0 <= self.class_dropout_prob < 1,
        }
        bad = [key for key, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid meanflow field(s) {bad}: {self}")

    @property
    def uncond_weight(self) -> float:
        """Weight 1 − ω − κ of the unconditional average velocity in the guided target."""
        return 1.0 - self.omega - self.kappa

    @property
    def guided(self) -> bool:
        """False when ω = 1 and κ = 0: the target is the plain velocity, no extra forward."""
        return not (self.omega == 1.0 and self.kappa == 0.0)


def sample_t_r(
    n: int,
    cfg: MeanFlowConfig,
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """(t, r), each (n,) float32 with t ≥ r: the max and min of two logit-normal draws; then
    exactly floor(fraction·n + ½) randomly chosen samples get r = t."""
    draws = torch.randn(2, n, device=device, generator=generator)
    draws = torch.sigmoid(cfg.time_mu + cfg.time_sigma * draws)
    t, r = draws.max(dim=0).values, draws.min(dim=0).values
    k = math.floor(cfg.r_equals_t_fraction * n + 0.5)
    same = torch.randperm(n, device=device, generator=generator)[:k]
    r = r.index_copy(0, same, t[same])
    return t, r


@torch.no_grad()
def guided_velocity_target(
    model: nn.Module,
    z_t: Tensor,
    t: Tensor,
    y: Tensor,
    v: Tensor,
    drop_ids: Tensor,
    cfg: MeanFlowConfig,
) -> Tensor:
    """v_g = ω·v + κ·u(z_t, t, t | y) + (1 − ω − κ)·u(z_t, t, t | ∅) for kept samples with t in
    [t_start, t_end]; v elsewhere. Forwards whose weight is zero in ``cfg`` are skipped."""
    if not cfg.guided:
        return v
    n = z_t.shape[0]
    keep_label, null_label = torch.zeros_like(drop_ids), torch.ones_like(drop_ids)
    halves = []  # (weight, label-drop ids) of the forwards that are needed
    if cfg.kappa != 0:
        halves.append((cfg.kappa, keep_label))
    if abs(cfg.uncond_weight) > 1e-12:
        halves.append((cfg.uncond_weight, null_label))
    v_g = cfg.omega * v
    if halves:
        k = len(halves)
        tt = t.repeat(k)
        u = model(
            z_t.repeat(k, *([1] * (z_t.dim() - 1))),
            tt,
            y.repeat(k),
            r=tt,
            force_drop_ids=torch.cat([ids for _, ids in halves]),
        )
        for (weight, _), u_part in zip(halves, u.to(v.dtype).split(n), strict=True):
            v_g = v_g + weight * u_part
    apply = (t >= cfg.guidance_t_start) & (t <= cfg.guidance_t_end) & (drop_ids != 1)
    return torch.where(expand_like(apply, v), v_g, v)


def average_velocity_jvp(
    model: nn.Module,
    z_t: Tensor,
    r: Tensor,
    t: Tensor,
    y: Tensor,
    v_g: Tensor,
    drop_ids: Tensor,
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """(u, du/dt, block features) of u(z_t, r, t) with tangents (v_g, 0, 1).

    ``torch.func.jvp`` keeps the ordinary autograd graph of the primal outputs, so ``u`` and the
    features (returned as auxiliary outputs of the primal pass) backpropagate into the model.
    Scaled-dot-product attention is pinned to the math kernel: the fused CPU/flash kernels have
    no forward-mode derivative.
    """

    def fn(z: Tensor, r_: Tensor, t_: Tensor) -> tuple[Tensor, list[Tensor]]:
        out = model(z, t_, y, r=r_, force_drop_ids=drop_ids, return_aux=True)
        return out.output, out.features

    tangents = (v_g.to(z_t.dtype), torch.zeros_like(r), torch.ones_like(t))
    with sdpa_kernel([SDPBackend.MATH]):
        u, du_dt, features = torch.func.jvp(fn, (z_t, r, t), tangents, has_aux=True)
    return u, du_dt, features


def meanflow_target(v_g: Tensor, du_dt: Tensor, t: Tensor, r: Tensor) -> Tensor:
    """Stop-gradient target u_tgt = v_g − clip(t − r, 0, 1)·du/dt."""
    h = expand_like((t - r).clamp(0, 1), du_dt)
    return (v_g - h * du_dt).detach()


def adaptive_weighted(err: Tensor, cfg: MeanFlowConfig) -> Tensor:
    """err / stopgrad((err + c)^p), per sample."""
    return err / (err.detach() + cfg.norm_eps).pow(cfg.norm_p)


def meanflow_loss(
    model: nn.Module,
    x0: Tensor,
    y: Tensor,
    cfg: MeanFlowConfig,
    *,
    noise: Tensor | None = None,
    t: Tensor | None = None,
    r: Tensor | None = None,
    drop_ids: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """Per-sample adaptively weighted MeanFlow loss (N,) and the primal pass's block features.

    Missing ``noise``, (``t``, ``r``) and ``drop_ids`` (1 = null label, Bernoulli with
    ``cfg.class_dropout_prob``) are drawn from ``generator``.
    """
    if (t is None) != (r is None):
        raise ValueError("pass both t and r or neither")
    n, device = x0.shape[0], x0.device
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
    if t is None or r is None:
        t, r = sample_t_r(n, cfg, device=device, generator=generator)
    if drop_ids is None:
        drop_ids = torch.rand(n, generator=generator, device=device) < cfg.class_dropout_prob
    z_t, v = noisy_input(x0, noise, t, "linear")
    v_g = guided_velocity_target(model, z_t, t, y, v, drop_ids, cfg)
    u, du_dt, features = average_velocity_jvp(model, z_t, r, t, y, v_g, drop_ids)
    target = meanflow_target(v_g, du_dt, t, r)
    with torch.autocast(device_type=device.type, enabled=False):
        err = (u.float() - target.float()).square().reshape(n, -1).sum(dim=1)
        return adaptive_weighted(err, cfg), features

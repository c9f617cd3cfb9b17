"""Flow matching in REPA's convention: t = 0 is data, t = 1 is noise, velocity target."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

PATHS = ("linear", "cosine")
WEIGHTINGS = ("uniform", "lognormal")


@dataclass(frozen=True)
class FlowConfig:
    """Interpolant and time sampling of the denoising objective."""

    path: str = "linear"  # linear: x_t = (1-t)x0 + t·eps; cosine: cos(πt/2)x0 + sin(πt/2)eps
    weighting: str = "uniform"  # t ~ U(0, 1) | lognormal: sigma = exp(n), n ~ N(0, 1)

    def __post_init__(self) -> None:
        if self.path not in PATHS:
            raise ValueError(f"flow.path must be one of {PATHS}, got {self.path!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"flow.weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")


def interpolant(t: Tensor, path: str = "linear") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(alpha_t, sigma_t, d alpha/dt, d sigma/dt) of the path, broadcastable like ``t``."""
    if path == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    if path == "cosine":
        a = t * (math.pi / 2)
        return (
            torch.cos(a),
            torch.sin(a),
            -(math.pi / 2) * torch.sin(a),
            (math.pi / 2) * torch.cos(a),
        )
    raise ValueError(f"unknown path {path!r}; choose one of {PATHS}")


def sample_time(
    n: int,
    cfg: FlowConfig,
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per-sample training times in [0, 1], shape (n,), float32."""
    if cfg.weighting == "uniform":
        return torch.rand(n, device=device, generator=generator)
    sigma = torch.randn(n, device=device, generator=generator).exp()
    return sigma / (1 + sigma) if cfg.path == "linear" else (2 / math.pi) * torch.atan(sigma)


def expand_like(t: Tensor, x: Tensor) -> Tensor:
    """(N,) → (N, 1, 1, …) matching ``x``'s rank."""
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def noisy_input(
    x0: Tensor, noise: Tensor, t: Tensor, path: str = "linear"
) -> tuple[Tensor, Tensor]:
    """The interpolant x_t and the velocity target d alpha·x0 + d sigma·noise."""
    alpha, sigma, d_alpha, d_sigma = interpolant(expand_like(t, x0), path)
    return alpha * x0 + sigma * noise, d_alpha * x0 + d_sigma * noise


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every axis but the first."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def flow_matching_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Per-sample mean squared velocity error (REPA's ``mean_flat``), shape (N,)."""
    return mean_flat((pred.float() - target.float()) ** 2)

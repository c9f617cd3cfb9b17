"""Dispersive loss (DispLoss, InfoNCE-L2 variant): spread one block's features over the batch."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class DispersiveConfig:
    """DispLoss term ``coeff × L_disp`` (defaults: PyTorch release; paper/JAX: 0.5, τ 0.5)."""

    coeff: float = 0.25
    tau: float = 1.0
    block: int = -1  # 0-based block whose output is used; negative counts from the end

    def __post_init__(self) -> None:
        if self.coeff < 0:
            raise ValueError(f"dispersive.coeff must be >= 0, got {self.coeff}")
        if self.tau <= 0:
            raise ValueError(f"dispersive.tau must be > 0, got {self.tau}")


def dispersive_loss(feature: Tensor, tau: float) -> Tensor:
    """log(mean_{i,j} exp(−‖z_i − z_j‖² / (T·D·τ))) over the local batch, i = j included.

    ``feature`` is (B, …); each sample is flattened to z_i. Computed in float32 with autocast
    off; returns a 0-dim tensor in [log(1/B), 0].
    """
    b = feature.shape[0]
    with torch.autocast(device_type=feature.device.type, enabled=False):
        z = feature.float().reshape(b, -1)
        z = z - z.mean(dim=0, keepdim=True)  # distances are shift invariant: less cancellation
        gram = z @ z.T
        sq_norm = gram.diagonal()
        dist = (sq_norm[:, None] + sq_norm[None, :] - 2 * gram).clamp_min(0) / z.shape[1]
        return torch.logsumexp(-dist.reshape(-1) / tau, dim=0) - 2 * math.log(b)

"""REPA alignment: negative cosine between projected block tokens and encoder patch tokens."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class RepaConfig:
    """REPA term: ``coeff`` × mean over encoders and samples of the token-mean −cos."""

    coeff: float = 0.5
    encoder_depth: int = 8  # 1-based block whose output feeds the projector

    def __post_init__(self) -> None:
        if self.coeff < 0:
            raise ValueError(f"repa.coeff must be >= 0, got {self.coeff}")
        if self.encoder_depth < 1:
            raise ValueError(f"repa.encoder_depth must be >= 1, got {self.encoder_depth}")


def repa_loss(zs: Sequence[Tensor], targets: Sequence[Tensor], eps: float = 1e-12) -> Tensor:
    """Per-sample alignment loss, shape (N,): −cos(target token, projected token), averaged over
    tokens and encoders. Both sides are normalised in float32 (REPA issue #46: fp16 NaNs)."""
    if len(zs) != len(targets) or not zs:
        raise ValueError(f"need one target per projector, got {len(targets)} for {len(zs)}")
    with torch.autocast(device_type=zs[0].device.type, enabled=False):
        per_encoder = [
            -(F.normalize(z.float(), dim=-1, eps=eps) * F.normalize(y.float(), dim=-1, eps=eps))
            .sum(dim=-1)
            .mean(dim=-1)
            for z, y in zip(zs, targets, strict=True)
        ]
    return torch.stack(per_encoder).mean(dim=0)

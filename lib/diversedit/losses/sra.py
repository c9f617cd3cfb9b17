"""SRA (self-representation alignment): a student head at time t matches an EMA teacher's
deeper block at a slightly less noisy time t' = clamp(t − U(0, t_max), 0, 1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .flow import noisy_input

SRA_LOSSES = ("cosine", "smooth_l1")


@dataclass(frozen=True)
class SRAConfig:
    """SRA term (defaults: current ``vvvvvjdy/SRA`` code; paper: coeff 0.2 with smooth-L1)."""

    coeff: float = 0.5
    student_depth: int = 4  # 1-based block feeding the student head (XL README: 8)
    teacher_depth: int = 8  # 1-based teacher block (XL README: 20)
    t_max: float = 0.2
    loss: str = "cosine"  # cosine | smooth_l1
    smooth_l1_beta: float = 0.05

    def __post_init__(self) -> None:
        checks = {
            "coeff": self.coeff >= 0,
            "student_depth": self.student_depth >= 1,
            "teacher_depth": self.teacher_depth >= 1,
            "t_max": 0 <= self.t_max <= 1,
            "loss": self.loss in SRA_LOSSES,
            "smooth_l1_beta": self.smooth_l1_beta > 0,
        }
        bad = [key for key, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid sra field(s) {bad}: {self}")


def teacher_time(t: Tensor, t_max: float, generator: torch.Generator | None = None) -> Tensor:
    """The teacher's less noisy time clamp(t − U(0, t_max), 0, 1), same shape and dtype as ``t``."""
    gap = torch.rand(t.shape, generator=generator, device=t.device, dtype=t.dtype) * t_max
    return (t - gap).clamp(0, 1)


def sra_loss(student: Tensor, teacher: Tensor, cfg: SRAConfig, eps: float = 1e-12) -> Tensor:
    """Per-sample alignment loss (N,) between (N, T, D) token features, in float32.

    cosine: token mean of 1 − cos; smooth_l1: mean over tokens and channels (β from ``cfg``).
    The teacher is detached.
    """
    teacher = teacher.detach()
    with torch.autocast(device_type=student.device.type, enabled=False):
        s, t = student.float(), teacher.float()
        if cfg.loss == "cosine":
            cos = (F.normalize(s, dim=-1, eps=eps) * F.normalize(t, dim=-1, eps=eps)).sum(dim=-1)
            return (1 - cos).reshape(s.shape[0], -1).mean(dim=1)
        err = F.smooth_l1_loss(s, t, reduction="none", beta=cfg.smooth_l1_beta)
        return err.reshape(s.shape[0], -1).mean(dim=1)


@torch.no_grad()
def teacher_features(
    teacher: nn.Module,
    x0: Tensor,
    noise: Tensor,
    t_teacher: Tensor,
    y: Tensor,
    drop_ids: Tensor,
    cfg: SRAConfig,
    path: str = "linear",
) -> Tensor:
    """Raw output (N, T, D) of the teacher's block ``cfg.teacher_depth`` on the same image, noise
    and dropped labels at ``t_teacher``. The teacher's train/eval mode is left as it is."""
    x_t, _ = noisy_input(x0, noise, t_teacher, path)
    out = teacher(x_t, t_teacher, y, force_drop_ids=drop_ids, return_aux=True)
    if not 1 <= cfg.teacher_depth <= len(out.features):
        raise ValueError(f"sra.teacher_depth {cfg.teacher_depth} outside 1..{len(out.features)}")
    return out.features[cfg.teacher_depth - 1]

"""The total training objective: denoising (or MeanFlow) plus any stack of add-on terms.

``loss = mean L_FM + λ_REPA·L_REPA + w(L_div)·L_div + λ_disp·L_disp + λ_SRA·L_SRA``, each term
optional, the way the paper stacks DiverseDiT on SiT, REPA, MeanFlow, DispLoss and SRA.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .dispersive import DispersiveConfig, dispersive_loss
from .diversity import DiversityConfig, diversity_loss
from .flow import FlowConfig, flow_matching_loss, noisy_input, sample_time
from .meanflow import MeanFlowConfig, meanflow_loss
from .repa import RepaConfig, repa_loss
from .sra import SRAConfig, sra_loss, teacher_features, teacher_time

DIVERSITY_TAPS = ("post_fusion", "pre_fusion")


@dataclass(frozen=True)
class ObjectiveConfig:
    """Which terms make up the loss; ``None`` switches a term off."""

    flow: FlowConfig = field(default_factory=FlowConfig)
    repa: RepaConfig | None = None
    diversity: DiversityConfig | None = None
    diversity_tap: str = "post_fusion"  # block features before or after the long-skip fusion
    dispersive: DispersiveConfig | None = None
    sra: SRAConfig | None = None
    meanflow: MeanFlowConfig | None = None

    def __post_init__(self) -> None:
        if self.diversity_tap not in DIVERSITY_TAPS:
            raise ValueError(f"diversity_tap must be one of {DIVERSITY_TAPS}")
        if self.meanflow is not None and (self.repa is not None or self.sra is not None):
            raise ValueError("MeanFlow composes with diversity and dispersive terms only")


def _drop_ids(
    model: nn.Module, n: int, device: torch.device, gen: torch.Generator | None
) -> Tensor | None:
    """Label-dropout mask drawn once per step so every forward of the step shares it."""
    p = model.config.class_dropout_prob
    if not model.training or p <= 0:
        return None
    return (torch.rand(n, device=device, generator=gen) < p).long()


def compute_loss(
    model: nn.Module,
    x0: Tensor,
    y: Tensor,
    cfg: ObjectiveConfig,
    *,
    encoder_targets: Sequence[Tensor] | None = None,
    teacher: nn.Module | None = None,
    generator: torch.Generator | None = None,
    compiled: bool = False,
    triton: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One step's total loss and its detached terms (for logging; no host synchronisation).

    ``model`` is a :class:`~diversedit.models.SiT` (possibly wrapped, but exposing ``config``);
    ``encoder_targets`` are the REPA encoder's patch tokens, one (N, T, z_dim) tensor per
    projector; ``teacher`` is the EMA model for SRA. The random draws follow REPA's order
    (t, noise, label dropout), so a seeded step matches REPA's training loss. ``compiled`` runs
    the diversity loss through ``torch.compile`` (compile the model yourself); ``triton`` computes
    its statistics with the Triton kernels.
    """
    base = getattr(model, "module", model)
    terms: dict[str, Tensor] = {}
    if cfg.meanflow is not None:
        per_sample, features = meanflow_loss(model, x0, y, cfg.meanflow, generator=generator)
        total = per_sample.mean()
        terms["meanflow"] = total
        out = None
    else:
        t = sample_time(x0.shape[0], cfg.flow, device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        x_t, target = noisy_input(x0, noise, t, cfg.flow.path)
        drop = _drop_ids(base, x0.shape[0], x0.device, generator)
        out = model(
            x_t, t.to(x0.dtype), y, force_drop_ids=drop, return_aux=True, tap=cfg.diversity_tap
        )
        features = out.features
        total = flow_matching_loss(out.output, target).mean()
        terms["denoise"] = total
    if cfg.repa is not None and cfg.repa.coeff > 0:
        if encoder_targets is None:
            raise ValueError("REPA is on but no encoder_targets were given")
        terms["repa"] = repa_loss(out.zs, encoder_targets).mean()
        total = total + cfg.repa.coeff * terms["repa"]
    if cfg.diversity is not None:
        div = diversity_loss(features, cfg.diversity, compiled=compiled, triton=triton)
        total = total + div["loss"]
        terms |= {k if k.startswith("div") else f"div_{k}": v for k, v in div.items()}
    if cfg.dispersive is not None and cfg.dispersive.coeff > 0:
        terms["dispersive"] = dispersive_loss(features[cfg.dispersive.block], cfg.dispersive.tau)
        total = total + cfg.dispersive.coeff * terms["dispersive"]
    if cfg.sra is not None and cfg.sra.coeff > 0:
        if teacher is None:
            raise ValueError("SRA is on but no teacher (EMA model) was given")
        t_teacher = teacher_time(t, cfg.sra.t_max, generator=generator)
        target_feats = teacher_features(
            teacher, x0, noise, t_teacher, y, drop, cfg.sra, cfg.flow.path
        )
        terms["sra"] = sra_loss(out.sra, target_feats, cfg.sra).mean()
        total = total + cfg.sra.coeff * terms["sra"]
    terms = {k: v.detach() for k, v in terms.items()}
    terms["loss"] = total.detach()
    return total, terms

"""DiverseDiT representation-diversity loss (method-spec §3–§6, §10–§12), release semantics.

L_div = w_orth·L_orth + w_mi·L_MI + w_disp·L_disp over the block features h_0 … h_{L−1}; the
objective adds w(L_div)·L_div with the adaptive weight of §6.

The release skips non-finite blocks and pairs with Python branches (one host sync per check).
Here the same result is computed with masks: invalid blocks are zeroed before any reduction, the
pair set is the first ``max_pairs`` valid candidates (cumsum over a validity mask of the candidate
list) and a non-finite L_div becomes 0 through ``torch.where``. No ``.item()`` or branching on
tensor values happens for the ``skip`` and ``zero_loss`` policies; index tensors are cached per
(L, config, device), so only the first call on a device copies host data to it.

The blocks are stacked once in their own dtype; one autograd Function reduces the stack to small
per-block statistics in float32 (token means, the Gram matrix of row-normalised blocks, which
gives L_MI of every pair in one matmul, and column norms) and builds the input gradient in one
float32 buffer, so no float32 copy of the features is kept alive.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

TERMS = ("orth", "mi", "disp")
ORTH_FORMS = ("signed", "abs", "squared")
MI_FORMS = ("abs_of_mean", "mean_of_abs")
DISP_FORMS = ("release_l1l2_usage", "mean_activation_variance")
STATS_DTYPES = ("fp32", "autocast")
PAIR_MODES = ("release_formula", "star", "explicit", "all")
NONFINITE_POLICIES = ("skip", "raise", "zero_loss")
WEIGHT_GRADS = ("live", "detached")
MAX_LOSS = 5.0  # release clamp; unreachable for the default weights (|L_div| <= 2/3)


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"DiversityConfig.{name} must be one of {allowed}, got {value!r}")


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"DiversityConfig.{name} must be a finite number, got {value!r}")
    return float(value)


def _int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"DiversityConfig.{name} must be an int >= {low}, got {value!r}")


@dataclass(frozen=True)
class DiversityConfig:
    """Options of method-spec §11 (defaults = release). Sequences are stored as tuples."""

    terms: tuple[str, ...] = ("orth", "mi", "disp")
    weights: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)  # orth, mi, disp
    orth_form: str = "signed"
    mi_form: str = "abs_of_mean"
    disp_form: str = "release_l1l2_usage"
    eps: float = 1e-8
    stats_dtype: str = "fp32"
    pairs: str = "release_formula"
    pair_encoder_depth: int = 8  # e of the release formula (1-based REPA encoder depth)
    explicit_pairs: tuple[tuple[int, int], ...] = ()
    max_pairs: int = 10  # cap on |P| (0 = no cap)
    nonfinite_policy: str = "skip"
    adaptive: bool = True
    adaptive_low: float = 0.1
    adaptive_high: float = 0.5
    adaptive_denominator: float = 0.5
    adaptive_weight_grad: str = "live"
    lambda_div: float = 1.0  # constant weight when ``adaptive`` is False

    def __post_init__(self) -> None:
        terms = tuple(self.terms) if not isinstance(self.terms, str) else (self.terms,)
        if not terms or len(set(terms)) != len(terms) or any(t not in TERMS for t in terms):
            raise ValueError(
                f"DiversityConfig.terms must be a non-empty subset of {TERMS} without repeats, "
                f"got {self.terms!r}"
            )
        object.__setattr__(self, "terms", terms)
        try:
            weights = tuple(self.weights)
        except TypeError:
            weights = ()
        if len(weights) != 3:
            raise ValueError(f"DiversityConfig.weights must hold 3 numbers, got {self.weights!r}")
        object.__setattr__(self, "weights", tuple(_real("weights", w) for w in weights))
        _choice("orth_form", self.orth_form, ORTH_FORMS)
        _choice("mi_form", self.mi_form, MI_FORMS)
        _choice("disp_form", self.disp_form, DISP_FORMS)
        _choice("stats_dtype", self.stats_dtype, STATS_DTYPES)
        _choice("pairs", self.pairs, PAIR_MODES)
        _choice("nonfinite_policy", self.nonfinite_policy, NONFINITE_POLICIES)
        _choice("adaptive_weight_grad", self.adaptive_weight_grad, WEIGHT_GRADS)
        if _real("eps", self.eps) <= 0:
            raise ValueError(f"DiversityConfig.eps must be > 0, got {self.eps!r}")
        _int("pair_encoder_depth", self.pair_encoder_depth, 1)
        _int("max_pairs", self.max_pairs, 0)
        pairs = []
        for p in self.explicit_pairs:
            p = tuple(p)
            ok = len(p) == 2 and all(isinstance(i, int) and not isinstance(i, bool) for i in p)
            if not ok or min(p) < 0 or p[0] == p[1]:
                raise ValueError(
                    "DiversityConfig.explicit_pairs must hold (a, b) pairs of distinct "
                    f"non-negative block ids, got {p!r}"
                )
            pairs.append(p)
        object.__setattr__(self, "explicit_pairs", tuple(pairs))
        if self.pairs == "explicit" and not pairs:
            raise ValueError(
                "DiversityConfig.explicit_pairs must be non-empty when pairs='explicit'"
            )
        if not isinstance(self.adaptive, bool):
            raise ValueError(
                f"DiversityConfig.adaptive must be True or False, got {self.adaptive!r}"
            )
        low = _real("adaptive_low", self.adaptive_low)
        if _real("adaptive_high", self.adaptive_high) <= low:
            raise ValueError(
                f"DiversityConfig.adaptive_high must exceed adaptive_low ({low}), "
                f"got {self.adaptive_high!r}"
            )
        if _real("adaptive_denominator", self.adaptive_denominator) <= 0:
            raise ValueError(
                "DiversityConfig.adaptive_denominator must be > 0, "
                f"got {self.adaptive_denominator!r}"
            )
        _real("lambda_div", self.lambda_div)


def _cap(num_blocks: int, cfg: DiversityConfig) -> int:
    """|P| when every block is finite: min(max_pairs, n(n−1)/2) (release), or no cap when 0."""
    if cfg.pairs == "explicit":
        return len(cfg.explicit_pairs) if cfg.max_pairs == 0 else cfg.max_pairs
    total = num_blocks * (num_blocks - 1) // 2
    return total if cfg.max_pairs == 0 else min(cfg.max_pairs, total)


def candidate_pairs(num_blocks: int, cfg: DiversityConfig) -> list[tuple[int, int]]:
    """Ordered candidates the release loop walks (0-based block ids), before the ``max_pairs`` cut.

    ``release_formula``: rows i = m−e−1 … m+e−1 (m = the cap), columns j = i+1 … n−1, with Python
    negative indexing into the block list (§5.1); a start below −n raises, as the release would
    (IndexError there). ``star``/``all``: rows from 0. ``explicit``: the configured list.
    """
    if num_blocks < 2:  # the release returns 0 before walking any pair
        return []
    n = num_blocks
    if cfg.pairs == "explicit":
        bad = [p for p in cfg.explicit_pairs if max(p) >= n]
        if bad:
            raise ValueError(f"explicit_pairs {bad} reference blocks outside 0..{n - 1}")
        return list(cfg.explicit_pairs)
    if cfg.pairs in ("star", "all"):
        return [(i, j) for i in range(n) for j in range(i + 1, n)]
    m, e = _cap(n, cfg), cfg.pair_encoder_depth
    start = m - e - 1
    if start < -n:
        raise ValueError(
            f"pairs='release_formula' with pair_encoder_depth={e} and {n} blocks starts at row "
            f"{start} < -{n} (the release raises IndexError); use a smaller pair_encoder_depth "
            "or pairs='star'"
        )
    return [(i % n, j % n) for i in range(start, m + e) for j in range(i + 1, n)]


def select_pairs(num_blocks: int, cfg: DiversityConfig) -> list[tuple[int, int]]:
    """Pair set P when every block is finite: the first ``max_pairs`` candidates."""
    return candidate_pairs(num_blocks, cfg)[: _cap(num_blocks, cfg)]


class _Plan(NamedTuple):
    blocks: tuple[int, ...]  # block ids stacked for the loss, ascending
    cand_a: Tensor  # candidate pairs as positions in that stack
    cand_b: Tensor
    cap: int


@lru_cache(maxsize=64)
def _plan(num_blocks: int, cfg: DiversityConfig, device: torch.device) -> _Plan:
    cands: list[tuple[int, int]] = []
    if "orth" in cfg.terms or "mi" in cfg.terms:
        # raise / zero_loss never skip, so only the first ``cap`` candidates can matter
        cands = candidate_pairs(num_blocks, cfg)
        if cfg.nonfinite_policy != "skip":
            cands = cands[: _cap(num_blocks, cfg)]
    pair_blocks = sorted({k for p in cands for k in p})
    blocks = tuple(range(num_blocks)) if "disp" in cfg.terms else tuple(pair_blocks)
    pos = {k: i for i, k in enumerate(blocks)}
    return _Plan(
        blocks=blocks,
        cand_a=torch.tensor([pos[a] for a, _ in cands], dtype=torch.long, device=device),
        cand_b=torch.tensor([pos[b] for _, b in cands], dtype=torch.long, device=device),
        cap=_cap(num_blocks, cfg),
    )


def adaptive_weight(l_div: Tensor, cfg: DiversityConfig) -> Tensor:
    """w(L_div) of §6: 1 above ``high``, (L−low)/denominator in (low, high], 0 at or below ``low``.

    ``live`` keeps the gradient through w (release), ``detached`` treats w as a constant; with
    ``adaptive=False`` w is the constant ``lambda_div``. Branch-free (``torch.where``).
    """
    if not cfg.adaptive:
        return torch.full_like(l_div, cfg.lambda_div)
    x = l_div if cfg.adaptive_weight_grad == "live" else l_div.detach()
    ramp = (x - cfg.adaptive_low) / cfg.adaptive_denominator
    return torch.where(x > cfg.adaptive_high, 1.0, torch.where(x > cfg.adaptive_low, ramp, 0.0))


class _BlockStats(torch.autograd.Function):
    """Per-block reductions of a (B, M, D) stack, accumulated in ``dtype``.

    Returns μ (B, D) token means, G (B, B) = F̂F̂ᵀ over flattened row-normalised blocks
    (F̂ = row / max(‖row‖, eps)), the row means of F̂ (B, D) and the column L1 and L2 norms
    (B, D); ``need`` switches each off. Values and gradients equal the ``mean`` / ``F.normalize``
    / matmul / ``vector_norm`` chain, but no ``dtype`` copy of the stack is kept: F̂ is recomputed
    in the backward, which builds the input gradient in one ``dtype`` buffer and rounds it once.
    """

    @staticmethod
    def forward(ctx, x: Tensor, eps: float, dtype: torch.dtype, need: tuple[bool, ...]):
        want_mu, want_gram, want_fmean, want_cols = need

        def none() -> Tensor:  # placeholder output (distinct tensors for autograd)
            return x.new_zeros(0, dtype=dtype)

        mu = x.mean(dim=1, dtype=dtype) if want_mu else none()
        gram, fmean, inv = none(), none(), none()
        if want_gram or want_fmean:
            norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=dtype)
            inv = torch.where(norm >= eps, 1.0 / norm.clamp_min(eps), -1.0 / eps)  # sign = clamped
            fh = x * inv.abs()
            if want_gram:
                flat = fh.flatten(1)
                gram = flat @ flat.T
            if want_fmean:
                fmean = fh.mean(dim=1)
            del fh
        l1, l2 = none(), none()
        if want_cols:
            l1 = torch.linalg.vector_norm(x, ord=1, dim=1, dtype=dtype)
            l2 = torch.linalg.vector_norm(x, ord=2, dim=1, dtype=dtype)
        ctx.save_for_backward(x, inv, l2)
        ctx.need, ctx.dtype = need, dtype
        return mu, gram, fmean, l1, l2

    @staticmethod
    @once_differentiable
    def backward(ctx, g_mu, g_gram, g_fmean, g_l1, g_l2):
        x, inv, l2 = ctx.saved_tensors
        want_mu, want_gram, want_fmean, want_cols = ctx.need
        rows = x.shape[1]
        if want_gram or want_fmean:
            scale = inv.abs()
            fh = x * scale
            if want_gram:
                grad = ((g_gram + g_gram.T) @ fh.flatten(1)).view_as(fh)
                if want_fmean:
                    grad.add_(g_fmean[:, None] / rows)
            else:
                grad = (g_fmean[:, None] / rows).expand_as(fh).clone()
            # d f̂/dx = (I − f̂ f̂ᵀ)/‖x‖ on unclamped rows, I/eps on clamped ones
            radial = (grad * fh).sum(dim=-1, keepdim=True) * (inv > 0)
            grad.addcmul_(fh, radial, value=-1.0).mul_(scale)
            del fh
        else:
            grad = torch.zeros(x.shape, dtype=ctx.dtype, device=x.device)
        if want_mu:
            grad.add_(g_mu[:, None] / rows)
        if want_cols:
            grad.addcmul_(x.sign(), g_l1[:, None])
            grad.addcmul_(x, torch.where(l2 > 0, g_l2 / l2, 0.0)[:, None])
        return grad.to(x.dtype), None, None, None


def _pair_terms(
    x: Tensor, stats: tuple[Tensor, ...], plan: _Plan, cfg: DiversityConfig, valid: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """L_orth, L_MI and the number of pairs used, read off block Gram matrices."""
    mu, gram = stats[0], stats[1]
    ca, cb = plan.cand_a, plan.cand_b
    pair_ok = valid[ca] & valid[cb]
    if cfg.nonfinite_policy == "skip":  # the release takes the first ``cap`` valid candidates
        chosen = pair_ok & (torch.cumsum(pair_ok, 0) <= plan.cap)
    else:  # fixed P; invalid blocks are zeroed, so their terms are finite
        chosen = torch.ones_like(pair_ok)
    weight = chosen.to(mu.dtype)  # every statistic has the statistics dtype
    used = weight.sum()
    denom = used.clamp_min(1.0)
    orth = mi = used.new_zeros(())
    if "orth" in cfg.terms:
        unit = F.normalize(mu, dim=-1, eps=cfg.eps)
        cos = (unit @ unit.T)[ca, cb]
        cos = {"signed": cos, "abs": cos.abs(), "squared": cos.square()}[cfg.orth_form]
        orth = (cos * weight).sum() / denom
    if "mi" in cfg.terms:
        rows = x.shape[1]
        if cfg.mi_form == "abs_of_mean":  # c(a,b) = <vec f̂_a, vec f̂_b> / M
            c = (gram / rows)[ca, cb].abs()
        else:  # mean over rows of |row cosine| (generic autograd path)
            fh = F.normalize(x.to(weight.dtype), dim=-1, eps=cfg.eps)
            c = torch.einsum("amd,bmd->abm", fh, fh).abs().mean(dim=-1)[ca, cb]
        mi = (c * weight).sum() / denom
    return orth, mi, used


def _disp_term(stats: tuple[Tensor, ...], cfg: DiversityConfig, valid: Tensor, rows: int) -> Tensor:
    """L_disp over all valid blocks (invalid blocks are already zero); 0 if < 2 are valid."""
    fmean, l1, l2 = stats[2], stats[3], stats[4]
    if cfg.disp_form == "release_l1l2_usage":
        # a_k[c] = mean_r |X[r,c]| / max(||X[:,c]||, eps): column-normalised mean |activation|
        count = valid.sum().to(l1.dtype)
        usage = (l1 / l2.clamp_min(cfg.eps) / rows).sum(dim=0) / (count + cfg.eps)
        usage = usage / (usage.max() + cfg.eps)
        var = (usage - usage.mean()).square().mean()
        loss = -torch.clamp(var / 0.25, 0.0, 1.0)
    else:
        # paper reading: per-block channel means of row-normalised tokens, −D·Var over channels
        count = valid.sum().to(fmean.dtype)
        var = (fmean - fmean.mean(dim=1, keepdim=True)).square().mean(dim=1)
        loss = -fmean.shape[1] * (var * valid.to(var.dtype)).sum() / count.clamp_min(1.0)
    return torch.where(count >= 2, loss, 0.0)


def diversity_loss(features: Sequence[Tensor], cfg: DiversityConfig) -> dict[str, Tensor]:
    """Diversity loss of block features ``features[k]`` (each (N, T, D) or any (..., D) shape).

    Returns 0-dim float32 tensors: ``orth``, ``mi``, ``disp``, ``div`` (weighted sum of the
    enabled terms, clamped at 5, non-finite → 0), ``weight`` (w), ``loss`` (= w·div),
    ``pairs_used``, ``blocks_skipped`` (non-finite blocks among those the loss reads) and
    ``div_nonfinite`` (1 when ``div`` was replaced by 0). ``nonfinite_policy='raise'`` synchronises
    with the device to raise ``FloatingPointError`` naming the bad blocks.
    """
    if not features:
        raise ValueError("diversity_loss needs at least one block feature")
    shape, device = features[0].shape, features[0].device
    if len(shape) < 2 or any(f.shape != shape for f in features):
        raise ValueError(f"block features must share one (..., D) shape, got {shape} and others")
    num_blocks = len(features)
    plan = _plan(num_blocks, cfg, device)
    zero = torch.zeros((), device=device)
    orth = mi = disp = zero
    used = skipped = zero
    all_ok = torch.ones((), dtype=torch.bool, device=device)
    fp32 = cfg.stats_dtype == "fp32"
    # fp32: statistics in float32 outside autocast; autocast: leave the ambient region as it is
    region = torch.autocast(device_type=device.type, enabled=False) if fp32 else nullcontext()
    with region:
        if plan.blocks:
            x = torch.stack([features[k] for k in plan.blocks]).flatten(1, -2)
            valid = torch.isfinite(x).flatten(1).all(dim=1)
            if cfg.nonfinite_policy == "raise":
                _raise_if_bad(valid, plan.blocks)  # host sync, documented
            x = x.masked_fill_(~valid[:, None, None], 0)  # no 0·NaN downstream
            skipped = (~valid).sum().float()
            all_ok = valid.all()
            pairs = len(plan.cand_a) > 0
            need = (
                pairs and "orth" in cfg.terms,
                pairs and "mi" in cfg.terms and cfg.mi_form == "abs_of_mean",
                "disp" in cfg.terms and cfg.disp_form == "mean_activation_variance",
                "disp" in cfg.terms and cfg.disp_form == "release_l1l2_usage",
            )
            dtype = torch.float32 if fp32 else x.dtype
            stats = _BlockStats.apply(x, cfg.eps, dtype, need)
            if pairs:
                orth, mi, used = _pair_terms(x, stats, plan, cfg, valid)
            if "disp" in cfg.terms:
                disp = _disp_term(stats, cfg, valid, x.shape[1])
        orth, mi, disp = orth.float(), mi.float(), disp.float()
        parts = {"orth": orth, "mi": mi, "disp": disp}
        div = sum(w * parts[t] for t, w in zip(TERMS, cfg.weights, strict=True) if t in cfg.terms)
        div = torch.clamp(div, max=MAX_LOSS)
        finite = torch.isfinite(div)
        if cfg.nonfinite_policy == "raise" and not bool(finite):
            raise FloatingPointError(f"diversity loss is non-finite ({div.item()})")
        keep = finite & all_ok if cfg.nonfinite_policy == "zero_loss" else finite
        div = torch.where(keep, div, 0.0)
        if cfg.nonfinite_policy == "zero_loss":
            used = torch.where(keep, used, 0.0)
        weight = adaptive_weight(div, cfg)
    return {
        "orth": orth,
        "mi": mi,
        "disp": disp,
        "div": div,
        "weight": weight,
        "loss": weight * div,
        "pairs_used": used.float(),
        "blocks_skipped": skipped,
        "div_nonfinite": (~keep).float(),
    }


def _raise_if_bad(valid: Tensor, blocks: tuple[int, ...]) -> None:
    bad = [blocks[i] for i, ok in enumerate(valid.tolist()) if not ok]
    if bad:
        raise FloatingPointError(f"non-finite values in block features {bad}")

"""DiverseDiT representation-diversity loss (method-spec §3–§6, §10–§12), release semantics.

L_div = w_orth·L_orth + w_mi·L_MI + w_disp·L_disp over the block features h_0 … h_{L−1}; the
objective adds w(L_div)·L_div with the adaptive weight of §6.

The release skips non-finite blocks and pairs with Python branches (one host sync per check).
Here the same result is computed with masks: invalid blocks are zeroed before any reduction, the
pair set is the first ``max_pairs`` valid candidates (cumsum over a validity mask of the candidate
list) and a non-finite L_div becomes 0 through ``torch.where``. No ``.item()`` or branching on
device tensor values happens for the ``skip`` and ``zero_loss`` policies (on the CPU, where it
costs no sync, the eager statistics skip their zeroing pass when every block is finite); index
tensors are cached per (L, config, device), so only the first call on a device copies host
data to it.

All terms are read off small per-block statistics (token means, row-averaged token cosines of
block pairs, column norms), computed in one of two equivalent ways: eagerly by an autograd
Function with a hand-written float32 backward that keeps no float32 copy of the features (sums
and pair cosines from batched products, kept in IEEE float32 whatever the TF32 switch), or,
with ``compiled=True``, as plain differentiable ops that ``torch.compile`` fuses (pair cosines
only for the chosen pairs, elementwise). Both are exact float32, like the release.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import lru_cache, partial, reduce
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..numerics import allow_tf32

TERMS = ("orth", "mi", "disp")
ORTH_FORMS = ("signed", "abs", "squared")
MI_FORMS = ("abs_of_mean", "mean_of_abs")
DISP_FORMS = ("release_l1l2_usage", "mean_activation_variance")
STATS_DTYPES = ("fp32", "autocast")
PAIR_MODES = ("release_formula", "star", "explicit", "all")
NONFINITE_POLICIES = ("skip", "raise", "zero_loss")
WEIGHT_GRADS = ("live", "detached")
MAX_LOSS = 5.0  # release clamp; unreachable for the default weights (|L_div| <= 2/3)
MIN_EPS = 1e-18  # eps² and 1/eps² stay normal float32 numbers (the release's eps: 1e-8)


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
        if _real("eps", self.eps) < MIN_EPS:
            raise ValueError(
                f"DiversityConfig.eps must be >= {MIN_EPS} (float32 statistics divide by eps², "
                f"which would underflow), got {self.eps!r}"
            )
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


class _Stats(NamedTuple):
    """Per-block statistics the terms are read from (B = stacked blocks, D = channels)."""

    valid: Tensor  # (B,) bool: every value of the block is finite (invalid blocks read as 0)
    mu: Tensor  # (B, D) token means
    cos: Tensor  # (B, B) row-averaged token cosines of block pairs (eager; or empty)
    fmean: Tensor  # (B, D) row means of the row-normalised blocks
    l1: Tensor  # (B, D) column L1 norms
    l2: Tensor  # (B, D) column L2 norms
    rows: Tensor  # (M, B, D) the masked features, when pair cosines are read from them instead
    slot_cos: Tensor | None = None  # (cap,) c of the chosen pairs in slot order (Triton path)
    slot_filled: Tensor | None = None  # (cap,) which slots hold a chosen pair


class _Need(NamedTuple):
    mu: bool
    cos: bool
    fmean: bool
    cols: bool


_PROBE = 2.0**-64  # finite float32/64 values times this cannot overflow a column sum
CHUNK_BYTES = 1 << 20  # rows of the stack per pass of the eager statistics on the CPU


def _ieee(fn, *args: Tensor) -> Tensor:
    """``fn(*args)`` (a matmul) in IEEE float32 arithmetic, whatever the TF32 switch."""
    with allow_tf32(False):
        return fn(*args)


def _host_readable(t: Tensor) -> bool:
    """Whether reading ``t``'s values on the host costs no device sync (a CPU tensor)."""
    return t.device.type == "cpu"


class _FusedStats(torch.autograd.Function):
    """Eager statistics of an (M, B, D) stack (rows, blocks, channels) in ``dtype``, with a
    hand-written backward.

    Values and gradients equal :func:`_autograd_stats` (abs_of_mean MI) up to float rounding, in
    few passes over the stack: sums over rows are products with a ones row (one read, where a
    reduction over a dim that is not the innermost is 2× slower on the CPU); pair cosines come
    from per-row block×block Gram matrices, whose diagonals are the row norms and which give
    the backward's radial term, so no row-normalised copy is made; the backward is one batched
    product per row plus per-channel terms. The passes over the stack go a range of rows at a
    time (:func:`_chunks`: on the CPU about 1 MiB, whose temporaries stay in cache and never
    take a stack's size). Non-finite blocks are found by a probe sum that cannot overflow and
    are zeroed, so they get a zero gradient (on the CPU, where reading the check costs no
    device sync, the zeroing pass is skipped when every block is finite); only the zeroed
    stack is kept, in its own dtype. Sums and products run in float32 (float64 for float64
    input) outside autocast; a 16-bit ``dtype`` rounds the row norms (so eps underflows as in
    half-precision code) and the statistics, and the gradient is rounded once.
    """

    @staticmethod
    def forward(ctx, x: Tensor, eps: float, dtype: torch.dtype, need: _Need):
        wide = reduce(torch.promote_types, (x.dtype, dtype, torch.float32))
        with torch.autocast(x.device.type, enabled=False):
            stats = _FusedStats._forward(ctx, x, eps, dtype, need, wide)
        ctx.need, ctx.wide = need, wide
        ctx.mark_non_differentiable(stats[0])
        return stats

    @staticmethod
    def _forward(ctx, x: Tensor, eps: float, dtype: torch.dtype, need: _Need, wide: torch.dtype):
        rows, nb, d = x.shape
        xw = x.to(wide)  # no copy for a float32 stack with float32 statistics (the CPU default)
        lhs = xw.new_empty(2, rows)
        lhs[0], lhs[1] = _PROBE, 1.0
        probe, total = _ieee(torch.mm, lhs, xw.view(rows, nb * d)).view(2, nb, d)
        valid = torch.isfinite(probe).all(dim=-1)
        if not (_host_readable(x) and valid.all()):
            x = torch.where(valid[:, None], x, 0)
            xw = x if x.dtype == wide else torch.where(valid[:, None], xw, 0)

        def none() -> Tensor:  # placeholder output (distinct tensors for autograd)
            return x.new_zeros(0, dtype=dtype)

        mu = (torch.where(valid[:, None], total, 0) / rows).to(dtype) if need.mu else none()
        cos, fmean, inv, gram = none(), none(), none(), none()
        l1, l2 = xw.new_zeros(1, nb * d), xw.new_zeros(1, nb * d)  # sums over the row ranges
        if need.cos:
            gram = xw.new_empty(rows, nb, nb)
        with allow_tf32(False):  # the passes over the stack: products and the column norms
            for part in _chunks(xw):
                xs = xw[part]
                if need.cos:  # one (B, B) Gram matrix per row; its diagonal holds the row norms²
                    torch.bmm(xs, xs.transpose(1, 2), out=gram[part])
                if need.cols:
                    mag = xs.abs().view(len(xs), nb * d)
                    l1 += torch.mm(lhs[1:, part], mag)
                    l2 += torch.mm(lhs[1:, part], mag.square_())
        if need.cos or need.fmean:
            if need.cos:
                norm = gram.diagonal(dim1=1, dim2=2).sqrt()
            else:
                norm = torch.linalg.vector_norm(xw, dim=-1)
            norm = norm.to(dtype)
            inv = torch.where(norm >= eps, 1.0 / norm.clamp_min(eps), -1.0 / eps)  # sign = clamped
            scale = inv.abs().to(wide)  # (M, B)
            if need.cos:  # c(a, b): mean over rows of ⟨x_a, x_b⟩/(‖x_a‖‖x_b‖), no overflow
                cos = ((gram * scale[:, :, None]) * scale[:, None, :]).sum(dim=0) / rows
            if need.fmean:
                fmean = _ieee(torch.bmm, scale.T[:, None] / rows, xw.transpose(0, 1)).squeeze(1)
        l1, l2 = (l1.view(nb, d), l2.view(nb, d).sqrt()) if need.cols else (none(), none())
        ctx.save_for_backward(x, inv, gram, l2, valid)
        return valid, mu, cos.to(dtype), fmean.to(dtype), l1.to(dtype), l2.to(dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, _, g_mu, g_cos, g_fmean, g_l1, g_l2):
        with torch.autocast(g_mu.device.type, enabled=False):
            return _FusedStats._backward(ctx, g_mu, g_cos, g_fmean, g_l1, g_l2), None, None, None

    @staticmethod
    def _backward(ctx, g_mu, g_cos, g_fmean, g_l1, g_l2):
        x, inv, gram, l2, valid = ctx.saved_tensors
        need, rows, wide = ctx.need, x.shape[0], ctx.wide
        # the masking in the forward: no gradient reaches a non-finite block (small tensors only)
        keep = valid[:, None].to(wide)
        g_mu, g_fmean, g_l1, g_l2 = (
            g.to(wide) * keep if g.numel() else g for g in (g_mu, g_fmean, g_l1, g_l2)
        )
        g_cos = g_cos.to(wide) * keep * keep.T if g_cos.numel() else g_cos
        mix = coef = scale = None
        if need.cos or need.fmean:
            # with f̂ = s·x (s = 1/‖x‖, or 1/eps on clamped rows) and g = ∂L/∂f̂ per row:
            # ∂L/∂x = s·g − s²·⟨g, f̂⟩·x on unclamped rows, s·g on clamped ones
            scale = inv.abs().to(wide)
            radial = torch.zeros_like(scale)  # ⟨g, f̂⟩ per row
            if need.cos:  # g_b = Σ_a (g_ba + g_ab)/M·f̂_a: one (B, B) product per row
                g_sym = (g_cos + g_cos.T) / rows
                mix = (scale[:, :, None] * g_sym) * scale[:, None, :]  # (M, b, a)
                radial += (mix * gram).sum(dim=-1)  # gram is symmetric
            if need.fmean:  # g_b += g_fmean_b/M
                xw = x.to(wide)
                dots = _ieee(torch.bmm, xw.transpose(0, 1), g_fmean[:, :, None]).squeeze(-1)
                radial += scale * dots.T / rows
            coef = torch.where(inv > 0, -(scale * radial) * scale, 0.0)
            if mix is not None:  # the radial term is diagonal in the blocks: the same product
                mix.diagonal(dim1=1, dim2=2).add_(coef)
        if need.cols:
            g_l2 = torch.where(l2 > 0, g_l2 / l2, 0.0)  # l2: saved in the wide dtype
        g_mu, g_fmean = g_mu / rows, g_fmean / rows  # the means' share of each row
        grad = torch.empty(x.shape, dtype=wide, device=x.device)
        with allow_tf32(False):  # the passes over the stack, a range of rows at a time
            for part in _chunks(x):
                xs, out = x[part].to(wide), grad[part]
                if mix is not None:
                    torch.bmm(mix[part], xs, out=out)
                elif coef is not None:
                    torch.mul(xs, coef[part, :, None], out=out)
                else:
                    out.zero_()
                if need.fmean:
                    out.addcmul_(scale[part, :, None], g_fmean)
                if need.mu:
                    out.add_(g_mu)
                if need.cols:
                    out.addcmul_(torch.sign(xs), g_l1).addcmul_(xs, g_l2)
        return grad.to(x.dtype)


def _chunks(x: Tensor) -> list[slice]:
    """Row ranges of a stack, one pass of the statistics each: on the CPU about
    :data:`CHUNK_BYTES` of the stack, so that a range's products, temporaries and gradient
    stay in cache between the operations on it; on a GPU all rows at once (one launch each)."""
    rows = x.shape[0]
    if not (_host_readable(x) and rows):
        return [slice(0, rows)]
    step = max(1, CHUNK_BYTES // x[0].nbytes)
    return [slice(i, i + step) for i in range(0, rows, step)]


def _row_stack(blocks: list[Tensor]) -> Tensor:
    """The blocks as one (M, B, D) stack: rows (sample×token), blocks, channels."""
    return torch.stack(blocks, dim=-2).flatten(0, -3)


def _fused_stats(
    blocks: list[Tensor], dtype: torch.dtype, need: _Need, plan: _Plan, cfg: DiversityConfig
) -> _Stats:
    """The eager statistics (:class:`_FusedStats`). Every ``*_stats`` function takes the blocks
    the plan lists, the statistics dtype, what is needed, the plan and the configuration."""
    if cfg.mi_form != "abs_of_mean" and need.cos:  # the hand-written backward: abs_of_mean
        return _autograd_stats(blocks, dtype, need, plan, cfg)
    x = _row_stack(blocks)
    return _Stats(*_FusedStats.apply(x, cfg.eps, dtype, need), rows=x.new_zeros(0))


def _autograd_stats(
    blocks: list[Tensor], dtype: torch.dtype, need: _Need, plan: _Plan, cfg: DiversityConfig
) -> _Stats:
    """The statistics in plain differentiable ops, on an (M, B, D) stack (rows = sample×token).

    The form ``torch.compile`` fuses (it derives the backward). Pair cosines are not computed
    here: :func:`_pair_terms` gathers the chosen pairs' rows (O(|P|) elementwise work, where a
    B×B Gram matrix per row costs O(B²) in batched matmuls). ``cfg.mi_form`` is applied there.
    """
    x = _row_stack(blocks)
    valid = torch.isfinite(x).all(dim=-1).all(dim=0)  # one fused pass under compile
    x = torch.where(valid[:, None], x, 0).to(dtype)
    empty = x.new_zeros(0)
    mu = x.mean(dim=0) if need.mu else empty
    fmean = empty
    if need.fmean:
        inv = 1.0 / torch.linalg.vector_norm(x, dim=-1).clamp_min(cfg.eps)  # (M, B)
        fmean = (x * inv[..., None]).mean(dim=0)
    l1 = l2 = empty
    if need.cols:
        l1 = torch.linalg.vector_norm(x, ord=1, dim=0)
        l2 = torch.linalg.vector_norm(x, ord=2, dim=0)
    return _Stats(valid, mu, empty, fmean, l1, l2, rows=x if need.cos else empty)


def _triton_stats(
    blocks: list[Tensor], dtype: torch.dtype, need: _Need, plan: _Plan, cfg: DiversityConfig
) -> _Stats:
    """The statistics from the Triton kernels (:mod:`.diversity_triton`): the blocks are read in
    place, invalid blocks' statistics are zeroed here (so their gradient is zero)."""
    from .diversity_triton import diversity_stats

    cand_a, cand_b = (plan.cand_a, plan.cand_b) if need.cos else (plan.cand_a[:0], plan.cand_b[:0])
    skip = cfg.nonfinite_policy == "skip"
    valid, mu, l1, l2, c, filled, a, b, *_ = diversity_stats(
        blocks, cand_a, cand_b, plan.cap, skip, cfg.eps, cfg.mi_form == "mean_of_abs"
    )
    keep = valid[:, None]
    mu, l1, l2 = (torch.where(keep, t, 0.0) for t in (mu, l1, l2))
    c = torch.where(valid[a] & valid[b], c, 0.0)
    empty = mu.new_zeros(0)
    return _Stats(valid, mu, empty, empty, l1, l2, empty, slot_cos=c, slot_filled=filled)


def check_triton_supported(cfg: DiversityConfig) -> None:
    """ValueError for options the Triton statistics do not implement."""
    if cfg.stats_dtype != "fp32":
        raise ValueError("the Triton diversity statistics are float32: stats_dtype='fp32'")
    if "disp" in cfg.terms and cfg.disp_form != "release_l1l2_usage":
        raise ValueError("the Triton diversity statistics implement disp_form='release_l1l2_usage'")


def chosen_slots(
    valid: Tensor, cand_a: Tensor, cand_b: Tensor, cap: int, skip: bool
) -> tuple[Tensor, Tensor]:
    """Candidate positions of the chosen pairs (:func:`_chosen`) in order, padded to ``cap``
    slots, and which slots are filled."""
    return _slots(_chosen(valid, cand_a, cand_b, cap, skip), cap)


def _slots(chosen: Tensor, cap: int) -> tuple[Tensor, Tensor]:
    """A scatter by rank with unique destinations (no sync, deterministic)."""
    n = chosen.shape[0]
    idx = torch.arange(n, device=chosen.device)
    dest = torch.where(chosen, torch.cumsum(chosen, 0) - 1, cap + idx)
    slot = torch.zeros(cap + n, dtype=idx.dtype, device=idx.device).scatter(0, dest, idx)
    filled = torch.zeros(cap + n, dtype=torch.bool, device=idx.device).scatter(0, dest, chosen)
    return slot[:cap], filled[:cap]


def _pair_row_cos(rows: Tensor, a: Tensor, b: Tensor, eps: float, mi_form: str) -> Tensor:
    """c(a, b) of §4.2 for the listed pairs from (M, B, D) rows: the mean over rows of the
    cosine of row-normalised tokens (of its absolute value for ``mean_of_abs``)."""
    xa, xb = rows[:, a], rows[:, b]
    na = torch.linalg.vector_norm(xa, dim=-1).clamp_min(eps)
    nb = torch.linalg.vector_norm(xb, dim=-1).clamp_min(eps)
    cos = (xa * xb).sum(dim=-1) / (na * nb)
    return (cos.abs() if mi_form == "mean_of_abs" else cos).mean(dim=0)


def _chosen(valid: Tensor, cand_a: Tensor, cand_b: Tensor, cap: int, skip: bool) -> Tensor:
    """Which candidates make up P: the first ``cap`` valid ones (``skip``, the release), or all
    (the other policies, whose candidate list is already cut to ``cap``)."""
    pair_ok = valid[cand_a] & valid[cand_b]
    if skip:
        return pair_ok & (torch.cumsum(pair_ok, 0) <= cap)
    return torch.ones_like(pair_ok)  # invalid blocks are zeroed, so their terms are finite


def _pair_terms(stats: _Stats, plan: _Plan, cfg: DiversityConfig) -> tuple[Tensor, Tensor, Tensor]:
    """L_orth, L_MI and the number of pairs used, read off the block statistics."""
    ca, cb = plan.cand_a, plan.cand_b
    skip = cfg.nonfinite_policy == "skip"
    chosen = _chosen(stats.valid, ca, cb, plan.cap, skip)
    weight = chosen.to(stats.mu.dtype)  # every statistic has the statistics dtype
    used = weight.sum()
    denom = used.clamp_min(1.0)
    orth = mi = used.new_zeros(())
    if "orth" in cfg.terms:
        unit = F.normalize(stats.mu, dim=-1, eps=cfg.eps)
        cos = (unit[ca] * unit[cb]).sum(dim=-1)
        cos = {"signed": cos, "abs": cos.abs(), "squared": cos.square()}[cfg.orth_form]
        orth = (cos * weight).sum() / denom
    if "mi" in cfg.terms:
        if stats.slot_cos is not None:  # the chosen pairs' c, computed with the statistics
            c, w = stats.slot_cos, stats.slot_filled.to(weight.dtype)
        elif stats.rows.numel():  # only the chosen pairs, from the rows
            slot, filled = _slots(chosen, plan.cap)
            c = _pair_row_cos(stats.rows, ca[slot], cb[slot], cfg.eps, cfg.mi_form)
            w = filled.to(weight.dtype)
        else:  # every candidate from the eager (B, B) pair cosines
            c, w = stats.cos[ca, cb], weight
        mi = ((c.abs() if cfg.mi_form == "abs_of_mean" else c) * w).sum() / denom
    return orth, mi, used


def _disp_term(stats: _Stats, cfg: DiversityConfig, rows: int) -> Tensor:
    """L_disp over all valid blocks (invalid blocks are already zero); 0 if < 2 are valid."""
    valid = stats.valid
    if cfg.disp_form == "release_l1l2_usage":
        # a_k[c] = mean_r |X[r,c]| / max(||X[:,c]||, eps): column-normalised mean |activation|
        l1, l2 = stats.l1, stats.l2
        count = valid.sum().to(l1.dtype)
        usage = (l1 / l2.clamp_min(cfg.eps) / rows).sum(dim=0) / (count + cfg.eps)
        usage = usage / (usage.max() + cfg.eps)
        var = (usage - usage.mean()).square().mean()
        loss = -torch.clamp(var / 0.25, 0.0, 1.0)
    else:
        # paper reading: per-block channel means of row-normalised tokens, −D·Var over channels
        fmean = stats.fmean
        count = valid.sum().to(fmean.dtype)
        var = (fmean - fmean.mean(dim=1, keepdim=True)).square().mean(dim=1)
        loss = -fmean.shape[1] * (var * valid.to(var.dtype)).sum() / count.clamp_min(1.0)
    return torch.where(count >= 2, loss, 0.0)


def diversity_loss(
    features: Sequence[Tensor],
    cfg: DiversityConfig,
    *,
    compiled: bool = False,
    triton: bool = False,
) -> dict[str, Tensor]:
    """Diversity loss of block features ``features[k]`` (each (N, T, D) or any (..., D) shape).

    Returns 0-dim float32 tensors: ``orth``, ``mi``, ``disp``, ``div`` (weighted sum of the
    enabled terms, clamped at 5, non-finite → 0), ``weight`` (w), ``loss`` (= w·div),
    ``pairs_used``, ``blocks_skipped`` (non-finite blocks among those the loss reads) and
    ``div_nonfinite`` (1 when ``div`` was replaced by 0). ``nonfinite_policy='raise'`` synchronises
    with the device to raise ``FloatingPointError`` naming the bad blocks.

    ``compiled=True`` runs the same mathematics through ``torch.compile`` (plain differentiable
    statistics that Inductor fuses; the ``raise`` policy stays eager). Compiled once per shape.
    ``triton=True`` computes the statistics with the Triton kernels of :mod:`.diversity_triton`
    (float32 statistics, release dispersion form; the trainer's CUDA default), alone
    or, with ``compiled=True``, as an opaque operator inside the compiled loss.
    """
    if not features:
        raise ValueError("diversity_loss needs at least one block feature")
    shape = features[0].shape
    if len(shape) < 2 or any(f.shape != shape for f in features):
        raise ValueError(f"block features must share one (..., D) shape, got {shape} and others")
    plan = _plan(len(features), cfg, features[0].device)
    if triton:
        check_triton_supported(cfg)
        from .diversity_triton import check_dtypes

        check_dtypes(features)
    if compiled and cfg.nonfinite_policy != "raise":
        stats_fn = _triton_stats if triton else _autograd_stats
        return _compiled_terms(stats_fn)(tuple(features), plan, cfg)
    return _terms(tuple(features), plan, cfg, _triton_stats if triton else _fused_stats)


@lru_cache(maxsize=2)
def _compiled_terms(stats_fn):
    return torch.compile(partial(_terms, stats_fn=stats_fn), dynamic=False)


def _terms(features: tuple[Tensor, ...], plan: _Plan, cfg: DiversityConfig, stats_fn) -> dict:
    device = features[0].device
    zero = torch.zeros((), device=device)
    orth = mi = disp = zero
    used = skipped = zero
    all_ok = torch.ones((), dtype=torch.bool, device=device)
    fp32 = cfg.stats_dtype == "fp32"
    # fp32: statistics in float32 outside autocast; autocast: leave the ambient region as it is
    region = torch.autocast(device_type=device.type, enabled=False) if fp32 else nullcontext()
    with region:
        if plan.blocks:
            blocks = [features[k] for k in plan.blocks]
            pairs = len(plan.cand_a) > 0
            need = _Need(
                mu=pairs and "orth" in cfg.terms,
                cos=pairs and "mi" in cfg.terms,
                fmean="disp" in cfg.terms and cfg.disp_form == "mean_activation_variance",
                cols="disp" in cfg.terms and cfg.disp_form == "release_l1l2_usage",
            )
            promoted = reduce(torch.promote_types, (b.dtype for b in blocks))
            dtype = torch.float32 if fp32 else promoted
            stats = stats_fn(blocks, dtype, need, plan, cfg)
            if cfg.nonfinite_policy == "raise":
                _raise_if_bad(stats.valid, plan.blocks)  # host sync, documented
            skipped = (~stats.valid).sum().float()
            all_ok = stats.valid.all()
            if pairs:
                orth, mi, used = _pair_terms(stats, plan, cfg)
            if "disp" in cfg.terms:
                disp = _disp_term(stats, cfg, blocks[0][..., 0].numel())
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

"""Tests for diversedit.losses.diversity against a per-pair loop reference of the release loss."""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch

from diversedit.losses.diversity import (
    MIN_EPS,
    DiversityConfig,
    _autograd_stats,
    _fused_stats,
    _Need,
    _plan,
    _terms,
    adaptive_weight,
    candidate_pairs,
    chosen_slots,
    diversity_loss,
    select_pairs,
)
from diversedit.numerics import allow_tf32

EPS = 1e-8


# --------------------------------------------------------------------------- reference (loops)
def _bad(t: torch.Tensor) -> bool:
    return bool(torch.isnan(t).any() or torch.isinf(t).any())


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / torch.clamp_min(v.norm(), EPS)


def ref_pairs(feats: list[torch.Tensor], cfg: DiversityConfig) -> list[tuple[int, int]]:
    """Walk the candidates exactly like the release loop, skipping pairs with a bad block."""
    n = len(feats)
    if n < 2:
        return []
    total = n * (n - 1) // 2
    if cfg.pairs == "explicit":
        cap = cfg.max_pairs or len(cfg.explicit_pairs)
        walk = list(cfg.explicit_pairs)
    else:
        cap = min(cfg.max_pairs, total) if cfg.max_pairs else total
        ids = list(range(n))  # sorted block ids; negative i indexes from the end
        lo = cap - cfg.pair_encoder_depth - 1 if cfg.pairs == "release_formula" else 0
        hi = cap + cfg.pair_encoder_depth if cfg.pairs == "release_formula" else n
        walk = [(ids[i], ids[j]) for i in range(lo, hi) for j in range(i + 1, n)]
    chosen = []
    for a, b in walk:
        if len(chosen) >= cap:
            break
        if _bad(feats[a]) or _bad(feats[b]):
            continue
        chosen.append((a, b))
    return chosen


def ref_loss(feats: list[torch.Tensor], cfg: DiversityConfig) -> dict[str, torch.Tensor]:
    """Straightforward float64 loop implementation of method-spec §4 (release semantics)."""
    feats = [f.double() for f in feats]
    flat = [f.reshape(-1, f.shape[-1]) for f in feats]
    pairs = ref_pairs(feats, cfg)
    orth = mi = torch.zeros((), dtype=torch.float64)
    for a, b in pairs:
        cos = _unit(flat[a].mean(0)) @ _unit(flat[b].mean(0))
        orth = orth + {"signed": cos, "abs": cos.abs(), "squared": cos**2}[cfg.orth_form]
        row_a = flat[a] / flat[a].norm(dim=1, keepdim=True).clamp_min(EPS)
        row_b = flat[b] / flat[b].norm(dim=1, keepdim=True).clamp_min(EPS)
        rows = (row_a * row_b).sum(1)  # cosine of each (sample, token) row
        mi = mi + (rows.mean().abs() if cfg.mi_form == "abs_of_mean" else rows.abs().mean())
    orth, mi = orth / max(len(pairs), 1), mi / max(len(pairs), 1)
    good = [x for x in flat if not _bad(x)]
    disp = torch.zeros((), dtype=torch.float64)
    if len(good) >= 2 and cfg.disp_form == "release_l1l2_usage":
        usage = torch.zeros(good[0].shape[1], dtype=torch.float64)
        for x in good:
            cols = x / x.norm(dim=0, keepdim=True).clamp_min(EPS)  # column-normalised
            usage = usage + cols.abs().mean(0)
        usage = usage / (len(good) + EPS)
        usage = usage / (usage.max() + EPS)
        var = ((usage - usage.mean()) ** 2).mean()
        disp = -torch.clamp(var / 0.25, 0, 1)
    elif len(good) >= 2:
        for x in good:
            mean = (x / x.norm(dim=1, keepdim=True).clamp_min(EPS)).mean(0)
            disp = disp - x.shape[1] * ((mean - mean.mean()) ** 2).mean() / len(good)
    parts = {"orth": orth, "mi": mi, "disp": disp}
    parts = {t: v if t in cfg.terms else torch.zeros_like(v) for t, v in parts.items()}
    div = sum(
        w * parts[t]
        for t, w in zip(("orth", "mi", "disp"), cfg.weights, strict=True)
        if t in cfg.terms
    )
    div = torch.clamp(div, max=5.0)
    if not torch.isfinite(div):
        div = torch.zeros((), dtype=torch.float64)
    return {**parts, "div": div, "pairs_used": torch.tensor(float(len(pairs)))}


# --------------------------------------------------------------------------- helpers
def _feats(n_blocks: int, seed: int = 0, shape=(2, 3, 8), shared: float = 1.0) -> list:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(*shape, generator=g)
    out = []
    for k in range(n_blocks):
        scale = torch.rand(shape[-1], generator=g) * 2 + 0.1
        out.append((shared * base + torch.randn(*shape, generator=g)) * scale + 0.1 * k)
    return out


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 2e-5) -> None:
    assert torch.allclose(a.double(), b.double(), atol=tol, rtol=tol), (a, b)


# --------------------------------------------------------------------------- pair sets
def _row(i: int, js) -> list[tuple[int, int]]:
    return [(i, j) for j in js]


@pytest.mark.parametrize("num_blocks", [12, 24, 28])
def test_pair_tables_of_spec(num_blocks: int) -> None:
    e4 = (
        _row(5, range(6, 12)) + _row(6, range(7, 11)) if num_blocks == 12 else _row(5, range(6, 16))
    )
    assert select_pairs(num_blocks, DiversityConfig(pair_encoder_depth=4)) == e4
    assert select_pairs(num_blocks, DiversityConfig(pair_encoder_depth=8)) == _row(1, range(2, 12))
    star = _row(0, range(1, 11))
    assert select_pairs(num_blocks, DiversityConfig(pairs="star")) == star
    assert select_pairs(num_blocks, DiversityConfig(pair_encoder_depth=9)) == star


def test_pair_wraparound_for_deep_encoder() -> None:
    assert select_pairs(12, DiversityConfig(pair_encoder_depth=10)) == _row(11, range(10))
    xl = [(25, 26), (25, 27), *_row(25, range(8))]
    assert select_pairs(28, DiversityConfig(pair_encoder_depth=12)) == xl
    # the walk continues past the cut: row −3 reaches (25, 25) (Python indexing), then row −2
    cands = candidate_pairs(28, DiversityConfig(pair_encoder_depth=12))
    assert cands[:10] == xl and (25, 25) in cands and cands[30] == (26, 27)
    with pytest.raises(ValueError, match="release_formula"):
        candidate_pairs(3, DiversityConfig(pair_encoder_depth=8))  # start −6 < −3


def test_candidate_list_order_and_other_modes() -> None:
    cands = candidate_pairs(12, DiversityConfig(pair_encoder_depth=8))
    assert cands[:12] == [*_row(1, range(2, 12)), (2, 3), (2, 4)]
    assert cands == [(i, j) for i in range(1, 12) for j in range(i + 1, 12)]
    every = [(i, j) for i in range(6) for j in range(i + 1, 6)]
    assert select_pairs(6, DiversityConfig(pairs="all", max_pairs=0)) == every
    assert select_pairs(6, DiversityConfig(pairs="all", max_pairs=4)) == every[:4]
    four = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert select_pairs(4, DiversityConfig(pairs="star")) == four  # cap min(10, 6)
    cfg = DiversityConfig(pairs="explicit", explicit_pairs=[(3, 1), (0, 2), (2, 3)], max_pairs=2)
    assert cfg.explicit_pairs == ((3, 1), (0, 2), (2, 3))
    assert candidate_pairs(4, cfg) == [(3, 1), (0, 2), (2, 3)]
    assert select_pairs(4, cfg) == [(3, 1), (0, 2)]
    with pytest.raises(ValueError, match="outside"):
        select_pairs(3, cfg)
    assert select_pairs(1, DiversityConfig()) == []


# --------------------------------------------------------------------------- reference agreement
CONFIGS = [
    DiversityConfig(),
    DiversityConfig(pair_encoder_depth=4),
    DiversityConfig(pair_encoder_depth=10),
    DiversityConfig(pairs="star", orth_form="abs", mi_form="mean_of_abs"),
    DiversityConfig(pairs="all", max_pairs=0, orth_form="squared"),
    DiversityConfig(pairs="all", max_pairs=3, disp_form="mean_activation_variance"),
    DiversityConfig(
        pairs="explicit", explicit_pairs=((3, 1), (7, 2), (0, 11), (3, 5)), max_pairs=3
    ),
    DiversityConfig(terms=("mi", "disp"), weights=(0.0, 0.7, 0.2)),
]
BAD = [(), (3,), (1,), (2, 7), (1, 2, 3, 4, 5, 6, 7, 8, 9, 10), tuple(range(12))]


def _loss(feats: list[torch.Tensor], cfg: DiversityConfig, path: str) -> dict:
    if path == "fused":
        return diversity_loss(feats, cfg)
    return _terms(tuple(feats), _plan(len(feats), cfg, feats[0].device), cfg, _autograd_stats)


@pytest.mark.parametrize("path", ["fused", "autograd"])
@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("bad", BAD)
def test_matches_loop_reference(cfg: DiversityConfig, bad: tuple[int, ...], path: str) -> None:
    feats = _feats(12, seed=len(bad))
    for i, k in enumerate(bad):
        feats[k][0, 1, i % 8] = (math.nan, math.inf, -math.inf)[i % 3]
    leaves = [f.clone().requires_grad_(True) for f in feats]
    out = _loss(leaves, cfg, path)
    ref_leaves = [f.double().requires_grad_(True) for f in feats]
    ref = ref_loss(ref_leaves, cfg)
    for key in ("orth", "mi", "disp", "div", "pairs_used"):
        assert out[key].dtype == torch.float32
        _close(out[key], ref[key])
    assert out["blocks_skipped"] == len(bad)
    # gradients: match the reference autograd on valid blocks, exactly zero on invalid ones
    out["div"].backward()
    ref_grads = []
    if ref["div"].grad_fn is not None:
        ref_grads = torch.autograd.grad(ref["div"], ref_leaves, allow_unused=True)
    for k, leaf in enumerate(leaves):
        expected = ref_grads[k] if ref_grads and ref_grads[k] is not None else None
        if expected is None or k in bad:
            assert leaf.grad is None or not leaf.grad.any(), k
        else:
            _close(leaf.grad, expected, tol=1e-4)


def test_matches_reference_xl_wraparound() -> None:
    cfg = DiversityConfig(pair_encoder_depth=12)
    feats = _feats(28, seed=3, shape=(1, 2, 4))
    feats[26][0, 0, 0] = math.nan  # drops (25,26): the walk picks up (25, 8)
    out, ref = diversity_loss(feats, cfg), ref_loss(feats, cfg)
    assert ref_pairs(feats, cfg)[-1] == (25, 8)
    for key in ("orth", "mi", "disp", "div", "pairs_used"):
        _close(out[key], ref[key])


def test_all_blocks_bad_gives_zero_finite_result() -> None:
    feats = [torch.full((2, 3, 4), math.nan) for _ in range(12)]
    out = diversity_loss(feats, DiversityConfig())
    for key in ("orth", "mi", "disp", "div", "loss", "pairs_used"):
        assert out[key] == 0
    assert out["blocks_skipped"] == 12


def test_single_block_is_zero() -> None:
    out = diversity_loss([torch.randn(2, 3, 4)], DiversityConfig())
    assert out["div"] == 0 and out["pairs_used"] == 0


# --------------------------------------------------------------------------- analytic cases
def test_identical_blocks_orth_and_mi_are_one() -> None:
    x = torch.randn(2, 5, 8) + 0.3
    feats = [x.clone() for _ in range(12)]
    out = diversity_loss(feats, DiversityConfig())
    _close(out["orth"], torch.tensor(1.0))
    _close(out["mi"], torch.tensor(1.0))
    _close(out["disp"], ref_loss(feats, DiversityConfig())["disp"])
    _close(out["div"], (2 + out["disp"]) / 3)


def test_orth_signs() -> None:
    cfg = DiversityConfig(pairs="star", terms=("orth", "mi"))
    x = torch.randn(2, 5, 8) + 1.0
    out = diversity_loss([x, -x], cfg)
    _close(out["orth"], torch.tensor(-1.0))
    _close(out["mi"], torch.tensor(1.0))  # |mean cos| = |−1|
    assert out["pairs_used"] == 1
    u, v = torch.zeros(8), torch.zeros(8)
    u[0], v[1] = 2.0, -3.0  # constant tokens with orthogonal means
    out = diversity_loss([u.expand(2, 5, 8), v.expand(2, 5, 8)], cfg)
    _close(out["orth"], torch.tensor(0.0))
    _close(out["mi"], torch.tensor(0.0))
    sq = diversity_loss([x, -x], DiversityConfig(pairs="star", orth_form="squared"))
    _close(sq["orth"], torch.tensor(1.0))


def test_mi_is_token_aligned() -> None:
    cfg = DiversityConfig(pairs="star", terms=("orth", "mi"))
    a = torch.randn(2, 6, 8)
    b = a + 0.3 * torch.randn(2, 6, 8)
    base = diversity_loss([a, b], cfg)
    shuffled = diversity_loss([a, b[:, torch.randperm(6)]], cfg)
    assert abs(float(shuffled["mi"]) - float(base["mi"])) > 1e-2
    _close(shuffled["orth"], base["orth"])  # pooled means do not see the token order
    perm = torch.randperm(8)
    joint = diversity_loss([a[..., perm], b[..., perm]], cfg)
    _close(joint["mi"], base["mi"])
    _close(joint["orth"], base["orth"])


def test_mi_abs_of_mean_versus_mean_of_abs() -> None:
    a = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    b = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])  # row cosines +1 and −1
    cfg = DiversityConfig(pairs="star", terms=("mi",), weights=(0.0, 1.0, 0.0))
    _close(diversity_loss([a, b], cfg)["mi"], torch.tensor(0.0))
    cfg = DiversityConfig(pairs="star", terms=("mi",), mi_form="mean_of_abs")
    _close(diversity_loss([a, b], cfg)["mi"], torch.tensor(1.0))


def test_disp_hand_computed_and_properties() -> None:
    cfg = DiversityConfig(terms=("disp",))
    # channel 0 = [3, 4] -> 7/(2·5) = 0.7; channel 1 = [1, 0] -> 1/(2·1) = 0.5; u ∝ [1, 5/7]
    x = torch.tensor([[[3.0, 1.0], [4.0, 0.0]]])
    _close(diversity_loss([x, x.clone()], cfg)["disp"], torch.tensor(-4 / 49))
    # uniform usage (all |x| equal) -> 0
    signs = torch.randint(0, 2, (2, 5, 6)).float() * 2 - 1
    _close(diversity_loss([signs, -signs, 3 * signs], cfg)["disp"], torch.tensor(0.0))
    # half the channels silent -> two-point usage {0, 1}, variance 0.25 -> −1; finite
    half = signs.clone()
    half[..., :3] = 0
    _close(diversity_loss([half, 2 * half], cfg)["disp"], torch.tensor(-1.0), tol=1e-6)
    # invariant to per-block, per-channel positive rescaling; within [−1, 0]
    feats = [f.exp() * torch.randn(8).sign() for f in _feats(6, seed=5)]
    base = diversity_loss(feats, cfg)["disp"]
    scaled = [f * (torch.rand(8) * 50 + 0.01) for f in feats]
    _close(diversity_loss(scaled, cfg)["disp"], base)
    assert -1.0 <= float(base) < 0.0
    # fewer than two valid blocks -> 0
    one_bad = [feats[0], torch.full_like(feats[1], math.nan)]
    assert diversity_loss(one_bad, cfg)["disp"] == 0


def test_disp_paper_form_range() -> None:
    cfg = DiversityConfig(terms=("disp",), disp_form="mean_activation_variance")
    e0 = torch.zeros(1, 4, 8)
    e0[..., 0] = 1.0  # every token = e_0: channel means (1, 0, …) -> D·Var = 1 − 1/D
    _close(diversity_loss([e0, e0], cfg)["disp"], torch.tensor(-(1 - 1 / 8)))
    feats = _feats(5, seed=2)
    assert -1.0 <= float(diversity_loss(feats, cfg)["disp"]) <= 0.0


# --------------------------------------------------------------------------- adaptive weight
def _w(values, cfg: DiversityConfig) -> list[float]:
    return adaptive_weight(torch.tensor(values), cfg).tolist()


def test_adaptive_weight_values() -> None:
    got = _w([0.05, 0.1, 0.3, 0.5, 0.5 + 1e-6, 0.6], DiversityConfig())
    assert got == pytest.approx([0.0, 0.0, 0.4, 0.8, 1.0, 1.0], abs=1e-6)
    custom = DiversityConfig(adaptive_low=0.2, adaptive_high=0.7)
    got = _w([0.2, 0.45, 0.65, 0.7, 0.7 + 1e-6], custom)
    assert got == pytest.approx([0.0, 0.5, 0.9, 1.0, 1.0], abs=1e-6)
    cont = DiversityConfig(adaptive_low=0.3, adaptive_high=0.9, adaptive_denominator=0.6)
    assert _w([0.6, 0.9], cont) == pytest.approx([0.5, 1.0], abs=1e-6)
    const = DiversityConfig(adaptive=False, lambda_div=0.25)
    assert _w([-0.3, 0.05, 0.6], const) == pytest.approx([0.25] * 3)


@pytest.mark.parametrize("mode", ["live", "detached", "constant"])
def test_adaptive_weight_gradient(mode: str) -> None:
    if mode == "constant":
        cfg = DiversityConfig(adaptive=False, lambda_div=0.7)
    else:
        cfg = DiversityConfig(adaptive_weight_grad=mode)
    for value in (0.05, 0.3, 0.45, 0.6):
        lv = torch.tensor(value, requires_grad=True)
        (adaptive_weight(lv, cfg) * lv).backward()
        if mode == "constant":
            expected = 0.7
        elif value <= 0.1:
            expected = 0.0
        elif value > 0.5:
            expected = 1.0
        else:
            expected = (2 * value - 0.1) / 0.5 if mode == "live" else (value - 0.1) / 0.5
        assert float(lv.grad) == pytest.approx(expected, abs=1e-5), (mode, value)


def test_loss_is_weight_times_div() -> None:
    x = torch.randn(2, 4, 8) + 0.5
    feats = [x + 0.05 * torch.randn(2, 4, 8) for _ in range(12)]  # similar blocks: L_div ≈ 0.6
    out = diversity_loss(feats, DiversityConfig())
    assert float(out["div"]) > 0.5 and out["weight"] == 1.0
    _close(out["loss"], out["div"])
    const = diversity_loss(feats, DiversityConfig(adaptive=False, lambda_div=2.0))
    _close(const["loss"], 2.0 * const["div"])


def test_release_clamp_at_five() -> None:
    x = torch.randn(2, 4, 8) + 1.0
    feats = [x.clone().requires_grad_(True) for _ in range(12)]
    cfg = DiversityConfig(terms=("orth",), weights=(10.0, 0.0, 0.0))  # 10·L_orth = 10
    out = diversity_loss(feats, cfg)
    assert out["div"] == 5.0 and out["loss"] == 5.0
    out["loss"].backward()
    assert all(f.grad is None or not f.grad.any() for f in feats)


# --------------------------------------------------------------------------- numerics / policies
def test_fp16_extremes_stay_finite() -> None:
    g = torch.Generator().manual_seed(0)
    feats = []
    for _ in range(12):
        x = (torch.rand(2, 4, 8, generator=g) * 2 - 1) * 65504
        x[..., :2] = 0  # all-zero channels
        x[0, 0] = 0  # an all-zero token
        feats.append(x.half().requires_grad_(True))
    out = diversity_loss(feats, DiversityConfig())
    ref = ref_loss([f.detach() for f in feats], DiversityConfig())
    for key in ("orth", "mi", "disp", "div"):
        assert torch.isfinite(out[key]) and out[key].dtype == torch.float32
        _close(out[key], ref[key], tol=1e-4)
    out["div"].backward()
    assert all(torch.isfinite(f.grad).all() for f in feats)


def test_autocast_stats_inherit_fp16_eps_underflow() -> None:
    x = torch.randn(1, 4, 8)
    x[0, 0] = 0  # all-zero token: ‖·‖ = 0 and eps = 1e-8 rounds to 0 in fp16 -> 0/0
    feats = [x.half(), (x * 2).half()]
    fp32 = diversity_loss(feats, DiversityConfig(pairs="star"))
    assert torch.isfinite(fp32["mi"]) and fp32["div_nonfinite"] == 0
    half = diversity_loss(feats, DiversityConfig(pairs="star", stats_dtype="autocast"))
    assert torch.isnan(half["mi"]) and half["div"] == 0 and half["div_nonfinite"] == 1


@pytest.mark.parametrize("region", ["fp16 blocks", "fp32 blocks under fp16 autocast"])
def test_autocast_stats_follow_fp32_stats_at_large_norms(region: str) -> None:
    """16-bit statistics round the norms and the statistics, not the sums and products behind
    them: rows of norm ~400, whose squares and Gram entries overflow fp16, give the fp32
    statistics' loss and gradients to fp16 precision, also inside an fp16 autocast region."""
    g = torch.Generator().manual_seed(0)
    feats = [(torch.randn(2, 256, 32, generator=g) * 70 + 20 * (k % 3)) for k in range(12)]
    if region == "fp16 blocks":
        feats = [f.half() for f in feats]
    runs = []
    for stats_dtype in ("fp32", "autocast"):
        leaves = [f.clone().requires_grad_(True) for f in feats]
        with torch.autocast("cpu", dtype=torch.float16, enabled=region != "fp16 blocks"):
            out = diversity_loss(leaves, DiversityConfig(stats_dtype=stats_dtype))
        (out["div"] * 2.0**10).backward()  # scaled like fp16 training, or fp16 grads underflow
        runs.append((out, torch.cat([leaf.grad.float().flatten() for leaf in leaves])))
    (full, g_full), (half, g_half) = runs
    assert half["blocks_skipped"] == 0 and half["div_nonfinite"] == 0
    for key in ("orth", "mi", "disp", "div"):
        _close(half[key], full[key], tol=2e-3)
    assert torch.isfinite(g_half).all()
    assert (g_half - g_full).norm() <= 1e-2 * g_full.norm()


@pytest.mark.parametrize("stats", [_fused_stats, _autograd_stats])
def test_smallest_eps_gives_finite_gradients(stats) -> None:
    """At the smallest eps (1/eps² near the float32 limit), with zero rows in two blocks at one
    token and a NaN block: finite values and gradients, zero on the NaN block, equal for the
    eager and the plain statistics."""
    feats = _feats(6, shape=(2, 4, 8))
    feats[1][0, 0], feats[2][0, 0] = 0.0, 0.0
    feats[3][1, 2, 3] = math.nan
    cfg = DiversityConfig(eps=MIN_EPS, pairs="star", adaptive=False)
    plan = _plan(len(feats), cfg, feats[0].device)
    leaves = [f.clone().requires_grad_(True) for f in feats]
    out = _terms(tuple(leaves), plan, cfg, stats)
    out["div"].backward()
    assert torch.isfinite(out["div"]) and out["blocks_skipped"] == 1
    assert all(torch.isfinite(leaf.grad).all() for leaf in leaves) and not leaves[3].grad.any()
    ref = [f.clone().requires_grad_(True) for f in feats]
    want = _terms(tuple(ref), plan, cfg, _autograd_stats)
    want["div"].backward()
    _close(out["div"], want["div"])
    for a, b in zip(leaves, ref, strict=True):
        _close(a.grad, b.grad, tol=1e-4)


def test_bf16_under_autocast_returns_fp32_and_backprops() -> None:
    layer = torch.nn.Linear(8, 8)
    x = torch.randn(2, 4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = [layer(x + 0.1 * k) for k in range(12)]
        assert feats[0].dtype == torch.bfloat16
        out = diversity_loss(feats, DiversityConfig())
    ref = ref_loss([f.detach() for f in feats], DiversityConfig())
    for key in ("orth", "mi", "disp", "div", "weight", "loss"):
        assert out[key].dtype == torch.float32
    for key in ("orth", "mi", "disp", "div"):
        _close(out[key], ref[key], tol=1e-4)
    out["div"].backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()
    assert layer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("noise", [0.05, 1.5])
def test_gradients_flow_through_live_weight(noise: float) -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 4, 8, generator=g) + 0.5
    feats = [base + noise * torch.randn(2, 4, 8, generator=g) for _ in range(12)]
    leaves = [f.clone().requires_grad_(True) for f in feats]
    out = diversity_loss(leaves, DiversityConfig())
    out["loss"].backward()
    div = float(out["div"].detach())
    factor = 1.0 if div > 0.5 else (2 * div - 0.1) / 0.5  # d(w·L)/dL, live weight
    assert div > 0.1 and (div > 0.5) == (noise < 1)  # one case per band
    fresh = [f.clone().requires_grad_(True) for f in feats]
    div_grads = torch.autograd.grad(diversity_loss(fresh, DiversityConfig())["div"], fresh)
    for leaf, gd in zip(leaves, div_grads, strict=True):  # L_disp reads every block
        assert torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0
        _close(leaf.grad, factor * gd, tol=1e-5)


def test_raise_policy_names_blocks() -> None:
    feats = _feats(12)
    feats[3][0, 0, 0] = math.nan
    feats[7][0, 0, 0] = math.inf
    with pytest.raises(FloatingPointError, match=r"\[3, 7\]"):
        diversity_loss(feats, DiversityConfig(nonfinite_policy="raise"))
    clean = _feats(12)
    _close(
        diversity_loss(clean, DiversityConfig(nonfinite_policy="raise"))["div"],
        ref_loss(clean, DiversityConfig())["div"],
    )


def test_zero_loss_policy() -> None:
    cfg = DiversityConfig(nonfinite_policy="zero_loss")
    clean = _feats(12)
    _close(diversity_loss(clean, cfg)["div"], ref_loss(clean, DiversityConfig())["div"])
    bad = [f.clone().requires_grad_(True) for f in clean]
    with torch.no_grad():
        bad[0][0, 0, 0] = math.nan  # block 0 is outside P but read by L_disp
    out = diversity_loss(bad, cfg)
    assert out["div"] == 0 and out["loss"] == 0 and out["div_nonfinite"] == 1
    assert out["pairs_used"] == 0 and out["blocks_skipped"] == 1
    out["div"].backward()
    assert all(f.grad is None or not f.grad.any() for f in bad)


def test_no_host_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    feats = _feats(12)
    feats[2][0, 0, 0] = math.nan
    feats = [f.requires_grad_(True) for f in feats]
    cfgs = [DiversityConfig(), DiversityConfig(nonfinite_policy="zero_loss", mi_form="mean_of_abs")]
    expected = [diversity_loss(feats, cfg) for cfg in cfgs]  # warms the index cache

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation / host data in diversity_loss")

    # the device path (on the CPU the eager statistics may read their validity check)
    monkeypatch.setattr("diversedit.losses.diversity._host_readable", lambda t: False)
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    monkeypatch.setattr(torch, "tensor", forbidden)  # index tensors come from the cache
    outs = [diversity_loss(feats, cfg) for cfg in cfgs]
    weights = adaptive_weight(outs[0]["div"], cfgs[0])
    monkeypatch.undo()
    for out, exp in zip(outs, expected, strict=True):
        for key in exp:
            _close(out[key], exp[key])
    _close(weights, expected[0]["weight"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_no_sync_and_matches_cpu() -> None:
    feats = _feats(12, shape=(4, 16, 32))
    feats[5][0, 0, 0] = math.nan
    cuda = [f.cuda().half().requires_grad_(True) for f in feats]
    cfg = DiversityConfig()
    diversity_loss(cuda, cfg)  # warm the index cache
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = diversity_loss(cuda, cfg)
        out["div"].backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu = diversity_loss([f.detach().cpu() for f in cuda], cfg)
    for key in ("orth", "mi", "disp", "div", "pairs_used", "blocks_skipped"):
        _close(out[key].cpu(), cpu[key], tol=1e-4)
    assert torch.isfinite(cuda[5].grad).all() and not cuda[5].grad.any()


# --------------------------------------------------------------------------- config validation
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"terms": ("orth", "kl")}, "terms"),
        ({"terms": ()}, "terms"),
        ({"weights": (1.0, 1.0)}, "weights"),
        ({"weights": (1.0, math.nan, 1.0)}, "weights"),
        ({"orth_form": "cos"}, "orth_form"),
        ({"mi_form": "x"}, "mi_form"),
        ({"disp_form": "x"}, "disp_form"),
        ({"eps": 0.0}, "eps"),
        ({"eps": 1e-19}, "eps"),
        ({"stats_dtype": "bf16"}, "stats_dtype"),
        ({"pairs": "ring"}, "pairs"),
        ({"pair_encoder_depth": 0}, "pair_encoder_depth"),
        ({"explicit_pairs": ((1, 1),)}, "explicit_pairs"),
        ({"pairs": "explicit"}, "explicit_pairs"),
        ({"max_pairs": -1}, "max_pairs"),
        ({"nonfinite_policy": "ignore"}, "nonfinite_policy"),
        ({"adaptive": 1}, "adaptive"),
        ({"adaptive_low": 0.5, "adaptive_high": 0.5}, "adaptive_high"),
        ({"adaptive_denominator": 0.0}, "adaptive_denominator"),
        ({"adaptive_weight_grad": "stop"}, "adaptive_weight_grad"),
        ({"lambda_div": math.inf}, "lambda_div"),
    ],
)
def test_config_validation(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        DiversityConfig(**kwargs)


def test_config_lists_become_tuples() -> None:
    cfg = DiversityConfig(terms=["orth"], weights=[1, 0, 0], explicit_pairs=[[0, 1]])
    assert cfg.terms == ("orth",) and cfg.weights == (1.0, 0.0, 0.0)
    assert cfg.explicit_pairs == ((0, 1),)
    hash(cfg)


NEED = _Need(mu=True, cos=True, fmean=True, cols=True)
CFG = DiversityConfig(eps=EPS)  # abs_of_mean MI: the form the hand-written backward covers


def _stats_reference(blocks: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """mu, block-pair cosine matrix, fmean, l1, l2 by the textbook chain (F.normalize, einsum)."""
    x = torch.stack(blocks).flatten(1, -2)
    valid = torch.isfinite(x).flatten(1).all(dim=1)
    x = torch.where(valid[:, None, None], x, 0)
    fh = torch.nn.functional.normalize(x, dim=-1, eps=EPS)
    return (
        x.mean(1),
        torch.einsum("amd,bmd->ab", fh, fh) / x.shape[1],
        fh.mean(1),
        torch.linalg.vector_norm(x, ord=1, dim=1),
        torch.linalg.vector_norm(x, ord=2, dim=1),
    )


@pytest.mark.parametrize("chunk_rows", [None, 3])  # None: one pass; 3: rows 0-2, then row 3
def test_fused_stats_equal_reference_and_autograd_stats(monkeypatch, chunk_rows) -> None:
    """The hand-written backward equals plain autograd, incl. zero, clamped and bad rows, in
    one pass over the rows or in several (the CPU's cache-sized passes)."""
    if chunk_rows:  # a float64 row of the (4, 3, 5) stack holds 120 bytes
        monkeypatch.setattr("diversedit.losses.diversity.CHUNK_BYTES", chunk_rows * 120)
    g = torch.Generator().manual_seed(0)

    def blocks(x: torch.Tensor) -> list[torch.Tensor]:
        return list(x.unbind(0))

    x = torch.randn(3, 2, 2, 5, dtype=torch.float64, generator=g, requires_grad=True)
    fused = lambda t: _fused_stats(blocks(t), torch.float64, NEED, None, CFG)[1:6]  # noqa: E731
    assert torch.autograd.gradcheck(fused, (x,))
    x = x.detach().clone()
    x[1, 1, 0], x[2, 0, 0] = 0.0, 1e-9  # a zero row and a row whose norm is clamped to eps
    x[0, :, :, 3] = 0.0  # an all-zero channel
    finite = x.clone().requires_grad_(True)  # every block finite: no zeroing pass on the CPU
    x[2, 1, 1, 2] = math.nan  # a non-finite block: zeroed, zero gradient
    x.requires_grad_(True)
    weights = [
        torch.randn(t.shape, dtype=torch.float64, generator=g) for t in _stats_reference(blocks(x))
    ]
    flag_sets = [_Need(*f) for f in itertools.product((False, True), repeat=4) if any(f)]
    for xs, flags in itertools.product((x, finite), flag_sets):
        got = _fused_stats(blocks(xs), torch.float64, flags, None, CFG)
        want = _stats_reference(blocks(xs))
        assert got.valid.tolist() == [True, True, xs is finite]
        used = [i for i, t in enumerate(got[1:6]) if t.numel()]
        for i in used:
            assert torch.allclose(got[i + 1], want[i], rtol=1e-12, atol=1e-12), i
        (g_got,) = torch.autograd.grad(sum((got[i + 1] * weights[i]).sum() for i in used), xs)
        (g_want,) = torch.autograd.grad(sum((want[i] * weights[i]).sum() for i in used), xs)
        assert torch.allclose(g_got, g_want, rtol=1e-10, atol=1e-5), flags
        assert xs is finite or not g_got[2].any()
    want = _stats_reference(blocks(x))
    plain = _autograd_stats(blocks(x), torch.float64, NEED, None, CFG)
    assert plain.valid.tolist() == [True, True, False] and plain.rows.shape == (4, 3, 5)
    for i in (0, 2, 3, 4):  # mu, fmean, l1, l2 (pair cosines are gathered by _pair_terms)
        assert torch.allclose(plain[i + 1], want[i], rtol=1e-12, atol=1e-12), i
    # low-precision input: fp32 statistics of the exact upcast, gradient rounded once
    xb = x.detach()[:2].bfloat16().requires_grad_(True)
    got = _fused_stats(blocks(xb), torch.float32, NEED, None, CFG)[1:6]
    xd = xb.detach().double().requires_grad_(True)
    want = _stats_reference(blocks(xd))
    assert all(t.dtype == torch.float32 for t in got)
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a.double(), b, rtol=1e-5, atol=1e-6)
    w2 = [w[:2, :2] if w.shape[:2] == (3, 3) else w[:2] for w in weights]
    sum((t * w.float()).sum() for t, w in zip(got, w2, strict=True)).backward()
    (g_want,) = torch.autograd.grad(sum((t * w).sum() for t, w in zip(want, w2, strict=True)), xd)
    assert xb.grad.dtype == torch.bfloat16
    assert torch.allclose(xb.grad.double(), g_want, rtol=1e-2, atol=1e-2 * g_want.abs().max())


def test_eager_statistics_hold_no_stack_sized_temporaries() -> None:
    """On the CPU the eager statistics pass over the stack a range of rows at a time: forward
    and backward hold the stack and its gradient (the blocks' gradients are views of it) and
    only range-sized temporaries (one pass over all rows at once held a third stack's size)."""
    from diversedit.bench import cpu_allocation_peak

    feats = [torch.randn(4, 128, 256, requires_grad=True) for _ in range(12)]  # 6 MiB, 7 ranges

    def run():
        torch.autograd.grad(diversity_loss(feats, DiversityConfig())["loss"], feats)

    run()  # index caches
    _, peak = cpu_allocation_peak(run)
    assert peak < 2.5 * sum(f.nbytes for f in feats)


def test_eager_validity_is_exact_for_huge_finite_values() -> None:
    """The eager probe sum cannot overflow: a block of the largest finite values is valid (as
    for the release's isfinite check); one inf or NaN anywhere makes a block invalid."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        big = torch.finfo(dtype).max
        blocks = [torch.full((64, 3, 8), v, dtype=dtype) for v in (big, -big)]
        blocks += [torch.randn(64, 3, 8).to(dtype) for _ in range(3)]
        blocks[3][63, 2, 7], blocks[4][0, 0, 0] = math.inf, math.nan
        for stats in (_fused_stats, _autograd_stats):
            got = stats(blocks, torch.float32, NEED, None, CFG)
            assert got.valid.tolist() == [True, True, True, False, False], (stats, dtype)


def test_chosen_slots_order_and_padding() -> None:
    valid = torch.tensor([False, True, True, False, True, False, True])
    cand_a, cand_b = torch.arange(6), torch.full((6,), 6)  # pair k: blocks (k, 6)
    slot, filled = chosen_slots(valid, cand_a, cand_b, 4, skip=True)
    assert slot.tolist()[:3] == [1, 2, 4] and filled.tolist() == [True, True, True, False]
    slot, filled = chosen_slots(valid, cand_a, cand_b, 2, skip=True)  # the first cap valid
    assert slot.tolist() == [1, 2] and filled.all()
    slot, filled = chosen_slots(valid, cand_a[:3], cand_b[:3], 3, skip=False)  # all, in order
    assert slot.tolist() == [0, 1, 2] and filled.all()


def test_compiled_loss_equals_eager() -> None:
    """``compiled=True`` (Inductor-fused plain statistics) gives the eager values and gradients."""
    feats = _feats(12, seed=5, shape=(2, 4, 8))
    feats[4][1, 2, 3] = math.nan  # skipped blocks: the pair walk moves on
    feats[9][0, 0, 0] = -math.inf
    cfg = DiversityConfig(pair_encoder_depth=4)
    runs = []
    for compiled in (False, True):
        leaves = [f.clone().requires_grad_(True) for f in feats]
        out = diversity_loss(leaves, cfg, compiled=compiled)
        out["loss"].backward()
        runs.append((out, [leaf.grad for leaf in leaves]))
    (eager, g_eager), (comp, g_comp) = runs
    assert eager["pairs_used"] == 10 and eager["blocks_skipped"] == 2
    for key in eager:
        _close(comp[key], eager[key])
    for a, b in zip(g_comp, g_eager, strict=True):
        _close(a, b, tol=1e-4)
    assert not g_comp[4].any() and not g_comp[9].any() and g_comp[5].abs().sum() > 0


@pytest.mark.parametrize(
    ("disp_form", "calls"),
    [
        # forward: the probe and token sums, the per-row Gram matrices, the L1 and L2 column
        # sums; backward: one product per row
        ("release_l1l2_usage", ["mm", "bmm", "mm", "mm", "bmm"]),
        # the dispersion term's means of row-normalised tokens add one product each way
        ("mean_activation_variance", ["mm", "bmm", "bmm", "bmm", "bmm"]),
    ],
)
def test_eager_matmuls_ignore_tf32(monkeypatch: pytest.MonkeyPatch, disp_form, calls) -> None:
    """The eager statistics' matmuls run with TF32 off (exact fp32, as the release's sums and
    products) and the user's TF32 switch is restored afterwards, also after an error."""
    seen = []

    def spy(fn):
        def call(*args, **kwargs):
            seen.append((fn.__name__, torch.backends.cuda.matmul.allow_tf32))
            return fn(*args, **kwargs)

        return call

    for name in ("bmm", "mm", "einsum", "matmul", "baddbmm", "addmm"):
        monkeypatch.setattr(torch, name, spy(getattr(torch, name)))
    for name in ("__matmul__", "matmul", "mm", "bmm"):
        monkeypatch.setattr(torch.Tensor, name, spy(getattr(torch.Tensor, name)))
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        feats = [f.requires_grad_(True) for f in _feats(12)]
        diversity_loss(feats, DiversityConfig(disp_form=disp_form))["loss"].backward()
        assert [n for n, _ in seen] == calls
        assert not any(tf32 for _, tf32 in seen)
        assert torch.backends.cuda.matmul.allow_tf32 is True
        with pytest.raises(RuntimeError), allow_tf32(False):
            raise RuntimeError
        assert torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


# --------------------------------------------------------------------------- Triton statistics
interpreted = pytest.mark.triton_interpreted


def small_tiles(monkeypatch) -> None:
    """8×16 tiles, so that small test blocks still span several tiles with partial tails."""
    import diversedit.losses.diversity_triton as kernels

    monkeypatch.setattr(kernels, "BLOCK_M", 8)
    monkeypatch.setattr(kernels, "BLOCK_D", 16)
    monkeypatch.setattr(kernels, "ROWS", 8)  # column sums split over rows, last split partial


TRITON_CONFIGS = [  # (the interpreter is slow: a few configurations that cover the options)
    DiversityConfig(),
    DiversityConfig(pairs="star", orth_form="abs", mi_form="mean_of_abs"),
    DiversityConfig(
        pairs="explicit", explicit_pairs=((3, 1), (7, 2), (0, 11), (3, 5)), max_pairs=3,
        terms=("mi", "disp"), weights=(0.0, 0.7, 0.2),
    ),
]  # fmt: skip


@interpreted
@pytest.mark.parametrize("cfg", TRITON_CONFIGS)
@pytest.mark.parametrize("bad", [(), (1, 2, 3, 4, 5, 6, 7, 8, 9, 10)])
def test_triton_statistics_match_loop_reference(cfg, bad, monkeypatch) -> None:
    """The Triton kernels (interpreted on CPU) against the release-style float64 loop: values,
    pair counts, and gradients (zero on non-finite blocks)."""
    small_tiles(monkeypatch)
    feats = _feats(12, seed=len(bad), shape=(2, 5, 36))  # 10 rows, 36 channels: tails in both
    for i, k in enumerate(bad):
        feats[k][0, 1, i % 8] = (math.nan, math.inf, -math.inf)[i % 3]
    leaves = [f.clone().requires_grad_(True) for f in feats]
    out = diversity_loss(leaves, cfg, triton=True)
    ref_leaves = [f.double().requires_grad_(True) for f in feats]
    ref = ref_loss(ref_leaves, cfg)
    for key in ("orth", "mi", "disp", "div", "pairs_used"):
        _close(out[key], ref[key])
    assert out["blocks_skipped"] == len(bad)
    out["div"].backward()
    ref_grads = torch.autograd.grad(ref["div"], ref_leaves, allow_unused=True)
    for k, leaf in enumerate(leaves):
        if ref_grads[k] is None or k in bad:
            assert leaf.grad is None or not leaf.grad.any(), k
        else:
            _close(leaf.grad, ref_grads[k], tol=1e-4)


@interpreted
@pytest.mark.parametrize("policy", ["skip", "zero_loss"])
def test_triton_statistics_mixed_dtypes_match_fused(policy, monkeypatch) -> None:
    """float32, bfloat16 and float16 blocks in one call (the stream's dtypes under autocast):
    each block's gradient comes back in its own dtype, equal to the eager path's."""
    small_tiles(monkeypatch)
    dtypes = [torch.float32] * 4 + [torch.bfloat16] * 4 + [torch.float16] * 4
    base = _feats(12, seed=3, shape=(2, 5, 20))
    feats = [f.to(dt) for f, dt in zip(base, dtypes, strict=True)]
    feats[5][0, 0, 0] = math.nan
    cfg = DiversityConfig(adaptive=False, nonfinite_policy=policy)
    outs, grads = [], []
    for triton in (False, True):
        leaves = [f.clone().requires_grad_(True) for f in feats]
        outs.append(diversity_loss(leaves, cfg, triton=triton))
        outs[-1]["loss"].backward()
        grads.append([leaf.grad for leaf in leaves])
    for key in ("orth", "mi", "disp", "div", "pairs_used", "blocks_skipped"):
        _close(outs[1][key], outs[0][key])
    for a, b, dt in zip(grads[1], grads[0], dtypes, strict=True):
        assert a.dtype == dt
        torch.testing.assert_close(a.float(), b.float(), atol=1e-4, rtol=1e-2)
    assert not grads[1][5].any()


@interpreted
def test_triton_statistics_inside_the_compiled_loss(monkeypatch) -> None:
    """``compiled=True, triton=True``: the kernels as opaque operators inside the compiled loss
    (one graph, no break) give the eager Triton path's values and gradients."""
    from torch._dynamo.utils import counters

    small_tiles(monkeypatch)
    counters.clear()
    dtypes = [torch.float32] * 6 + [torch.bfloat16] * 6
    feats = [f.to(dt) for f, dt in zip(_feats(12, seed=4, shape=(2, 5, 20)), dtypes, strict=True)]
    feats[2][1, 0, 3] = math.nan
    cfg = DiversityConfig(pair_encoder_depth=4, adaptive=False)
    runs = []
    for compiled in (False, True):
        leaves = [f.clone().requires_grad_(True) for f in feats]
        out = diversity_loss(leaves, cfg, triton=True, compiled=compiled)
        out["loss"].backward()
        runs.append((out, [leaf.grad for leaf in leaves]))
    (eager, g_eager), (got, g_got) = runs
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1  # the forward, compiled once
    assert eager["blocks_skipped"] == 1 and eager["pairs_used"] > 0
    for key in eager:
        torch.testing.assert_close(got[key], eager[key], atol=1e-6, rtol=1e-5)
    for a, b in zip(g_got, g_eager, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), atol=1e-6, rtol=1e-5)
    assert not g_got[2].any()


def test_triton_statistics_refuse_unsupported_options() -> None:
    feats = _feats(4)
    with pytest.raises(ValueError, match="stats_dtype"):
        diversity_loss(feats, DiversityConfig(stats_dtype="autocast"), triton=True)
    with pytest.raises(ValueError, match="disp_form"):
        diversity_loss(feats, DiversityConfig(disp_form="mean_activation_variance"), triton=True)
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("importing the kernels needs a GPU or Triton's interpreter")
    with pytest.raises(ValueError, match="float64"):
        diversity_loss([f.double() for f in feats], DiversityConfig(), triton=True)

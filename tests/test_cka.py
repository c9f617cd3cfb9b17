"""Tests for diversedit.cka: unbiased (HSIC_1) linear CKA, minibatch accumulation, block CKA."""

from __future__ import annotations

import importlib
import itertools
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from diversedit.cka import MinibatchCKA, block_similarity, hsic1, linear_cka


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _orthogonal(p: int, seed: int = 1) -> torch.Tensor:
    return torch.linalg.qr(_randn(p, p, seed=seed))[0]


def _hsic1_ustat(k: torch.Tensor, lg: torch.Tensor) -> float:
    """HSIC_1 as the U-statistic over distinct index tuples (Song et al. 2012), O(n^4) loops."""
    k, lg = k.double().tolist(), lg.double().tolist()
    n = len(k)
    pairs = list(itertools.permutations(range(n), 2))
    t1 = sum(k[i][j] * lg[i][j] for i, j in pairs) / len(pairs)
    triples = list(itertools.permutations(range(n), 3))
    t3 = sum(k[i][j] * lg[i][q] for i, j, q in triples) / len(triples)
    quads = list(itertools.permutations(range(n), 4))
    t2 = sum(k[i][j] * lg[q][r] for i, j, q, r in quads) / len(quads)
    return t1 + t2 - 2 * t3


def _hsic1_formula(k: torch.Tensor, lg: torch.Tensor) -> float:
    """HSIC_1 written literally from the spec formula with explicit ones vectors and traces."""
    n = k.shape[0]
    kt = k.double() - torch.diag(torch.diag(k.double()))
    lt = lg.double() - torch.diag(torch.diag(lg.double()))
    one = torch.ones(n, 1, dtype=torch.float64)
    val = (
        torch.trace(kt @ lt)
        + (one.T @ kt @ one) * (one.T @ lt @ one) / ((n - 1) * (n - 2))
        - 2.0 / (n - 2) * (one.T @ kt @ lt @ one)
    )
    return val.item() / (n * (n - 3))


def _biased_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Kornblith et al. 2019 linear CKA with HSIC_0 (biased), for comparison."""
    x, y = x.double(), y.double()
    x, y = x - x.mean(0), y - y.mean(0)
    return ((y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm())).item()


# ---------------------------------------------------------------------------- hsic1


@pytest.mark.parametrize("n", [4, 5, 7])
def test_hsic1_matches_u_statistic_and_formula(n: int) -> None:
    x, y = _randn(n, 3, seed=n).double(), _randn(n, 5, seed=n + 100).double()
    k, lg = x @ x.T, y @ y.T + 0.3 * (x @ x.T)
    got = hsic1(k, lg)
    assert got.dtype == torch.float64 and got.ndim == 0
    assert got.item() == pytest.approx(_hsic1_ustat(k, lg), rel=1e-9, abs=1e-12)
    assert got.item() == pytest.approx(_hsic1_formula(k, lg), rel=1e-9, abs=1e-12)
    # symmetric in its arguments and ignores the Gram diagonals
    assert hsic1(lg, k).item() == pytest.approx(got.item(), rel=1e-12)
    assert hsic1(k + torch.eye(n) * 7.0, lg).item() == pytest.approx(got.item(), rel=1e-9)


def test_hsic1_needs_four_examples() -> None:
    g = torch.eye(3)
    with pytest.raises(ValueError, match="n >= 4"):
        hsic1(g, g)


# ---------------------------------------------------------------------------- invariances


@pytest.mark.parametrize(("n", "p"), [(20, 50), (40, 10)])
def test_cka_invariances(n: int, p: int) -> None:
    x = _randn(n, p, seed=3)
    q = _orthogonal(p, seed=4)
    assert linear_cka(x, x).item() == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, x @ q).item() == pytest.approx(1.0, abs=1e-10)
    assert linear_cka(x, -3.7 * x).item() == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(3.7 * x, x @ q).item() == pytest.approx(1.0, abs=1e-10)
    # not invariant to a general (non-orthogonal) invertible map
    a = torch.eye(p) + torch.diag(torch.linspace(0.0, 20.0, p))
    assert linear_cka(x, x @ a).item() < 0.99


def test_cka_flattens_per_example_and_accepts_low_precision() -> None:
    x = _randn(12, 3, 4, 5, seed=5)
    y = x + 0.5 * _randn(12, 3, 4, 5, seed=6)
    ref = linear_cka(x.reshape(12, -1), y.reshape(12, -1))
    assert linear_cka(x, y).item() == pytest.approx(ref.item(), abs=1e-12)
    assert 0.3 < ref.item() < 0.99
    assert linear_cka(x.bfloat16(), x.bfloat16()).item() == pytest.approx(1.0, abs=1e-12)


def test_unbiased_cka_near_zero_for_independent_features() -> None:
    unbiased, biased = [], []
    for seed in range(20):
        x, y = _randn(32, 64, seed=2 * seed), _randn(32, 64, seed=2 * seed + 1)
        unbiased.append(linear_cka(x, y).item())
        biased.append(_biased_cka(x, y))
    mean_u, mean_b = sum(unbiased) / 20, sum(biased) / 20
    assert abs(mean_u) < 0.05
    assert 0.6 < mean_b < 0.75  # HSIC_0 is strongly biased when p > n (spec: ≈ 0.669)


def test_translation_invariance_with_large_offset_in_float32() -> None:
    x = _randn(32, 64, seed=7)
    y = x + _randn(32, 64, seed=8)
    ref = linear_cka(x, y).item()
    assert 0.4 < ref < 0.7
    shifted = linear_cka((x + 1e3).float(), (y - 1e3).float()).item()
    assert shifted == pytest.approx(ref, abs=1e-4)  # uncentred float64 would be off by ~1e-2


def test_nan_guard_for_constant_features() -> None:
    x = _randn(8, 6, seed=9)
    const = torch.full((8, 6), 2.5)
    assert torch.isnan(linear_cka(x, const))
    assert torch.isnan(linear_cka(const, const))
    acc = MinibatchCKA(3)  # guard on accumulated sums: rows/columns of non-positive self-HSIC
    acc.hsic = torch.tensor(
        [[-1.0, 0.5, 0.2], [0.5, -2.0, 0.1], [0.2, 0.1, 4.0]], dtype=torch.float64
    )
    m = acc.compute()
    assert torch.isnan(m[:2]).all() and torch.isnan(m[:, :2]).all()
    assert m[2, 2].item() == 1.0


# ---------------------------------------------------------------------------- minibatch


def test_minibatch_equals_ratio_of_summed_hsic1() -> None:
    xs = [_randn(8, 20, seed=10 + i) for i in range(3)]
    ys = [x @ _randn(20, 6, seed=20 + i) + _randn(8, 6, seed=30 + i) for i, x in enumerate(xs)]
    acc = MinibatchCKA(2)
    for x, y in zip(xs, ys, strict=True):
        acc.update([x, y])
    grams = [
        (x.double() @ x.double().T, y.double() @ y.double().T) for x, y in zip(xs, ys, strict=True)
    ]
    sxy = sum(hsic1(k, lg) for k, lg in grams)
    sxx = sum(hsic1(k, k) for k, _ in grams)
    syy = sum(hsic1(lg, lg) for _, lg in grams)
    expected = (sxy / torch.sqrt(sxx * syy)).item()
    got = acc.compute()
    assert got[0, 1].item() == pytest.approx(expected, rel=1e-10)
    # the ratio of sums is not the average of per-batch CKAs
    per_batch = sum(linear_cka(x, y).item() for x, y in zip(xs, ys, strict=True)) / 3
    assert abs(per_batch - expected) > 1e-3


def test_minibatch_identical_batches_equal_single_batch() -> None:
    x = _randn(10, 15, seed=40)
    y = torch.tanh(x @ _randn(15, 7, seed=41))
    acc = MinibatchCKA(2)
    for _ in range(4):
        acc.update([x, y])
    assert acc.compute()[0, 1].item() == pytest.approx(linear_cka(x, y).item(), rel=1e-12)


def test_minibatch_matrix_symmetric_unit_diagonal_and_pairwise_consistent() -> None:
    batches = []
    for b in range(2):
        a = _randn(9, 4, 6, seed=50 + b)
        batches.append([a, torch.relu(a) * 2.0, a + _randn(9, 4, 6, seed=60 + b)])
    acc = MinibatchCKA(3)
    for feats in batches:
        acc.update(feats)
    m = acc.compute()
    assert m.shape == (3, 3) and m.dtype == torch.float64
    assert torch.equal(m, m.T)
    torch.testing.assert_close(m.diagonal(), torch.ones(3, dtype=torch.float64))
    for i, j in [(0, 1), (0, 2), (1, 2)]:
        pair = MinibatchCKA(2)
        for feats in batches:
            pair.update([feats[i], feats[j]])
        assert m[i, j].item() == pytest.approx(pair.compute()[0, 1].item(), rel=1e-10)
    with pytest.raises(ValueError):
        acc.update(batches[0][:2])


# ---------------------------------------------------------------------------- block_similarity


class _FakeSiT(nn.Module):
    """Tiny stand-in for the SiT model: blocks with known CKA relations."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(d, d)
        self.mix = nn.Linear(d, d)
        self.drop = nn.Dropout(0.5)
        self.register_buffer("q", _orthogonal(d, seed=70))
        self.calls: list[tuple[bool, bool, bool]] = []

    def forward(self, x_t, t, y, return_aux: bool = False):
        self.calls.append((self.training, torch.is_grad_enabled(), return_aux))
        h0 = self.drop(self.inp(x_t))  # dropout: identity only in eval mode
        h1 = h0 @ self.q  # orthogonal transform of block 0 -> CKA 1
        h2 = -2.5 * h1 + 4.0  # scaled and shifted -> CKA 1
        h3 = torch.tanh(3.0 * self.mix(h0)) + 0.1 * t[:, None, None] + 0.01 * y[:, None, None]
        return SimpleNamespace(out=h3, features=[h0, h1, h2, h3])


def _batches() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return [(_randn(6, 4, 8, seed=80 + b), torch.rand(6), torch.arange(6) % 3) for b in range(3)]


@pytest.mark.parametrize("unit", ["image", "token"])
def test_block_similarity_known_relations(unit: str) -> None:
    model = _FakeSiT()
    batches = _batches()
    m = block_similarity(model, batches, unit=unit)
    assert m.shape == (4, 4)
    assert model.training  # training flag restored
    assert all(c == (False, False, True) for c in model.calls)  # eval, no_grad, return_aux
    for i, j in [(0, 1), (0, 2), (1, 2)]:
        assert m[i, j].item() == pytest.approx(1.0, abs=1e-10)
    assert 0.0 < m[0, 3].item() < 0.999
    torch.testing.assert_close(m, m.T)
    # equals a manual accumulation over the eval-mode features
    model.eval()
    ref = MinibatchCKA(4)
    with torch.no_grad():
        for x_t, t, y in batches:
            feats = model(x_t, t, y, return_aux=True).features
            if unit == "token":
                feats = [f.reshape(-1, f.shape[-1]) for f in feats]
            ref.update(feats)
    torch.testing.assert_close(m, ref.compute(), rtol=1e-12, atol=1e-12)


def test_block_similarity_units_differ_and_eval_flag_kept() -> None:
    model = _FakeSiT().eval()
    img = block_similarity(model, _batches(), unit="image")
    tok = block_similarity(model, _batches(), unit="token")
    assert not model.training
    assert abs(img[0, 3].item() - tok[0, 3].item()) > 1e-4
    with pytest.raises(ValueError, match="unit"):
        block_similarity(model, _batches(), unit="patch")


def test_block_similarity_probes_meanflow_models_at_r_equal_t() -> None:
    from diversedit.models import create_model

    torch.manual_seed(0)
    kw = dict(depth=4, hidden_size=32, num_heads=4, input_size=8, num_classes=10)
    model = create_model("custom", interval_embedding=True, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # adaLN-Zero: make the blocks differ
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(6, 4, 8, 8, generator=g), torch.rand(6, generator=g), torch.arange(6)
    implicit = block_similarity(model, [(x, t, y)])
    torch.testing.assert_close(implicit, block_similarity(model, [(x, t, y, t)]))
    other = block_similarity(model, [(x, t, y, torch.zeros(6))])
    assert implicit.shape == (4, 4) and not torch.allclose(implicit, other)


# ---------------------------------------------------------------------------- cross-check


def _ckatorch_fn(name: str):
    pytest.importorskip("ckatorch")
    for mod in ("ckatorch", "ckatorch.core", "ckatorch.core.cka"):
        try:
            fn = getattr(importlib.import_module(mod), name, None)
        except ImportError:
            continue
        if fn is not None:
            return fn
    pytest.skip(f"ckatorch has no {name}")


def test_cross_check_ckatorch() -> None:
    cka_base, cka_batch = _ckatorch_fn("cka_base"), _ckatorch_fn("cka_batch")
    x = _randn(3, 10, 12, seed=90)
    y = x @ _randn(12, 5, seed=91) + _randn(3, 10, 5, seed=92)
    acc = MinibatchCKA(2)
    for b in range(3):
        acc.update([x[b], y[b]])
    assert acc.compute()[0, 1].item() == pytest.approx(cka_batch(x, y).item(), rel=1e-8)
    # Kornblith's debiased CKA (unbiased centring) is the same U-statistic ratio
    ref = cka_base(x[0], y[0], unbiased=True).item()
    assert linear_cka(x[0], y[0]).item() == pytest.approx(ref, rel=1e-8)

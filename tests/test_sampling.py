"""Samplers on an analytic problem: data x₀ ~ N(MU, S²) per dimension, ε ~ N(0, 1).

With x_t = α·x₀ + σ·ε the marginal is N(α·MU, V), V = α²S² + σ², and the exact velocity is
v = α̇·E[x₀|x] + σ̇·E[ε|x], E[x₀|x] = MU + αS²/V·(x − α·MU), E[ε|x] = σ/V·(x − α·MU).
The probability-flow ODE map is then x₀ = MU + S·ε exactly (monotone affine map between Gaussians).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from diversedit.sampling import (
    euler_maruyama_sampler,
    euler_sampler,
    guided_velocity,
    meanflow_sampler,
    sample,
    score_from_velocity,
    sde_drift,
)

MU, S = 1.5, 0.5
SHAPE = (4, 2, 2)


def coeffs(t: Tensor, path: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if path == "linear":
        return 1 - t, -torch.ones_like(t), t, torch.ones_like(t)
    h = math.pi / 2
    return torch.cos(h * t), -h * torch.sin(h * t), torch.sin(h * t), h * torch.cos(h * t)


class GaussianVelocity(nn.Module):
    """Exact velocity for Gaussian data; records (batch size, t) of every call."""

    def __init__(self, path: str = "linear") -> None:
        super().__init__()
        self.path = path
        self.calls: list[tuple[int, float]] = []

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        self.calls.append((x.shape[0], t[0].item()))
        tb = t.view(-1, *([1] * (x.dim() - 1)))
        a, da, s, ds = coeffs(tb, self.path)
        var = a**2 * S**2 + s**2
        centred = x - a * MU
        return da * (MU + a * S**2 / var * centred) + ds * s / var * centred

    def exact_score(self, x: Tensor, t: float) -> Tensor:
        a, _, s, _ = coeffs(torch.tensor(t, dtype=x.dtype), self.path)
        return -(x - a * MU) / (a**2 * S**2 + s**2)


class LabelToy(nn.Module):
    """out[:, c] = x[:, c] + (y + 1)·(c + 1)·(1 + t); records batch sizes and times."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, float]] = []

    def forward(self, x: Tensor, t: Tensor, y: Tensor, r: Tensor | None = None) -> Tensor:
        self.calls.append((x.shape[0], t[0].item()))
        c = torch.arange(1, x.shape[1] + 1, dtype=x.dtype).view(1, -1, 1, 1)
        out = x + (y.to(x.dtype) + 1).view(-1, 1, 1, 1) * c * (1 + t.view(-1, 1, 1, 1))
        return out if r is None else out + r.view(-1, 1, 1, 1)


class ExactMeanFlow(nn.Module):
    """Exact average velocity u(z_t, r, t) = (z_t − z_r)/(t − r) along the Gaussian ODE flow."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[float, float]] = []

    def forward(self, z: Tensor, t: Tensor, y: Tensor, r: Tensor) -> Tensor:
        self.calls.append((t[0].item(), r[0].item()))
        tb, rb = (v.view(-1, *([1] * (z.dim() - 1))) for v in (t, r))

        def sd(u: Tensor) -> Tensor:
            return torch.sqrt((1 - u) ** 2 * S**2 + u**2)

        z_r = (1 - rb) * MU + sd(rb) / sd(tb) * (z - (1 - tb) * MU)
        return (z - z_r) / (tb - rb)


def noise(n: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.randn((n, *SHAPE), generator=torch.Generator().manual_seed(seed), dtype=dtype)


def labels(n: int) -> Tensor:
    return torch.zeros(n, dtype=torch.long)


# --- score / drift -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["linear", "cosine"])
@pytest.mark.parametrize("t", [0.04, 0.3, 0.9, 1.0])
def test_score_from_velocity_is_exact_gaussian_score(path: str, t: float) -> None:
    model = GaussianVelocity(path)
    x = noise(8) * 2 + 1
    v = model(x, torch.full((8,), t, dtype=torch.float64), labels(8))
    expected = model.exact_score(x, t)
    torch.testing.assert_close(score_from_velocity(v, x, t, path), expected, rtol=1e-10, atol=1e-10)
    t_vec = torch.full((8,), t, dtype=torch.float64)
    torch.testing.assert_close(score_from_velocity(v, x, t_vec, path), expected)


def test_linear_drift_identity() -> None:
    v, x = noise(6, 1), noise(6, 2)
    for t in (0.04, 0.5, 1.0):
        torch.testing.assert_close(sde_drift(v, x, t, "linear"), (2 - t) * v + x)
        # generic form d = v − ½·2t·score
        cos_d = sde_drift(v, x, t, "cosine")
        torch.testing.assert_close(cos_d, v - t * score_from_velocity(v, x, t, "cosine"))


# --- ODE -----------------------------------------------------------------------------------------


def ode_error(steps: int, heun: bool) -> float:
    eps = noise(64)
    out = euler_sampler(GaussianVelocity(), eps, labels(64), num_steps=steps, heun=heun)
    assert out.dtype == torch.float64
    return (out - (MU + S * eps)).abs().max().item()


def test_ode_euler_and_heun_reach_exact_map() -> None:
    eps = noise(1024)  # 16k scalars
    out = euler_sampler(GaussianVelocity(), eps, labels(1024), num_steps=200)
    assert (out - (MU + S * eps)).abs().max().item() < 0.02
    assert abs(out.mean().item() - MU) < 0.02 and abs(out.std().item() - S) < 0.02
    e_euler, e_heun = ode_error(20, False), ode_error(20, True)
    assert e_heun < 0.01 and e_heun < e_euler / 10
    # orders: Euler first, Heun second (the Euler last step is locally second order)
    assert 1.6 < ode_error(10, False) / e_euler < 2.4
    assert ode_error(10, True) / e_heun > 3.0


def test_ode_grid_and_heun_calls() -> None:
    model = GaussianVelocity()
    euler_sampler(model, noise(3, dtype=torch.float32), labels(3), num_steps=4, heun=True)
    # Heun: (t_cur, t_next) per step, last step Euler only -> 2·4 − 1 evaluations
    assert [t for _, t in model.calls] == [1.0, 0.75, 0.75, 0.5, 0.5, 0.25, 0.25]


# --- SDE -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_sde_matches_target_distribution(path: str) -> None:
    gen = torch.Generator().manual_seed(3)
    out = euler_maruyama_sampler(
        GaussianVelocity(path), noise(1024, 4), labels(1024), num_steps=250, path=path,
        generator=gen,
    )  # fmt: skip
    assert abs(out.mean().item() - MU) < 0.02
    assert abs(out.std().item() - S) < 0.025
    assert not torch.allclose(out, MU + S * noise(1024, 4), atol=0.05)  # it is stochastic


def test_sde_grid_and_final_mean_step() -> None:
    model = GaussianVelocity()
    euler_maruyama_sampler(model, noise(2, dtype=torch.float32), labels(2), num_steps=5)
    seen = torch.tensor([t for _, t in model.calls])
    # NFE = num_steps: t = 1, 0.76, 0.52, 0.28 (stochastic) and 0.04 (final mean step)
    assert len(model.calls) == 5
    assert torch.equal(seen, torch.linspace(1.0, 0.04, 5, dtype=torch.float64).float())


def test_sde_single_step_by_hand() -> None:
    """num_steps=3: two stochastic steps 1 → 0.52 → 0.04, then the mean step 0.04 → 0."""
    model, eps = GaussianVelocity(), noise(5)
    out = euler_maruyama_sampler(
        model, eps, labels(5), num_steps=3, generator=torch.Generator().manual_seed(7)
    )
    gen, x = torch.Generator().manual_seed(7), eps.clone()

    def drift(x: Tensor, t: float) -> Tensor:
        v = model(x, torch.full((5,), t, dtype=torch.float64), labels(5))
        return (2 - t) * v + x

    for t_cur, t_next in [(1.0, 0.52), (0.52, 0.04)]:
        xi = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        dt = t_next - t_cur
        x = x + drift(x, t_cur) * dt + math.sqrt(2 * t_cur * abs(dt)) * xi
    x = x - 0.04 * drift(x, 0.04)
    torch.testing.assert_close(out, x, rtol=1e-12, atol=1e-12)


# --- CFG -----------------------------------------------------------------------------------------


def test_cfg_scale_one_is_single_conditional_pass() -> None:
    model, x = LabelToy(), noise(3, dtype=torch.float32)
    t, y = torch.full((3,), 0.5), torch.tensor([0, 2, 5])
    out = guided_velocity(model, x, t, y, cfg_scale=1.0, null_label=10)
    assert model.calls == [(3, 0.5)]
    assert torch.equal(out, model(x, t, y))


def test_cfg_combination_all_and_first_channels() -> None:
    model, x = LabelToy(), noise(3, dtype=torch.float64)
    t, y, w = torch.full((3,), 0.5, dtype=torch.float64), torch.tensor([0, 2, 5]), 1.8
    out = guided_velocity(model, x, t, y, cfg_scale=w, null_label=10)
    assert model.calls == [(6, 0.5)]
    ch = torch.arange(1, 5, dtype=torch.float64).view(1, -1, 1, 1)
    cond = x + (y + 1).view(-1, 1, 1, 1) * ch * 1.5
    uncond = x + 11 * ch * 1.5
    torch.testing.assert_close(out, uncond + w * (cond - uncond))
    quirk = guided_velocity(model, x, t, y, cfg_scale=w, null_label=10, guided_channels=3)
    torch.testing.assert_close(quirk[:, :3], out[:, :3])
    torch.testing.assert_close(quirk[:, 3], cond[:, 3])
    # batch-shaped kwargs (e.g. MeanFlow's r) are repeated for the [cond; uncond] batch
    r = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    with_r = guided_velocity(model, x, t, y, cfg_scale=w, null_label=10, r=r)
    torch.testing.assert_close(with_r, out + r.view(-1, 1, 1, 1))


def test_guidance_interval_euler_and_heun() -> None:
    model, n = LabelToy(), 2
    kw = dict(cfg_scale=2.0, guidance_low=0.25, guidance_high=0.75, null_label=10)
    euler_sampler(model, noise(n, dtype=torch.float32), labels(n), num_steps=8, **kw)
    # grid 1, 0.875, ..., 0.125: guided exactly where 0.25 <= t <= 0.75 (inclusive)
    assert model.calls == [
        (n, 1.0), (n, 0.875), (2 * n, 0.75), (2 * n, 0.625),
        (2 * n, 0.5), (2 * n, 0.375), (2 * n, 0.25), (n, 0.125),
    ]  # fmt: skip
    model.calls.clear()
    euler_sampler(model, noise(n, dtype=torch.float32), labels(n), num_steps=4, heun=True, **kw)
    # Heun's second evaluation follows the decision taken at t_cur
    assert model.calls == [
        (n, 1.0), (n, 0.75), (2 * n, 0.75), (2 * n, 0.5), (2 * n, 0.5), (2 * n, 0.25), (2 * n, 0.25)
    ]  # fmt: skip
    model.calls.clear()
    euler_sampler(model, noise(n, dtype=torch.float32), labels(n), num_steps=4, cfg_scale=1.0)
    assert {b for b, _ in model.calls} == {n}  # cfg 1: never doubled
    model.calls.clear()
    euler_sampler(model, noise(n, dtype=torch.float32), labels(n), num_steps=4, cfg_scale=0.5)
    assert {b for b, _ in model.calls} == {n}  # REPA guides only when cfg > 1
    with pytest.raises(ValueError):
        euler_sampler(model, noise(n), labels(n), num_steps=2, cfg_scale=1.5)


def test_guidance_interval_sde() -> None:
    model, n = LabelToy(), 2
    euler_maruyama_sampler(
        model, noise(n, dtype=torch.float32), labels(n), num_steps=5, cfg_scale=1.8,
        guidance_high=0.5, null_label=10, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert [b for b, _ in model.calls] == [n, n, n, 2 * n, 2 * n]  # t = 1, .76, .52 | .28, .04


# --- MeanFlow ------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2])
def test_meanflow_exact_average_velocity(steps: int) -> None:
    model, eps = ExactMeanFlow(), noise(16)
    out = meanflow_sampler(model, eps, labels(16), num_steps=steps)
    torch.testing.assert_close(out, MU + S * eps, rtol=1e-12, atol=1e-12)
    assert model.calls == ([(1.0, 0.0)] if steps == 1 else [(1.0, 0.5), (0.5, 0.0)])
    with pytest.raises(ValueError):
        meanflow_sampler(model, eps, labels(16), cfg_scale=1.5)


def test_meanflow_one_step_formula() -> None:
    model, eps = LabelToy(), noise(3, dtype=torch.float32)
    y = torch.tensor([0, 1, 2])
    out = meanflow_sampler(model, eps, y, num_steps=1)
    u = model(eps, torch.ones(3), y, r=torch.zeros(3)).double()
    torch.testing.assert_close(out, eps.double() - u)


# --- seeded convenience --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ode", "ode_heun", "sde"])
def test_sample_determinism_shapes_labels(name: str) -> None:
    kw = dict(latent_shape=SHAPE, num_classes=7, sampler=name, num_steps=6, cfg_scale=1.5)
    a, ya = sample(LabelToy(), 20, seed=0, **kw)
    b, yb = sample(LabelToy(), 20, seed=0, **kw)
    c, _ = sample(LabelToy(), 20, seed=1, **kw)
    assert a.shape == (20, *SHAPE) and a.dtype == torch.float32
    assert ya.shape == (20,) and ya.dtype == torch.long
    assert int(ya.min()) >= 0 and int(ya.max()) < 7 and len(set(ya.tolist())) > 1
    assert torch.equal(a, b) and torch.equal(ya, yb)
    assert not torch.equal(a, c)


def test_sample_given_labels_and_meanflow() -> None:
    y = torch.tensor([3, 1, 4])
    out, y_out = sample(
        ExactMeanFlow(), 3, latent_shape=SHAPE, num_classes=5, seed=2, sampler="meanflow",
        dtype=torch.float64, labels=y,
    )  # fmt: skip
    assert torch.equal(y_out, y)
    eps = torch.randn((3, *SHAPE), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(out, (MU + S * eps).float())
    with pytest.raises(ValueError):
        sample(ExactMeanFlow(), 3, latent_shape=SHAPE, num_classes=5, seed=0, sampler="dopri5")

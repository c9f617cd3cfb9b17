"""Flow-matching conventions and the REPA alignment term."""

import pytest
import torch
import torch.nn.functional as F

from diversedit.losses.flow import (
    FlowConfig,
    flow_matching_loss,
    interpolant,
    noisy_input,
    sample_time,
)
from diversedit.losses.repa import RepaConfig, repa_loss


def test_linear_path_is_repa_convention():
    x0, eps = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    x_t, v = noisy_input(x0, eps, t, "linear")
    torch.testing.assert_close(x_t[0], x0[0])  # t = 0 is data
    torch.testing.assert_close(x_t[3], eps[3])  # t = 1 is noise
    torch.testing.assert_close(x_t[1], 0.75 * x0[1] + 0.25 * eps[1])
    torch.testing.assert_close(v, eps - x0)


def test_cosine_path_derivatives_match_finite_differences():
    t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    h = 1e-6
    a, s, da, ds = interpolant(t, "cosine")
    a1, s1, _, _ = interpolant(t + h, "cosine")
    a0, s0, _, _ = interpolant(t - h, "cosine")
    torch.testing.assert_close(da, (a1 - a0) / (2 * h))
    torch.testing.assert_close(ds, (s1 - s0) / (2 * h))
    torch.testing.assert_close(a**2 + s**2, torch.ones_like(t))


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_lognormal_time_sampling(path):
    g = torch.Generator().manual_seed(0)
    t = sample_time(100_000, FlowConfig(path=path, weighting="lognormal"), generator=g)
    # sigma/alpha = exp(n), n ~ N(0, 1): the median time has sigma = alpha
    assert t.min() > 0 and t.max() < 1
    assert abs(t.median().item() - 0.5) < 0.01
    _, s, _, _ = interpolant(t.double(), path)
    a = interpolant(t.double(), path)[0]
    log_ratio = torch.log(s / a)
    assert abs(log_ratio.mean().item()) < 0.02 and abs(log_ratio.std().item() - 1) < 0.02


def test_uniform_time_sampling_and_config_validation():
    g = torch.Generator().manual_seed(0)
    t = sample_time(50_000, FlowConfig(), generator=g)
    assert abs(t.mean().item() - 0.5) < 0.01 and abs(t.var().item() - 1 / 12) < 0.002
    with pytest.raises(ValueError, match=r"flow\.path"):
        FlowConfig(path="edm")
    with pytest.raises(ValueError, match=r"flow\.weighting"):
        FlowConfig(weighting="logit")


def test_flow_matching_loss_is_per_sample_mean():
    pred = torch.zeros(2, 4, 2, 2)
    target = torch.ones(2, 4, 2, 2)
    target[1] *= 2
    torch.testing.assert_close(flow_matching_loss(pred, target), torch.tensor([1.0, 4.0]))


def test_repa_loss_values_and_fp32():
    z = torch.randn(3, 5, 8)
    # identical directions ⇒ −1, opposite ⇒ +1, scale-invariant
    torch.testing.assert_close(repa_loss([z], [2 * z]), -torch.ones(3))
    torch.testing.assert_close(repa_loss([z], [-z]), torch.ones(3))
    y = torch.randn(3, 5, 8)
    expect = -F.cosine_similarity(z, y, dim=-1).mean(dim=1)
    torch.testing.assert_close(repa_loss([z], [y]), expect)
    # several encoders: mean over encoders
    torch.testing.assert_close(repa_loss([z, z], [y, -z]), (expect + 1) / 2)
    # half-precision inputs are normalised in float32, even with huge values
    big = (torch.randn(3, 5, 8).clamp(-2, 2) * 3e4).half()  # norms overflow fp16
    out = repa_loss([big], [big])
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, -torch.ones(3), atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="one target per projector"):
        repa_loss([z, z], [y])
    with pytest.raises(ValueError, match="coeff"):
        RepaConfig(coeff=-1)

"""Add-on objectives: DispLoss, SRA and MeanFlow (JVP target, guidance, adaptive weighting)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diversedit.losses.dispersive import DispersiveConfig, dispersive_loss
from diversedit.losses.flow import noisy_input
from diversedit.losses.meanflow import (
    MeanFlowConfig,
    average_velocity_jvp,
    guided_velocity_target,
    meanflow_loss,
    meanflow_target,
    sample_t_r,
)
from diversedit.losses.sra import SRAConfig, sra_loss, teacher_features, teacher_time
from diversedit.models.sit import create_model

NUM_CLASSES = 10


def tiny_sit(seed: int = 0, **overrides) -> nn.Module:
    """A 4-block SiT on 8×8×4 latents with every parameter perturbed away from adaLN-Zero."""
    torch.manual_seed(seed)
    kw = dict(depth=4, hidden_size=32, num_heads=2, input_size=8, patch_size=2, fused_attn=False)
    model = create_model("custom", num_classes=NUM_CLASSES, **(kw | overrides))
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    return model


def batch(n: int = 3, seed: int = 1, dtype=torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 4, 8, 8, generator=g, dtype=dtype)
    noise = torch.randn(n, 4, 8, 8, generator=g, dtype=dtype)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return x0, noise, y


# ----------------------------------------------------------------------------- DispLoss


def test_dispersive_hand_value() -> None:
    # Three samples of shape (T=1, D=2): squared distances 1, 4, 5, divided by T·D = 2.
    z = torch.tensor([[[0.0, 0.0]], [[1.0, 0.0]], [[0.0, 2.0]]])
    tau = 0.5
    pairs = [0.5, 2.0, 2.5]
    expected = math.log((3 + 2 * sum(math.exp(-d / tau) for d in pairs)) / 9)
    out = dispersive_loss(z, tau)
    assert out.dim() == 0
    assert out.item() == pytest.approx(expected, rel=1e-6)
    # A shift of every sample leaves the distances and the loss unchanged.
    assert dispersive_loss(z + 100.0, tau).item() == pytest.approx(expected, rel=1e-5)


def test_dispersive_limits() -> None:
    same = torch.randn(1, 5, 3).expand(4, 5, 3)
    assert dispersive_loss(same, 1.0).abs().item() < 1e-6
    far = 100.0 * torch.eye(4).reshape(4, 2, 2)
    assert dispersive_loss(far, 1.0).item() == pytest.approx(math.log(1 / 4), abs=1e-6)


def test_dispersive_gradient_pushes_apart() -> None:
    torch.manual_seed(0)
    z = (0.3 * torch.randn(5, 4, 3)).requires_grad_()
    loss = dispersive_loss(z, 0.5)
    loss.backward()
    assert torch.isfinite(z.grad).all()
    z2 = (z - 0.5 * z.grad).detach()
    assert dispersive_loss(z2, 0.5).item() < loss.item()
    assert torch.pdist(z2.flatten(1)).min() > torch.pdist(z.detach().flatten(1)).min()


def test_dispersive_bf16_returns_float32() -> None:
    z = torch.randn(4, 3, 8)
    out = dispersive_loss(z.bfloat16(), 1.0)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(dispersive_loss(z.bfloat16().float(), 1.0).item(), rel=1e-5)


def test_dispersive_config_validation() -> None:
    assert DispersiveConfig().block == -1
    with pytest.raises(ValueError, match="tau"):
        DispersiveConfig(tau=0.0)
    with pytest.raises(ValueError, match="coeff"):
        DispersiveConfig(coeff=-1.0)


# ----------------------------------------------------------------------------- SRA


def test_teacher_time_bounds() -> None:
    t = torch.linspace(0, 1, 11).repeat(200)
    g = torch.Generator().manual_seed(0)
    tt = teacher_time(t, 0.2, generator=g)
    assert tt.shape == t.shape and tt.dtype == t.dtype
    assert (tt <= t).all() and (tt >= (t - 0.2).clamp(min=0) - 1e-7).all()
    assert (tt >= 0).all() and (tt <= 1).all()
    gap = (t - tt)[t >= 0.2]
    assert gap.min() < 0.01 and gap.max() > 0.19  # the gap covers (0, t_max)


def test_sra_cosine_values() -> None:
    cfg = SRAConfig()
    s = torch.randn(2, 5, 6)
    assert torch.allclose(sra_loss(s, s, cfg), torch.zeros(2), atol=1e-6)
    assert torch.allclose(sra_loss(s, -s, cfg), torch.full((2,), 2.0), atol=1e-6)
    teacher = torch.randn(2, 5, 6)
    scale = torch.rand(2, 5, 1) + 0.5
    assert torch.allclose(sra_loss(3.7 * s * scale, teacher, cfg), sra_loss(s, teacher, cfg))
    # Hand case: token 0 identical, token 1 orthogonal → mean of (0, 1).
    a = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    b = torch.tensor([[[2.0, 0.0], [0.0, 3.0]]])
    assert sra_loss(a, b, cfg).item() == pytest.approx(0.5, abs=1e-6)


def test_sra_smooth_l1_matches_torch() -> None:
    cfg = SRAConfig(loss="smooth_l1", smooth_l1_beta=0.05)
    s, t = 0.1 * torch.randn(3, 4, 5), 0.1 * torch.randn(3, 4, 5)
    ref = torch.stack([F.smooth_l1_loss(s[i], t[i], beta=0.05) for i in range(3)])
    assert torch.allclose(sra_loss(s, t, cfg), ref, atol=1e-7)
    with pytest.raises(ValueError, match="loss"):
        SRAConfig(loss="l2")


def test_sra_teacher_features_and_student_gradients() -> None:
    cfg = SRAConfig(student_depth=2, teacher_depth=3)
    model = tiny_sit(sra_student_depth=cfg.student_depth)
    teacher = copy.deepcopy(model).train()
    x0, noise, y = batch()
    t = torch.tensor([0.5, 0.3, 0.9])
    t_teacher = teacher_time(t, cfg.t_max, generator=torch.Generator().manual_seed(0))
    drop = torch.tensor([0, 1, 0])
    feats = teacher_features(teacher, x0, noise, t_teacher, y, drop, cfg)
    assert teacher.training
    # Manual reference: block 3 of the teacher at t', labels with sample 1 set to the null class.
    x_tt = (1 - t_teacher).view(-1, 1, 1, 1) * x0 + t_teacher.view(-1, 1, 1, 1) * noise
    y_null = torch.tensor([y[0].item(), NUM_CLASSES, y[2].item()])
    with torch.no_grad():
        teacher.y_embedder.dropout_prob = 0.0  # no random label dropout in the reference
        ref = teacher(x_tt, t_teacher, y_null, return_aux=True).features[2]
    assert torch.allclose(feats, ref, atol=1e-6)
    assert not feats.requires_grad
    with torch.no_grad():  # a different time gives different features: the time is used
        other = teacher(x_tt, t, y_null, return_aux=True).features[2]
    assert not torch.allclose(feats, other, atol=1e-4)

    x_t, _ = noisy_input(x0, noise, t)
    out = model(x_t, t, y, force_drop_ids=drop, return_aux=True)
    loss = sra_loss(out.sra, feats, cfg).mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.sra_head.parameters())
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.blocks[3].attn.qkv.weight.grad is None  # past the student block: no SRA gradient
    assert all(p.grad is None for p in teacher.parameters())


# ----------------------------------------------------------------------------- MeanFlow


def test_sample_t_r_statistics() -> None:
    cfg = MeanFlowConfig()
    n = 4000
    t, r = sample_t_r(n, cfg, generator=torch.Generator().manual_seed(0))
    assert t.shape == r.shape == (n,)
    assert (t >= r).all() and (t > 0).all() and (t < 1).all()
    equal = t == r
    assert equal.sum().item() == 3000
    # logit(t) is the max of two N(mu, sigma) draws: mean mu + sigma/sqrt(pi); the min for r.
    shift = cfg.time_sigma / math.sqrt(math.pi)
    assert torch.logit(t.double()).mean().item() == pytest.approx(cfg.time_mu + shift, abs=0.05)
    r_free = torch.logit(r[~equal].double()).mean().item()
    assert r_free == pytest.approx(cfg.time_mu - shift, abs=0.1)
    t0, r0 = sample_t_r(7, MeanFlowConfig(r_equals_t_fraction=0.0))
    assert (t0 > r0).all()
    t1, r1 = sample_t_r(7, MeanFlowConfig(r_equals_t_fraction=1.0))
    assert torch.equal(t1, r1)


def test_jvp_matches_finite_differences() -> None:
    model = tiny_sit(interval_embedding=True).double()
    x0, noise, y = batch(dtype=torch.float64)
    t = torch.tensor([0.7, 0.4, 0.9], dtype=torch.float64)
    r = torch.tensor([0.2, 0.4, 0.1], dtype=torch.float64)
    drop = torch.tensor([0, 0, 1])
    z_t, _ = noisy_input(x0, noise, t)
    v_g = torch.randn(z_t.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    u, du_dt, feats = average_velocity_jvp(model, z_t, r, t, y, v_g, drop)
    assert len(feats) == 4 and feats[0].shape == (3, 16, 32)

    def u_at(z: Tensor, tt: Tensor) -> Tensor:
        with torch.no_grad():
            return model(z, tt, y, r=r, force_drop_ids=drop)

    h = 1e-3
    fd = (u_at(z_t + h * v_g, t + h) - u_at(z_t - h * v_g, t - h)) / (2 * h)
    assert du_dt.abs().max() > 1e-2  # non-trivial derivative
    # The time embedding runs in float32; the FD error here is ~2e-6.
    torch.testing.assert_close(du_dt, fd, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(u, u_at(z_t, t), rtol=1e-12, atol=1e-12)
    target = meanflow_target(v_g, du_dt, t, r)
    torch.testing.assert_close(target, v_g - (t - r).view(-1, 1, 1, 1) * fd, rtol=1e-4, atol=2e-5)
    # r = t: the target is the guided velocity itself.
    assert torch.equal(meanflow_target(v_g, du_dt, t, t), v_g)


def test_fused_attention_under_jvp_matches_explicit() -> None:
    explicit = tiny_sit(interval_embedding=True)
    fused = tiny_sit(interval_embedding=True, fused_attn=True)
    fused.load_state_dict(explicit.state_dict())
    x0, noise, y = batch()
    t, r, drop = torch.tensor([0.7, 0.4, 0.9]), torch.tensor([0.2, 0.4, 0.1]), torch.zeros(3)
    z_t, v = noisy_input(x0, noise, t)
    a = average_velocity_jvp(explicit, z_t, r, t, y, v, drop)
    b = average_velocity_jvp(fused, z_t, r, t, y, v, drop)
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a[1], b[1], rtol=1e-4, atol=1e-5)


class LabelScale(nn.Module):
    """u(x, r, t | y) = (y' + 1)·x + (t − r), y' = null class where dropped; counts rows seen."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[int] = []

    def forward(self, x, t, y, r=None, *, force_drop_ids=None, return_aux=False):
        self.rows.append(x.shape[0])
        label = torch.where(force_drop_ids == 1, NUM_CLASSES, y)
        return (label + 1).to(x.dtype).view(-1, 1, 1, 1) * x + (t - r).view(-1, 1, 1, 1)


def test_guided_velocity_target_algebra() -> None:
    cfg = MeanFlowConfig(omega=0.2, kappa=0.92, guidance_t_end=0.75)
    model = LabelScale()
    n = 4
    z = torch.randn(n, 2, 3, 3)
    v = torch.randn(n, 2, 3, 3)
    y = torch.tensor([0, 3, 5, 7])
    t = torch.tensor([0.3, 0.75, 0.9, 0.5])  # sample 2 outside [0, 0.75]; 0.75 is inside
    drop = torch.tensor([0, 0, 0, 1])  # sample 3 dropped
    v_g = guided_velocity_target(model, z, t, y, v, drop, cfg)
    assert model.rows == [2 * n]  # cond and uncond share one doubled forward
    expected = v.clone()
    for i in (0, 1):
        cond, uncond = (y[i] + 1) * z[i], (NUM_CLASSES + 1) * z[i]
        expected[i] = 0.2 * v[i] + 0.92 * cond + (1 - 0.2 - 0.92) * uncond
    torch.testing.assert_close(v_g, expected)
    assert torch.equal(v_g[2], v[2]) and torch.equal(v_g[3], v[3])

    # kappa = 0: only the unconditional forward, v_g = u_uncond + omega·(v − u_uncond).
    model.rows.clear()
    v_g = guided_velocity_target(model, z, t, y, v, drop, MeanFlowConfig(omega=3.0, kappa=0.0))
    assert model.rows == [n]
    uncond = (NUM_CLASSES + 1) * z[:3]
    torch.testing.assert_close(v_g[:3], uncond + 3.0 * (v[:3] - uncond))
    # omega = 1, kappa = 0: no guidance, no forward.
    model.rows.clear()
    v_g = guided_velocity_target(model, z, t, y, v, drop, MeanFlowConfig(omega=1.0, kappa=0.0))
    assert model.rows == [] and torch.equal(v_g, v)


@pytest.mark.parametrize("p", [1.0, 0.5])
def test_adaptive_weighting_value(p: float) -> None:
    cfg = MeanFlowConfig(omega=1.0, kappa=0.0, norm_p=p, norm_eps=1e-3)
    model = tiny_sit(interval_embedding=True)
    x0, noise, y = batch()
    t = torch.tensor([0.7, 0.4, 0.9])
    drop = torch.tensor([0, 1, 0])
    loss, _ = meanflow_loss(model, x0, y, cfg, noise=noise, t=t, r=t, drop_ids=drop)
    with torch.no_grad():  # r = t, no guidance: the target is v = noise − x0
        z_t = (1 - t).view(-1, 1, 1, 1) * x0 + t.view(-1, 1, 1, 1) * noise
        u = model(z_t, t, y, r=t, force_drop_ids=drop)
        err = (u - (noise - x0)).square().flatten(1).sum(1)
    torch.testing.assert_close(loss.detach(), err / (err + 1e-3) ** p, rtol=1e-5, atol=1e-7)
    assert loss.shape == (3,)


def test_meanflow_backward_matches_reference() -> None:
    cfg = MeanFlowConfig(omega=0.5, kappa=0.3)
    model = tiny_sit(interval_embedding=True)
    x0, noise, y = batch()
    t, r = torch.tensor([0.7, 0.4, 0.9]), torch.tensor([0.2, 0.4, 0.1])
    drop = torch.tensor([0, 0, 1])
    w = torch.randn(3, 16, 32, generator=torch.Generator().manual_seed(5))
    loss, feats = meanflow_loss(model, x0, y, cfg, noise=noise, t=t, r=r, drop_ids=drop)
    (loss.mean() + (feats[1] * w).sum()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert model.h_embedder.mlp[0].weight.grad.abs().sum() > 0
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0

    # Reference: plain forward with the (detached) JVP target; the features of block 2.
    model.zero_grad()
    z_t, v = noisy_input(x0, noise, t)
    v_g = guided_velocity_target(model, z_t, t, y, v, drop, cfg)
    with torch.no_grad():
        _, du_dt, _ = average_velocity_jvp(model, z_t, r, t, y, v_g, drop)
    target = meanflow_target(v_g, du_dt, t, r)
    out = model(z_t, t, y, r=r, force_drop_ids=drop, return_aux=True)
    err = (out.output - target).square().flatten(1).sum(1)
    ref = err / (err.detach() + cfg.norm_eps)
    torch.testing.assert_close(loss.detach(), ref.detach())
    (ref.mean() + (out.features[1] * w).sum()).backward()
    ref_grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_meanflow_loss_random_draws_are_reproducible() -> None:
    model = tiny_sit(interval_embedding=True)
    x0, _, y = batch(n=4)
    a, _ = meanflow_loss(model, x0, y, MeanFlowConfig(), generator=torch.Generator().manual_seed(7))
    b, _ = meanflow_loss(model, x0, y, MeanFlowConfig(), generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and torch.isfinite(a).all() and (a > 0).all()
    with pytest.raises(ValueError, match="t and r"):
        meanflow_loss(model, x0, y, MeanFlowConfig(), t=torch.rand(4))
    with pytest.raises(ValueError, match="r_equals_t_fraction"):
        MeanFlowConfig(r_equals_t_fraction=1.5)

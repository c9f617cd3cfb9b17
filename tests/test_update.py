"""The fused parameter updates (compiled, Triton, eager) equal the library's clip → AdamW → EMA
sequence."""

import pytest
import torch
import torch._dynamo

from diversedit.update import FusedUpdate

SHAPES = [(32, 16), (37,), (8, 5), (13,), (3, 4)]  # the last one never gets a gradient


def params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def small_chunks(monkeypatch) -> None:
    """Chunks of 16 elements in vectors of 8: the test tensors span several programs, with
    partial tails (Triton's interpreter runs each program alone)."""
    import diversedit.update_triton as kernels

    monkeypatch.setattr(kernels, "CHUNK", 16)
    monkeypatch.setattr(kernels, "BLOCK", 8)


triton = pytest.mark.triton_interpreted


@pytest.mark.parametrize(
    ("impl", "max_norm", "weight_decay"),
    [
        ("compiled", 5.0, 0.1),
        ("eager", 5.0, 0.0),
        ("eager", 0.0, 0.1),
        pytest.param("triton", 5.0, 0.1, marks=triton),
        pytest.param("triton", 0.0, 0.0, marks=triton),
    ],
)
def test_update_equals_clip_adamw_ema(impl, max_norm, weight_decay, monkeypatch):
    small_chunks(monkeypatch)
    ref, got = params(), params()
    ref_ema, got_ema = ([p.detach().clone() + 1 for p in ps] for ps in (ref, got))
    kw = dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=weight_decay)
    ref_opt = torch.optim.AdamW(ref, foreach=False, **kw)
    got_opt = torch.optim.AdamW(got, **kw)
    update = FusedUpdate(got_opt, got_ema, max_norm=max_norm, ema_decay=0.9, impl=impl)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    g = torch.Generator().manual_seed(1)
    kept = []  # every step's gradients at new addresses (a stale address table reads old ones)
    for step in range(4):
        scale = 10.0 if step % 2 else 0.1  # clipping on odd steps only
        for a, b in zip(ref[:-1], got[:-1], strict=True):
            a.grad = torch.randn(a.shape, generator=g) * scale
            b.grad = a.grad.clone()
            kept.append(b.grad)
        want = torch.zeros(())
        if max_norm:
            want = torch.nn.utils.clip_grad_norm_(ref, max_norm)
        ref_opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ref_ema, ref, 0.1)
        grads = [p.grad.clone() for p in got[:-1]]
        norm = update()
        assert norm.item() == pytest.approx(want.item(), rel=1e-6)
        for p, before in zip(
            got[:-1], grads, strict=True
        ):  # the gradients are read, not clipped in place
            torch.testing.assert_close(p.grad, before, rtol=0, atol=0)
        ref_opt.zero_grad()
        got_opt.zero_grad()
        for a, b in zip(ref + ref_ema, got + got_ema, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    assert got[-1] not in got_opt.state  # no gradient, no state: as AdamW
    torch.testing.assert_close(got_ema[-1], ref_ema[-1])  # but its EMA moves like the others'
    for p, q in zip(ref[:-1], got[:-1], strict=True):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(got_opt.state[q][key], ref_opt.state[p][key])
    if impl == "compiled":  # one graph for every step: the step counts are tensors
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1


def test_update_refuses_what_it_does_not_implement():
    ps = params()
    ema = [p.detach().clone() for p in ps]
    for opt, match in [
        (torch.optim.Adam(ps), "torch.optim.AdamW"),
        (torch.optim.AdamW([{"params": ps[:2]}, {"params": ps[2:]}]), "one parameter group"),
        (torch.optim.AdamW(ps, amsgrad=True), "amsgrad"),
    ]:
        with pytest.raises(ValueError, match=match):
            FusedUpdate(opt, ema, max_norm=1.0, ema_decay=0.9)
    with pytest.raises(ValueError, match="4 EMA tensors for 5 parameters"):
        FusedUpdate(torch.optim.AdamW(ps), ema[:4], max_norm=1.0, ema_decay=0.9)
    with pytest.raises(ValueError, match="impl 'inductor' is not one of"):
        FusedUpdate(torch.optim.AdamW(ps), ema, max_norm=1.0, ema_decay=0.9, impl="inductor")
    with pytest.raises(ValueError, match="no parameter has a gradient"):
        FusedUpdate(torch.optim.AdamW(ps), ema, max_norm=1.0, ema_decay=0.9, impl="eager")()


def test_triton_update_needs_a_device_that_runs_it(monkeypatch):
    ps = params()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="Triton kernels need a CUDA device, not cpu"):
        FusedUpdate(torch.optim.AdamW(ps), ps, max_norm=1.0, ema_decay=0.9, impl="triton")


@triton
def test_triton_update_refuses_tensors_it_cannot_address():
    """The kernels index float32 memory linearly: a parameter of another dtype or a strided
    gradient is refused with what was found, not updated wrongly."""
    for dtype, strided in ((torch.bfloat16, False), (torch.float32, True)):
        ps = [torch.nn.Parameter(p.detach().to(dtype)) for p in params()[:2]]
        opt = torch.optim.AdamW(ps)
        update = FusedUpdate(opt, [p.detach().clone() for p in ps], max_norm=1.0,
                             ema_decay=0.9, impl="triton")  # fmt: skip
        for p in ps:
            p.grad = torch.ones(p.shape[::-1], dtype=dtype).t() if strided else torch.ones_like(p)
        before = [p.detach().clone() for p in ps]
        with pytest.raises(ValueError, match="contiguous float32 tensors on cpu, got"):
            update()
        for p, b in zip(ps, before, strict=True):
            torch.testing.assert_close(p.detach(), b, rtol=0, atol=0)

"""The compiled parameter update equals the library's clip → AdamW → EMA sequence."""

import pytest
import torch
import torch._dynamo

from diversedit.update import CompiledUpdate

SHAPES = [(32, 16), (32,), (8, 32), (8,), (3, 4)]  # the last one never gets a gradient


def params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


@pytest.mark.parametrize(
    ("compiled", "max_norm", "weight_decay"),
    [(True, 5.0, 0.1), (False, 5.0, 0.0), (False, 0.0, 0.1)],
)
def test_update_equals_clip_adamw_ema(compiled, max_norm, weight_decay):
    ref, got = params(), params()
    ref_ema, got_ema = ([p.detach().clone() + 1 for p in ps] for ps in (ref, got))
    kw = dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=weight_decay)
    ref_opt = torch.optim.AdamW(ref, foreach=False, **kw)
    got_opt = torch.optim.AdamW(got, **kw)
    update = CompiledUpdate(got_opt, got_ema, max_norm=max_norm, ema_decay=0.9, compiled=compiled)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        scale = 10.0 if step % 2 else 0.1  # clipping on odd steps only
        for a, b in zip(ref[:-1], got[:-1], strict=True):
            a.grad = torch.randn(a.shape, generator=g) * scale
            b.grad = a.grad.clone()
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
    if compiled:  # one graph for every step: the step counts are tensors
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
            CompiledUpdate(opt, ema, max_norm=1.0, ema_decay=0.9)
    with pytest.raises(ValueError, match="4 EMA tensors for 5 parameters"):
        CompiledUpdate(torch.optim.AdamW(ps), ema[:4], max_norm=1.0, ema_decay=0.9)
    with pytest.raises(ValueError, match="no parameter has a gradient"):
        CompiledUpdate(torch.optim.AdamW(ps), ema, max_norm=1.0, ema_decay=0.9, compiled=False)()

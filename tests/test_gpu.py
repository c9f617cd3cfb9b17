"""GPU tier (skipped without CUDA): bf16/SDPA kernels, torch.compile, a sync-free training step."""

import pytest
import torch

from diversedit.losses.diversity import DiversityConfig
from diversedit.losses.objective import ObjectiveConfig, compute_loss
from diversedit.losses.repa import RepaConfig
from diversedit.models import create_model
from diversedit.update import FusedUpdate

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
KW = dict(depth=8, hidden_size=256, num_heads=4, input_size=16, num_classes=10, long_skip=True)


def perturbed(**kw):
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = create_model("custom", **(KW | kw))
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    return m


def inputs(n=8):
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(n, 4, 16, 16, device="cuda", generator=g)
    t = torch.rand(n, device="cuda", generator=g)
    return x, t, torch.randint(0, 10, (n,), device="cuda", generator=g)


def test_bf16_fused_attention_close_to_fp32_math():
    fused, plain = perturbed().eval(), perturbed(fused_attn=False).eval()
    x, t, y = inputs()
    with torch.no_grad():
        ref = plain(x, t, y)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = fused(x, t, y)
    assert torch.isfinite(got).all()
    err = (got.float() - ref).norm() / ref.norm()
    assert err < 2e-2, err


@pytest.mark.parametrize("scope", ["model", "blocks"])
def test_compiled_model_matches_eager(scope):
    m = perturbed().eval()
    x, t, y = inputs()
    with torch.no_grad():
        ref = m(x, t, y)
        got = torch.compile(m)(x, t, y) if scope == "model" else m.compile_blocks()(x, t, y)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-3)


DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # blocks 0-3, 4-7, 8-11


def _check_loss_path_against_eager(
    paths: tuple[str, ...], width: int, cfg: DiversityConfig, no_sync: bool, offset: int = 0
):
    """``diversity_loss`` with each flag of ``paths`` on against the eager fused Function, on
    fp32, bf16 and fp16 blocks with a NaN and an inf block: values, gradients (zero on those
    blocks); with ``no_sync``, the second call must not synchronise with the host; ``offset`` 1
    starts each block one element into its storage (not 16-byte aligned)."""
    from diversedit.losses.diversity import diversity_loss

    torch.manual_seed(0)
    feats = [torch.randn(4, 64, width, device="cuda", dtype=DTYPES[k // 4]) for k in range(12)]
    feats[3][1, 2, 3] = float("nan")
    feats[8][0, 0, 0] = float("inf")
    runs = []
    for on in (False, True):
        leaves = [
            f.new_empty(f.numel() + offset)[offset:].view_as(f).copy_(f).requires_grad_(True)
            for f in feats
        ]
        assert all(leaf.data_ptr() % 16 for leaf in leaves) == bool(offset)
        if no_sync:
            diversity_loss(leaves, cfg, **dict.fromkeys(paths, on))  # warm-up (compilation)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error" if on else "default")
        try:
            out = diversity_loss(leaves, cfg, **dict.fromkeys(paths, on))
            out["loss"].backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        runs.append((out, [leaf.grad for leaf in leaves]))
    (eager, g_eager), (got, g_got) = runs
    assert eager["blocks_skipped"] == 2 and eager["pairs_used"] == 10
    for key in eager:
        torch.testing.assert_close(got[key], eager[key], atol=1e-5, rtol=1e-4)
    for a, b in zip(g_got, g_eager, strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=1e-4, rtol=2e-2)
    assert not g_got[3].any() and not g_got[8].any()


def test_compiled_diversity_loss_matches_eager_on_cuda():
    """The Inductor-fused statistics (the CUDA default) against the eager fused Function."""
    cfg = DiversityConfig(pair_encoder_depth=4)
    _check_loss_path_against_eager(("compiled",), 96, cfg, False)


def test_triton_diversity_statistics_match_eager_on_cuda():
    """The experimental Triton kernels on the GPU: same values and gradients as the eager path
    (fp32, bf16 and fp16 blocks, NaN/inf blocks), and no host synchronisation."""
    cfg = DiversityConfig(pair_encoder_depth=4, adaptive=False)
    _check_loss_path_against_eager(("triton",), 200, cfg, True)
    _check_loss_path_against_eager(("triton",), 200, cfg, True, offset=1)  # no alignment hints
    _check_loss_path_against_eager(("triton", "compiled"), 200, cfg, True)  # inside the graph


@pytest.mark.parametrize(("impl", "offset"), [("compiled", 0), ("triton", 0), ("triton", 1)])
def test_fused_update_matches_fused_adamw_on_cuda(impl, offset):
    """The fused update (clip, AdamW, EMA in one graph, or as two Triton kernels) against
    clip_grad_norm_, the fused AdamW and the EMA lerp, with clipping active and weight decay on,
    a parameter without gradient, gradients at new addresses every step, and no host
    synchronisation after the first call. A few tensors: compiling takes about a second per
    tensor; the largest spans several Triton chunks, others end in partial blocks; ``offset``
    1 starts one parameter 4 bytes into its storage (the kernels' unaligned variant)."""
    shapes = [(1024, 1000), (1000,), (7, 13), (3,), (5,)]  # the last gets no gradient
    g = torch.Generator("cuda").manual_seed(0)
    ref = [torch.nn.Parameter(torch.randn(s, device="cuda", generator=g)) for s in shapes]
    got = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    if offset:  # a view one element into a larger tensor
        view = torch.empty(1000 + offset, device="cuda")[offset:].copy_(ref[1].detach())
        got[1] = torch.nn.Parameter(view)
        assert got[1].data_ptr() % 16
    ref_ema, got_ema = ([p.detach().clone() for p in ps] for ps in (ref, got))
    kw = dict(lr=1e-3, weight_decay=0.05, fused=True)
    ref_opt, got_opt = torch.optim.AdamW(ref, **kw), torch.optim.AdamW(got, **kw)
    update = FusedUpdate(got_opt, got_ema, max_norm=0.5, ema_decay=0.99, impl=impl)
    for step in range(4):
        for a, b in zip(ref[:-1], got[:-1], strict=True):
            a.grad = torch.randn(a.shape, device="cuda", generator=g) * (1e-3 if step % 2 else 1)
            b.grad = a.grad.clone()
        want = torch.nn.utils.clip_grad_norm_(ref, 0.5, foreach=True)
        ref_opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ref_ema, ref, 0.01)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if step else "default")  # step 0 builds
        try:
            norm = update()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.testing.assert_close(norm, want, rtol=1e-5, atol=0)
        ref_opt.zero_grad()
        got_opt.zero_grad()
    for a, b in zip(ref + ref_ema, got + got_ema, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("compiled", "triton"),
    [(False, False), (True, False), (True, True)],
    ids=["eager", "compiled", "compiled-triton"],
)
def test_training_step_has_no_host_sync(compiled, triton):
    m = perturbed(z_dims=(64,), encoder_depth=3).train()
    cfg = ObjectiveConfig(
        repa=RepaConfig(encoder_depth=3), diversity=DiversityConfig(pair_encoder_depth=3)
    )
    x, _, y = inputs()
    targets = [torch.randn(8, 64, 64, device="cuda")]
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)
    ema = [p.detach().clone() for p in m.parameters()]
    net = torch.compile(m) if compiled else m

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, terms = compute_loss(
                net, x, y, cfg, encoder_targets=targets, compiled=compiled, triton=triton
            )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0, foreach=True)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, list(m.parameters()), 1e-4)
        opt.zero_grad(set_to_none=True)
        return terms

    step()  # warm-up: caches, lazy initialisation, compilation
    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        terms = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # depth 8, e = 3: the release formula starts at row 6 and finds the single pair (6, 7)
    assert torch.isfinite(terms["loss"]) and terms["div_pairs_used"] == 1


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_digits_training_sampling_and_evaluation_on_cuda(tmp_path, precision):
    """The trainer's CUDA defaults (compiled model and loss; in bf16 on GPUs of capability 8.0+
    the Triton diversity statistics and update, in fp16 fused AdamW with the grad scaler; TF32),
    then sampling (compiled by default on CUDA) and metrics."""
    import json
    from pathlib import Path

    from accelerate.state import AcceleratorState

    from diversedit.config import load_config
    from diversedit.data.digits import digits_images
    from diversedit.generate import SamplingConfig, sample_run
    from diversedit.metrics.evaluate import evaluate, save_adm_npz
    from diversedit.train import Trainer
    from diversedit.triton_support import triton_default_on

    root = Path(__file__).resolve().parents[1]
    overrides = {
        "results_dir": str(tmp_path), "precision.mixed_precision": precision,
        "model.long_skip": True, "objective.diversity.pairs": "star", "optim.max_steps": 4,
        "checkpoint.every": 2, "logging.log_every": 2, "logging.tensorboard": False,
    }  # fmt: skip
    AcceleratorState._reset_state(True)
    trainer = Trainer(load_config(root / "params/train/digits_sit.yaml", overrides))
    assert trainer.accelerator.device.type == "cuda" and trainer.compiled
    fast = triton_default_on(trainer.accelerator.device) and precision == "bf16"
    assert trainer.diversity_triton is fast
    assert trainer.update_impl == ("triton" if fast else "library")
    run = trainer.fit()
    record = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 4 and record["loss"] == record["loss"]  # finite, not NaN
    samples = sample_run(run, SamplingConfig(num_samples=32, batch_size=16, num_steps=10))
    assert json.loads((samples.parent / "sampling.json").read_text())["compiled"] is True
    ref = save_adm_npz(tmp_path / "ref.npz", digits_images("all", 16)[0])
    metrics = evaluate(ref, samples, extractor="digits-cnn", device="cuda")["metrics"]
    assert metrics["N_samples"] == 32 and metrics["FD_digits"] > 0

"""The benchmark's other parts: the diversity loss alone, the parameter update, the SDE sampler
and Inception feature extraction."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..generate import SamplingConfig, model_autocast, sampling_network
from ..losses.diversity import DiversityConfig, diversity_loss
from ..numerics import allow_tf32
from ..overhead import median_ci
from ..sampling import euler_maruyama_sampler
from .profiling import profile_step
from .steps import build, make_update, model_config_for
from .timing import WARMUP, time_calls

SAMPLER_TIMED_STEPS, SAMPLER_REPEATS, SAMPLER_BATCH = 10, 3, 64
# (precision, tf32) timed on CUDA: `diversedit sample`'s default, bf16 autocast, IEEE float32
SAMPLER_NUMERICS = [("fp32", True), ("bf16", True), ("fp32", False)]
LOSS_IMPLS = ("fused", "autograd", "compiled", "triton", "triton_compiled")  # triton*: CUDA


def bench_diversity_loss(
    size: str, impl: str, *, device: str = "cpu", batch: int = 32, dtype: str = "bf16",
    steps: int = 10, profile: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Forward + backward of the diversity loss alone on random block features of a model size.

    ``fused``: the eager default (hand-written backward); ``autograd``: the same statistics in
    plain ops (the compile input, run eagerly); ``compiled``: ``diversity_loss(compiled=True)``;
    ``triton``: ``diversity_loss(triton=True)`` (the Triton kernels, CUDA), and
    ``triton_compiled`` with ``compiled=True`` too (the kernels inside the compiled loss).
    ``profile`` adds its top operators or kernels (:func:`profile_step`).
    Features alternate the model's stream dtypes: float32 before the long-skip fusion, ``dtype``
    after it, as under autocast.
    """
    from ..losses import diversity as div

    torch.manual_seed(0)
    cfg = model_config_for(size)
    n, d = cfg.depth, cfg.hidden_size
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype, torch.float32)
    feats = [
        torch.randn(batch, cfg.num_patches, d, device=device,
                    dtype=torch.float32 if k < n // 2 else low, requires_grad=True)
        for k in range(n)
    ]  # fmt: skip
    dcfg = DiversityConfig()
    plan = div._plan(n, dcfg, torch.device(device))

    def run() -> None:
        if impl == "autograd":
            out = div._terms(tuple(feats), plan, dcfg, div._autograd_stats)
        else:
            compiled, triton = impl.endswith("compiled"), impl.startswith("triton")
            out = diversity_loss(feats, dcfg, compiled=compiled, triton=triton)
        torch.autograd.grad(out["loss"], feats)

    median = statistics.median(time_calls(run, device, WARMUP["loss"], steps))
    return {
        "size": size, "impl": impl, "device": device, "batch": batch, "blocks": n,
        "tokens": cfg.num_patches, "hidden": d, "low_dtype": dtype, "fwd_bwd_ms": 1e3 * median,
        "feature_mib": sum(f.numel() * f.element_size() for f in feats) / 2**20,
        "profile": profile_step(run, device, top=25) if profile else None,
    }  # fmt: skip


def bench_optimizer(
    size: str, *, device: str = "cpu", steps: int = 10, update: str = "library"
) -> dict[str, Any]:
    """The parameter-update part of a training step at a model size (ms): the whole update as
    the trainer runs it (``update_ms``; with a fused ``update`` also ``{update}_update_ms`` and
    the seconds of its first call, compilation included), then piece by piece: fused AdamW (on
    CUDA), gradient clipping, EMA, and each pass alone; ``flat_*`` times the same bytes as one
    contiguous tensor (a flat buffer's headroom). One update's state is held at a time, so XL/2
    fits in about 16 GiB."""
    torch.manual_seed(0)
    model, _ = build(size, "sit", device)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    grads = [p.grad for p in params]
    count = sum(p.numel() for p in params)

    def ms(fn: Callable[[], Any]) -> float:
        return 1e3 * statistics.median(time_calls(fn, device, WARMUP["optimizer"], steps))

    out = {
        "size": size,
        "device": device,
        "update": update,
        "params": count,
        "tensors": len(params),
    }
    out["update_ms"] = ms(make_update(model, device, "library")[1])  # its state freed on return
    if update != "library":
        fused = make_update(model, device, update)[1]
        (first,) = time_calls(fused, device, 0, 1)  # compiled: ~1 s per tensor on a 2-core CPU
        out[f"{update}_update_first_call_s"] = first
        out[f"{update}_update_ms"] = ms(fused)
        del fused
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.startswith("cuda"))
    opt.step()  # optimiser state
    out |= {
        "adamw_step_ms": ms(opt.step),
        "clip_grad_norm_ms": ms(lambda: torch.nn.utils.clip_grad_norm_(params, 1e9, foreach=True)),
        "ema_lerp_ms": ms(lambda: torch._foreach_lerp_(ema, params, 1e-4)),
        "grad_norm_ms": ms(lambda: torch._foreach_norm(grads)),
        "grad_scale_ms": ms(lambda: torch._foreach_mul_(grads, 1.0)),
    }  # fmt: skip
    del opt
    ema.clear()
    flat, flat_ema = torch.randn(count, device=device), torch.randn(count, device=device)
    return out | {
        "flat_norm_ms": ms(lambda: torch.linalg.vector_norm(flat)),
        "flat_scale_ms": ms(lambda: flat.mul_(1.0)),
        "flat_ema_lerp_ms": ms(lambda: flat_ema.lerp_(flat, 1e-4)),
    }


def bench_sampler(
    size: str,
    *,
    device: str = "cpu",
    batch: int = SAMPLER_BATCH,
    cfg_scale: float = 1.0,
    precision: str = "fp32",
    tf32: bool = SamplingConfig.tf32,
    steps: int = SAMPLER_TIMED_STEPS,
    compiled: bool = False,
    rounds: int = 10,
) -> dict[str, Any]:
    """SDE (Euler–Maruyama) throughput, timed on ``steps`` steps and scaled to 250 (the sampler's
    steps all cost the same: one network call, two with CFG). The model runs as ``diversedit
    sample`` runs it with the same ``precision`` (autocast) and ``tf32`` (CUDA float32 math).

    ``compiled``: the record is for the network ``diversedit sample --compile`` makes (compiled
    in the untimed warm-up), timed round-robin with the eager one over ``rounds`` rounds; it
    also holds both networks' times and the per-round speed-up with its 95% interval."""
    torch.manual_seed(0)
    model, _ = build(size, "sit", device)
    model.eval()
    cfg = model.config
    z = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, device=device)
    y = torch.randint(0, cfg.num_classes, (batch,), device=device)

    def runner(network: Callable[..., Any]) -> Callable[[], None]:
        def run() -> None:
            with allow_tf32(tf32), model_autocast(precision, torch.device(device).type):
                euler_maruyama_sampler(
                    network, z, y, num_steps=steps, cfg_scale=cfg_scale, null_label=cfg.num_classes
                )

        return run

    runs = {"eager": runner(model)}
    if compiled:
        runs["compiled"] = runner(sampling_network(model, compile_model=True))
    for run in runs.values():
        time_calls(run, device, WARMUP["sampler"], 0)
    repeats = rounds if compiled else SAMPLER_REPEATS
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name] += time_calls(run, device, 0, 1)
    per_step = statistics.median(times["compiled" if compiled else "eager"]) / steps
    record = {
        "size": size, "device": device, "batch": batch, "cfg_scale": cfg_scale,
        "precision": precision, "tf32": tf32 if device.startswith("cuda") else None,
        "compiled": compiled, "timed_steps": steps, "warmup": WARMUP["sampler"],
        "repeats": repeats,
        "sde_step_ms": 1e3 * per_step, "images_per_s_250_steps": batch / (250 * per_step),
        "extrapolated": f"batch / (250 × the median {steps}-step run's time per step)",
    }  # fmt: skip
    if compiled:
        ratios = [e / c for e, c in zip(times["eager"], times["compiled"], strict=True)]
        record |= {
            "eager_sde_step_ms": 1e3 * statistics.median(times["eager"]) / steps,
            "speedup_paired": statistics.median(ratios),  # eager time / compiled time per round
            "speedup_ci95": median_ci(ratios),
            "round_times_ms": {name: [1e3 * t for t in ts] for name, ts in times.items()},
        }
    return record


def bench_inception(
    *, device: str = "cpu", batch: int = 100, batches: int = 5, weights: str | None = None
) -> dict[str, Any]:
    """Inception feature extraction (pool, logits and ADM's spatial features) on 256² uint8
    images, as the evaluator runs it. Throughput does not depend on the weights' values: without
    real weights a random-initialised network is timed, and the record says so."""
    import tempfile

    from ..metrics.extractors import InceptionExtractor, build_random_inception_weights

    with tempfile.TemporaryDirectory() as tmp:
        try:
            ext = InceptionExtractor(weights, device)
            used = str(ext.weights)
        except FileNotFoundError:
            path = build_random_inception_weights(Path(tmp) / "random-inception.pth")
            ext = InceptionExtractor(path, device, tag="random-inception(seed=0)")
            used = "random init (throughput only)"
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, 256, 256), dtype=torch.uint8, generator=gen)

    def run() -> None:
        ext.batch_features(images)

    median = statistics.median(time_calls(run, device, WARMUP["inception"], batches))
    return {
        "device": device, "batch": batch, "image_size": 256, "weights": used,
        "warmup": WARMUP["inception"], "repeats": batches,
        "ms_per_batch": 1e3 * median, "images_per_s": batch / median,
    }  # fmt: skip

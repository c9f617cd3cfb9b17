"""Throughput benchmarks: training steps per variant, samplers; JSON out, no assertions.

Run ``diversedit bench --device cuda --sizes S/2,B/2,XL/2`` on a GPU node (or ``--sizes tiny``
on a CPU). Each measurement is the median over timed steps after warm-up, with the machine's
description recorded beside it.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from .losses.diversity import DiversityConfig
from .losses.objective import ObjectiveConfig, compute_loss
from .losses.repa import RepaConfig
from .models import create_model
from .sampling import euler_maruyama_sampler

# variant → (model options, objective); REPA uses stand-in encoder targets (no DINOv2 forward).
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "sit": ({}, {}),
    "long_skip": ({"long_skip": True}, {}),
    "diversity": ({}, {"diversity": DiversityConfig()}),
    "diversedit": ({"long_skip": True}, {"diversity": DiversityConfig()}),
    "repa": ({"z_dims": (768,)}, {"repa": RepaConfig()}),
    "repa_diversedit": (
        {"z_dims": (768,), "long_skip": True},
        {"repa": RepaConfig(), "diversity": DiversityConfig()},
    ),
}
# A CPU-sized stand-in for the registry sizes (the CPU tier's scale).
TINY = dict(depth=12, hidden_size=192, num_heads=3, input_size=16, patch_size=2, num_classes=10)
# Dense bf16 tensor-core peak (FLOP/s) by device name fragment.
BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


@dataclass
class StepResult:
    size: str
    variant: str
    device: str
    dtype: str
    batch: int
    compiled: bool
    images_per_s: float
    step_ms: float
    peak_mem_gib: float | None
    flops_per_step: float | None
    mfu: float | None


def build(size: str, variant: str, device: str) -> tuple[torch.nn.Module, ObjectiveConfig]:
    model_kw, obj_kw = VARIANTS[variant]
    name, base = ("custom", TINY) if size == "tiny" else (f"SiT-{size}", {})
    with torch.device(device):  # initialise in place: no host copy of XL weights
        model = create_model(name, **(base | model_kw | {"encoder_depth": 4}))
    return model.train(), ObjectiveConfig(**obj_kw)


def _time(fn: Callable[[], Any], device: str, warmup: int, steps: int) -> list[float]:
    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def _peak_flops(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in BF16_PEAK.items() if k in name), None)


def bench_train_step(
    size: str,
    variant: str,
    *,
    device: str = "cpu",
    batch: int = 32,
    dtype: str = "bf16",
    compile_model: bool = False,
    warmup: int = 3,
    steps: int = 10,
) -> StepResult:
    """One optimiser step as the trainer runs it: loss, backward, clip 1.0, fused AdamW, EMA."""
    torch.manual_seed(0)
    model, obj = build(size, variant, device)
    ema = [p.detach().clone() for p in model.parameters()]
    params = [p for p in model.parameters() if p.requires_grad]
    fused = device.startswith("cuda")
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0, fused=fused)
    cfg = model.config
    x0 = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, device=device)
    y = torch.randint(0, cfg.num_classes, (batch,), device=device)
    targets = [torch.randn(batch, cfg.num_patches, z, device=device) for z in cfg.z_dims]
    net = torch.compile(model) if compile_model else model
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)
    dev_type = torch.device(device).type

    def step(network: torch.nn.Module = net) -> None:
        with torch.autocast(dev_type, dtype=amp or torch.float32, enabled=amp is not None):
            loss, _ = compute_loss(network, x0, y, obj, encoder_targets=targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(ema, list(model.parameters()), 1 - 0.9999)

    flops = None
    if device.startswith("cuda"):
        step()  # allocate optimiser state before counting
        counter = FlopCounterMode(display=False)
        with counter:
            step(model)  # count on the eager model (same mathematics as the compiled one)
        flops = float(counter.get_total_flops())
        torch.cuda.reset_peak_memory_stats(device)
    median = statistics.median(_time(step, device, warmup, steps))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.startswith("cuda") else None
    peak_flops = _peak_flops(device)
    mfu = flops / median / peak_flops if flops and peak_flops else None
    return StepResult(
        size, variant, device, dtype, batch, compile_model, batch / median, 1e3 * median,
        peak, flops, mfu,
    )  # fmt: skip


def bench_sampler(
    size: str, *, device: str = "cpu", batch: int = 64, cfg_scale: float = 1.0, steps: int = 10
) -> dict[str, Any]:
    """SDE (Euler–Maruyama) throughput, timed on ``steps`` steps and scaled to 250."""
    torch.manual_seed(0)
    model, _ = build(size, "sit", device)
    model.eval()
    cfg = model.config
    z = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, device=device)
    y = torch.randint(0, cfg.num_classes, (batch,), device=device)
    amp = device.startswith("cuda")

    def run() -> None:
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
            euler_maruyama_sampler(
                model, z, y, num_steps=steps, cfg_scale=cfg_scale, null_label=cfg.num_classes
            )

    median = statistics.median(_time(run, device, 1, 3))
    per_step = median / steps
    return {
        "size": size, "device": device, "batch": batch, "cfg_scale": cfg_scale,
        "sde_step_ms": 1e3 * per_step, "images_per_s_250_steps": batch / (250 * per_step),
    }  # fmt: skip


def machine() -> dict[str, Any]:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def run(
    sizes: Sequence[str],
    variants: Sequence[str],
    *,
    device: str,
    batch: int,
    dtype: str,
    compile_model: bool,
    out: Path | None,
    samplers: bool = True,
    steps: int = 10,
) -> dict[str, Any]:
    """Benchmark every (size, variant); writes the JSON after each measurement."""
    report: dict[str, Any] = {"machine": machine(), "train_step": [], "sampler": []}

    def save() -> None:
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2))

    for size in sizes:
        base = None
        for variant in variants:
            r = asdict(
                bench_train_step(
                    size, variant, device=device, batch=batch, dtype=dtype,
                    compile_model=compile_model, steps=steps,
                )
            )  # fmt: skip
            base = r["step_ms"] if variant == "sit" else base
            r["overhead_vs_sit"] = r["step_ms"] / base - 1 if base else None
            report["train_step"].append(r)
            print(
                f"{size:>5} {variant:>16} {r['images_per_s']:9.1f} img/s {r['step_ms']:8.2f} ms"
                + (f"  MFU {r['mfu']:.1%}" if r["mfu"] else "")
                + (f"  +{r['overhead_vs_sit']:.1%}" if r["overhead_vs_sit"] is not None else ""),
                flush=True,
            )
            save()
        if samplers:
            for scale in (1.0, 1.8):
                report["sampler"].append(bench_sampler(size, device=device, cfg_scale=scale))
                save()
    return report

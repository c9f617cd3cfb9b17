"""Training steps as the trainer runs them, per variant and model size, timed alone or
round-robin."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..losses.diversity import DiversityConfig
from ..losses.objective import ObjectiveConfig, compute_loss
from ..losses.repa import RepaConfig
from ..models import create_model, model_config
from ..models.sit import SiTConfig
from ..update import FusedUpdate
from .profiling import profile_step
from .timing import WARMUP, cpu_allocation_peak, time_calls

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


# Dense (no 2:4 sparsity) bf16 tensor-core peaks in FLOP/s from NVIDIA's datasheets, by a
# fragment of the CUDA device name; the first fragment the name contains wins, so the PCIe and
# NVL boards come before the SXM ones ("NVIDIA H100 80GB HBM3" is an H100 SXM).
BF16_PEAK = (
    ("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H200 NVL", 835e12), ("H100", 989e12),
    ("H200", 989e12), ("B200", 2.25e15), ("A100", 312e12), ("L40S", 362e12),
)  # fmt: skip


def bf16_peak(device_name: str) -> float | None:
    """The dense bf16 peak in FLOP/s of a GPU named ``device_name`` (:data:`BF16_PEAK`), or
    None for a GPU not listed there."""
    return next((flops for fragment, flops in BF16_PEAK if fragment in device_name), None)


def model_config_for(size: str) -> SiTConfig:
    """The SiTConfig a bench size stands for (``tiny`` = the CPU tier's scale)."""
    return SiTConfig(**TINY) if size == "tiny" else model_config(f"SiT-{size}")


def build(size: str, variant: str, device: str) -> tuple[torch.nn.Module, ObjectiveConfig]:
    model_kw, obj_kw = VARIANTS[variant]
    with torch.device(device):  # initialise in place: no host copy of XL weights
        model = create_model(model_config_for(size), **model_kw, encoder_depth=4)
    return model.train(), ObjectiveConfig(**obj_kw)


def training_state_bytes(size: str, variant: str) -> int:
    """Bytes of a variant's training state: float32 parameters, gradients, AdamW's two moments
    and the EMA (a lower bound on what its step holds), counted on a model built on the meta
    device, which allocates nothing."""
    model, _ = build(size, variant, "meta")
    return 5 * 4 * sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class StepSettings:
    """How a training step is run: device, per-device batch, autocast dtype (None: bf16 on
    CUDA, fp32 elsewhere), compilation, whether the diversity statistics come from the Triton
    kernels and whether the parameter update is the compiled one (:mod:`..update`); the dense
    bf16 peak (FLOP/s) its MFU is reckoned against (None: the GPU's, :func:`bf16_peak`); and
    how many micro-batches of ``batch`` each step accumulates (``optim.grad_accum``)."""

    device: str = "cpu"
    batch: int = 32
    dtype: str | None = None
    compile_model: bool = False
    compile_mode: str = "default"
    compile_scope: str = "model"
    diversity_triton: bool = False
    update: str = "library"
    peak_flops: float | None = None
    accum: int = 1

    def __post_init__(self) -> None:
        for name in ("batch", "accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        cuda = torch.device(self.device).type == "cuda"
        if self.dtype is None:
            object.__setattr__(self, "dtype", "bf16" if cuda else "fp32")
        if self.peak_flops is None and cuda and torch.cuda.is_available():
            peak = bf16_peak(torch.cuda.get_device_name(self.device))
            object.__setattr__(self, "peak_flops", peak)


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
    peak_mem_gib: float | None  # tensor memory: CUDA timed steps, CPU build and warm-up
    flops_per_step: float | None
    mfu: float | None
    profile: dict[str, Any] | None = None  # where the time goes (``--profile``)
    diversity_triton: bool = False
    page_faults: float | None = None  # median minor page faults per step (host memory)
    update: str = "library"  # how clip, AdamW and EMA ran (``precision.update``)
    step_times_ms: list[float] | None = None  # every timed step, in order (rounds, interleaved)
    host_ms: float | None = None  # CUDA: median time until the step's call returns (its launches)
    accum: int = 1  # micro-batches of ``batch`` per step (gradient accumulation)
    ready_s: float | None = None  # seconds to build the step and run its warm-up (compiling)


def prepare_train_step(
    size: str, variant: str, settings: StepSettings = StepSettings()
) -> tuple[Callable[[], None], float | None]:
    """One optimiser step as the trainer runs it (loss and backward for each of
    ``settings.accum`` micro-batches, then clip 1.0, fused AdamW on CUDA, EMA; or these three as
    a :class:`~..update.FusedUpdate` with ``settings.update``) as a closure, and its model FLOPs
    (counted on CUDA, else None).

    ``settings.compile_model`` compiles the model (with ``compile_mode``, as one graph or per
    block, see ``compile_scope``) and the diversity loss, as the trainer does on CUDA.
    """
    device, batch = settings.device, settings.batch
    torch.manual_seed(0)
    model, obj = build(size, variant, device)
    opt, update = make_update(model, device, settings.update)
    cfg = model.config
    micro_batches = [
        (
            torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, device=device),
            torch.randint(0, cfg.num_classes, (batch,), device=device),
            [torch.randn(batch, cfg.num_patches, z, device=device) for z in cfg.z_dims],
        )
        for _ in range(settings.accum)
    ]
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(settings.dtype)
    dev_type = torch.device(device).type

    def step(network: torch.nn.Module = model, compiled: bool = False) -> None:
        for x0, y, targets in micro_batches:
            with torch.autocast(dev_type, dtype=amp or torch.float32, enabled=amp is not None):
                loss, _ = compute_loss(
                    network, x0, y, obj, encoder_targets=targets, compiled=compiled,
                    triton=settings.diversity_triton,
                )  # fmt: skip
            (loss / settings.accum if settings.accum > 1 else loss).backward()  # as accelerate
        update()
        opt.zero_grad(set_to_none=True)

    flops = None
    if device.startswith("cuda"):
        step()  # allocate optimiser state before counting
        counter = FlopCounterMode(display=False)
        with counter:
            step()  # count on the eager model (same mathematics as the compiled one)
        flops = float(counter.get_total_flops())
    if not settings.compile_model:
        return step, flops
    if settings.compile_scope == "blocks":
        model.compile_blocks(settings.compile_mode)
        return partial(step, model, True), flops
    return partial(step, torch.compile(model, mode=settings.compile_mode), True), flops


def make_update(
    model: torch.nn.Module, device: str, impl: str
) -> tuple[torch.optim.AdamW, Callable[[], Any]]:
    """The trainer's optimiser (fused AdamW on CUDA, over every parameter) and its update from
    the gradients: clip to norm 1, AdamW step, EMA (decay 0.9999) as ``library`` calls, or as a
    :class:`~..update.FusedUpdate` (``impl`` ``compiled`` or ``triton``)."""
    params = list(model.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0, fused=device.startswith("cuda"))
    if impl != "library":
        return opt, FusedUpdate(opt, ema, max_norm=1.0, ema_decay=0.9999, impl=impl)

    def update() -> None:
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1 - 0.9999)

    return opt, update


def _result(
    size: str, variant: str, settings: StepSettings, times: list[float], flops: float | None,
    peak: float | None, faults: list[int], host: list[float], ready_s: float | None = None,
) -> StepResult:  # fmt: skip
    st = settings
    median = statistics.median(times)
    mfu = flops / median / st.peak_flops if flops and st.peak_flops else None
    return StepResult(
        size, variant, st.device, st.dtype, st.batch, st.compile_model,
        st.batch * st.accum / median, 1e3 * median, peak, flops, mfu,
        diversity_triton=st.diversity_triton,
        page_faults=statistics.median(faults), update=st.update,
        step_times_ms=[1e3 * t for t in times],
        host_ms=1e3 * statistics.median(host) if st.device.startswith("cuda") else None,
        accum=st.accum, ready_s=ready_s,
    )  # fmt: skip


def _prepare_warm(
    size: str, variant: str, settings: StepSettings, warmup: int
) -> tuple[Callable[[], None], float | None, float | None, float]:
    """:func:`prepare_train_step` and its ``warmup`` calls: the step, its FLOPs, on the CPU its
    peak tensor memory in GiB from the model's build through the warm-up (model, optimiser
    state, EMA, inputs and the step's own tensors; :func:`cpu_allocation_peak`), and the
    seconds all that took (a compiled step's compilation included)."""

    def prepare() -> tuple[Callable[[], None], float | None]:
        step, flops = prepare_train_step(size, variant, settings)
        time_calls(step, settings.device, warmup, 0)
        if settings.device.startswith("cuda"):
            torch.cuda.synchronize()
        return step, flops

    start = time.perf_counter()
    if torch.device(settings.device).type != "cpu":
        (step, flops), peak = prepare(), None
    else:
        (step, flops), peak = cpu_allocation_peak(prepare)
        peak /= 2**30
    return step, flops, peak, time.perf_counter() - start


def bench_train_step(
    size: str,
    variant: str,
    settings: StepSettings = StepSettings(),
    *,
    warmup: int = WARMUP["train"],
    steps: int = 10,
    profile: bool = False,
    on_timed: Callable[[StepResult], None] | None = None,
) -> StepResult:
    """Median step time of one variant, timed alone, with its peak memory (on CUDA over the
    timed steps, on the CPU see :func:`_prepare_warm`); with ``profile``, two more steps under
    the profiler give its top operators. ``on_timed`` gets the result before the profile."""
    device = settings.device
    step, flops, peak, ready_s = _prepare_warm(size, variant, settings, warmup)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    faults: list[int] = []
    host: list[float] = []
    times = time_calls(step, device, 0, steps, faults, host)
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    result = _result(size, variant, settings, times, flops, peak, faults, host, ready_s)
    if on_timed is not None:
        on_timed(result)
    result.profile = profile_step(step, device) if profile else None
    return result


def bench_train_steps_interleaved(
    size: str,
    variants: Sequence[str],
    settings: StepSettings = StepSettings(),
    *,
    warmup: int = WARMUP["train"],
    steps: int = 10,
    profile: bool = False,
    on_timed: Callable[[StepResult], None] | None = None,
) -> list[StepResult]:
    """Median step times of all variants, timed round-robin (one step of each in turn), so slow
    drift of a shared or throttled machine hits every variant alike. Peak memory on the CPU
    only (:func:`_prepare_warm`; on CUDA the variants' tensors share the device's statistics).
    ``on_timed`` gets each result when every round is done, before any profile."""
    device = settings.device
    prepared = {v: _prepare_warm(size, v, settings, warmup) for v in variants}
    times: dict[str, list[float]] = {v: [] for v in variants}
    faults: dict[str, list[int]] = {v: [] for v in variants}
    host: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(steps):
        for v, (step, *_) in prepared.items():
            times[v] += time_calls(step, device, 0, 1, faults[v], host[v])
    results = [
        _result(size, v, settings, times[v], flops, peak, faults[v], host[v], ready_s)
        for v, (_, flops, peak, ready_s) in prepared.items()
    ]
    for result in results if on_timed else ():
        on_timed(result)
    for result, (step, *_) in zip(results, prepared.values(), strict=True) if profile else ():
        result.profile = profile_step(step, device)
    return results

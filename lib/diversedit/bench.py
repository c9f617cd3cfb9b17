"""Throughput benchmarks, JSON out, no assertions: training steps per variant, the diversity
loss alone (per implementation), the parameter update (AdamW, clipping, EMA), the SDE sampler
and Inception feature extraction.

Run ``diversedit bench --device cuda --sizes S/2,B/2,XL/2`` on a GPU node (or ``--sizes tiny``
on a CPU). Each measurement is the median over timed repeats after warm-up, with the machine's
description recorded beside it.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from itertools import product
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from .config import COMPILE_MODES, COMPILE_SCOPES, UPDATES
from .files import atomic_write_bytes, git_revision, usable_cpus
from .generate import SamplingConfig, model_autocast, sampling_network
from .host_memory import keep_freed_memory
from .losses.diversity import DiversityConfig, diversity_loss
from .losses.objective import ObjectiveConfig, compute_loss
from .losses.repa import RepaConfig
from .models import MODEL_NAMES, create_model, model_config
from .models.sit import SiTConfig
from .numerics import allow_tf32
from .overhead import median_ci, paired_overhead
from .sampling import euler_maruyama_sampler
from .timeline import idle_summary, trace_intervals
from .triton_support import triton_runs_on
from .update import FusedUpdate

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
PARTS = ("train", "loss", "optimizer", "sampler", "inception")
DEFAULT_PARTS = ("train", "loss", "sampler", "inception")  # optimizer: its compiled update
# takes minutes to build on a CPU
WARMUP = {"train": 3, "loss": 3, "optimizer": 2, "sampler": 1, "inception": 1}  # untimed calls
SAMPLER_TIMED_STEPS, SAMPLER_REPEATS, SAMPLER_BATCH = 10, 3, 64
# (precision, tf32) timed on CUDA: `diversedit sample`'s default, bf16 autocast, IEEE float32
SAMPLER_NUMERICS = [("fp32", True), ("bf16", True), ("fp32", False)]
GPU_ONLY = ("flops_per_step", "mfu", "host_ms")  # null on a CPU
SIZES = ("tiny", *(name.removeprefix("SiT-") for name in MODEL_NAMES))  # tiny, S/1 … XL/8


@dataclass(frozen=True)
class StepSettings:
    """How a training step is run: device, per-device batch, autocast dtype (None: bf16 on
    CUDA, fp32 elsewhere), compilation, whether the diversity statistics come from the Triton
    kernels and whether the parameter update is the compiled one (:mod:`.update`); the dense
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


def available_memory(device: str) -> int | None:
    """Bytes the device can still allocate: free CUDA memory, or the host's ``MemAvailable``
    (None where ``/proc/meminfo`` is missing)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    fields = (line.split() for line in text.splitlines())
    kib = next((f[1] for f in fields if f[:1] == ["MemAvailable:"]), None)
    return int(kib) * 1024 if kib else None


def _check_interleaved_memory(sizes: Sequence[str], variants: Sequence[str], device: str) -> None:
    """ValueError when the variants timed round-robin, all built at once, would need more
    memory for their training state alone than the device has available."""
    if len(variants) < 2 or (free := available_memory(device)) is None:
        return
    for size in sizes:
        need = sum(training_state_bytes(size, v) for v in variants)
        if need > free:
            raise ValueError(
                f"--interleave: {len(variants)} {size} variants built at once hold at least "
                f"{need / 2**30:.1f} GiB of training state (float32 parameters, gradients, AdamW "
                f"moments, EMA) and {device} has {free / 2**30:.1f} GiB available; time them one "
                "after another (--no-interleave) or fewer variants per run"
            )


# Kernel name fragments → class, first match wins (CUDA kernels; everything else is "other").
KERNEL_CLASSES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("flash", "fmha", "attention", "attn")),
    ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "matmul", "cublas", "splitk", "triton_tem")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "lerp", "grad_squares")),  # + update_triton
    ("diversity", ("column_sums", "pair_rows", "block_grads")),  # losses/diversity_triton.py
    ("compiled", ("triton",)),  # Inductor's fused elementwise and reduction kernels
)


def kernel_class(name: str) -> str:
    """The class of a CUDA kernel name (:data:`KERNEL_CLASSES`), ``other`` when none matches."""
    low = name.lower()
    return next((c for c, frags in KERNEL_CLASSES if any(f in low for f in frags)), "other")


def profile_step(
    fn: Callable[[], Any], device: str, steps: int = 2, top: int = 15
) -> dict[str, Any]:
    """Where ``steps`` calls of ``fn`` spend their time, per call: the ``top`` operators (or
    compiled kernels) by self time (device time on CUDA, CPU time otherwise), and on CUDA the
    summed kernel time per :data:`KERNEL_CLASSES` class (``kernel_ms``, with ``total``) and the
    GPU's idle time between kernels with what the host ran meanwhile (``gpu_idle``,
    :func:`~.timeline.idle_summary`)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    detach_cupti_after_profiles()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        if cuda:
            torch.cuda.synchronize()

    def self_us(event: Any) -> float:
        if not cuda:
            return event.self_cpu_time_total
        value = getattr(event, "self_device_time_total", None)  # torch >= 2.4
        return event.self_cuda_time_total if value is None else value

    ops = [
        {"name": e.key, "self_ms": self_us(e) / 1e3 / steps, "calls": e.count / steps}
        for e in sorted(prof.key_averages(), key=self_us, reverse=True)[:top]
    ]
    out: dict[str, Any] = {"top": ops, "kernel_ms": {}}
    if cuda:
        out.update(gpu_timeline(prof.events(), steps))
    return out


def detach_cupti_after_profiles() -> None:
    """Set ``TEARDOWN_CUPTI=1`` for the process unless it is set (by the user, or by torch for
    CUDA graphs on old CUDA): Kineto then detaches CUPTI when a profile ends. Without it, some
    Kineto versions leave CUPTI attached, and every step timed later in the process runs slower
    (pytorch/pytorch#144455; NOTES entry 37). Left set, since Kineto reads it when a profile
    stops and again after the teardown; no effect on the CPU."""
    os.environ.setdefault("TEARDOWN_CUPTI", "1")


def gpu_timeline(events: Sequence[Any], steps: int) -> dict[str, Any]:
    """``kernel_ms`` (summed kernel time per :data:`KERNEL_CLASSES` class and ``total``, ms
    per step) and ``gpu_idle`` (:func:`~.timeline.idle_summary`) from a CUDA profile's events."""
    from torch.autograd import DeviceType

    kernels = trace_intervals(events, DeviceType.CUDA)
    kernel_ms: dict[str, float] = {}
    for start, end, name in kernels:
        cls = kernel_class(name)
        kernel_ms[cls] = kernel_ms.get(cls, 0.0) + (end - start) / 1e3 / steps
    kernel_ms["total"] = sum(kernel_ms.values())
    host = trace_intervals(events, DeviceType.CPU, leaves=True)
    return {"kernel_ms": kernel_ms, "gpu_idle": idle_summary(kernels, host, steps)}


def _idle_text(profile: dict[str, Any] | None) -> str:
    """The printed GPU idle time of a profiled CUDA step, or nothing."""
    idle = (profile or {}).get("gpu_idle", {})
    if not idle.get("kernels"):
        return ""
    return f"  GPU idle {idle['idle_ms']:.1f} of {idle['span_ms']:.1f} ms (profiled)"


def _label(r: dict[str, Any]) -> str:
    """A training-step record's variant as printed."""
    return r["variant"] + "+triton" * r["diversity_triton"]


def _train_line(r: dict[str, Any]) -> str:
    """The printed line of one training-step record."""
    ci = r["overhead_ci95"]
    return (
        f"{r['size']:>5} {_label(r):>16} "
        f"{r['images_per_s']:9.1f} img/s {r['step_ms']:8.2f} ms"
        + (f" ({r['batch']} × {r['accum']})" if r["accum"] > 1 else "")
        + (f"  MFU {r['mfu']:.1%}" if r["mfu"] else "")
        + (f"  peak {r['peak_mem_gib']:.2f} GiB" if r["peak_mem_gib"] else "")
        + (f"  host {r['host_ms']:.1f} ms" if r["host_ms"] is not None else "")
        + (f"  ready in {r['ready_s']:.0f} s" if r["compiled"] else "")
        + (f"  {r['page_faults']:.0f} page faults" if r["device"] == "cpu" else "")
        + (f"  {r['overhead_vs_sit']:+.1%}" if r["overhead_vs_sit"] is not None else "")
        + (f" (paired {r['overhead_paired']:+.1%}, 95% {ci[0]:+.1%}..{ci[1]:+.1%})"
           if ci and r["variant"] != "sit" else "")
    )  # fmt: skip


def cpu_allocation_peak(fn: Callable[[], Any]) -> tuple[Any, int]:
    """``fn()`` and the most bytes of CPU tensor memory it held at once, beyond what was
    allocated when it began: the running sum of the profiler's allocation and free events
    (every call of the CPU allocator, in bytes asked for). The profiler remembers the size of
    every block allocated under an earlier memory profile, so freeing one counts here too:
    garbage such a profile left in reference cycles is collected before this one begins."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    held = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):  # stable: ties keep their order
        if e.device_type() == torch.autograd.DeviceType.CPU:
            held += e.nbytes()
            peak = max(peak, held)
    return out, peak


def _minor_faults() -> int:
    """This process's minor page faults so far (0 where ``resource`` is missing: Windows)."""
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _time(
    fn: Callable[[], Any],
    device: str,
    warmup: int,
    steps: int,
    faults: list[int] | None = None,
    host: list[float] | None = None,
) -> list[float]:
    """Wall-clock seconds of ``steps`` calls after ``warmup``; appends each call's minor page
    faults to ``faults`` and the seconds until it returned (before the device finished) to
    ``host`` when given."""

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        sync()
        start, faulted = time.perf_counter(), _minor_faults()
        fn()
        if host is not None:
            host.append(time.perf_counter() - start)
        sync()
        times.append(time.perf_counter() - start)
        if faults is not None:
            faults.append(_minor_faults() - faulted)
    return times


def bf16_peak(device_name: str) -> float | None:
    """The dense bf16 peak in FLOP/s of a GPU named ``device_name`` (:data:`BF16_PEAK`), or
    None for a GPU not listed there."""
    return next((flops for fragment, flops in BF16_PEAK if fragment in device_name), None)


def prepare_train_step(
    size: str, variant: str, settings: StepSettings = StepSettings()
) -> tuple[Callable[[], None], float | None]:
    """One optimiser step as the trainer runs it (loss and backward for each of
    ``settings.accum`` micro-batches, then clip 1.0, fused AdamW on CUDA, EMA; or these three as
    a :class:`~.update.FusedUpdate` with ``settings.update``) as a closure, and its model FLOPs
    (counted on CUDA, else None).

    ``settings.compile_model`` compiles the model (with ``compile_mode``, as one graph or per
    block, see ``compile_scope``) and the diversity loss, as the trainer does on CUDA.
    """
    device, batch = settings.device, settings.batch
    torch.manual_seed(0)
    model, obj = build(size, variant, device)
    opt, update = _update(model, device, settings.update)
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


def _update(
    model: torch.nn.Module, device: str, impl: str
) -> tuple[torch.optim.AdamW, Callable[[], Any]]:
    """The trainer's optimiser (fused AdamW on CUDA, over every parameter) and its update from
    the gradients: clip to norm 1, AdamW step, EMA (decay 0.9999) as ``library`` calls, or as a
    :class:`~.update.FusedUpdate` (``impl`` ``compiled`` or ``triton``)."""
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
        _time(step, settings.device, warmup, 0)
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
    times = _time(step, device, 0, steps, faults, host)
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
            times[v] += _time(step, device, 0, 1, faults[v], host[v])
    results = [
        _result(size, v, settings, times[v], flops, peak, faults[v], host[v], ready_s)
        for v, (_, flops, peak, ready_s) in prepared.items()
    ]
    for result in results if on_timed else ():
        on_timed(result)
    for result, (step, *_) in zip(results, prepared.values(), strict=True) if profile else ():
        result.profile = profile_step(step, device)
    return results


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
    from .losses import diversity as div

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

    median = statistics.median(_time(run, device, WARMUP["loss"], steps))
    return {
        "size": size, "impl": impl, "device": device, "batch": batch, "blocks": n,
        "tokens": cfg.num_patches, "hidden": d, "low_dtype": dtype, "fwd_bwd_ms": 1e3 * median,
        "feature_mib": sum(f.numel() * f.element_size() for f in feats) / 2**20,
        "profile": profile_step(run, device, top=25) if profile else None,
    }  # fmt: skip


def model_config_for(size: str) -> SiTConfig:
    """The SiTConfig a bench size stands for (``tiny`` = the CPU tier's scale)."""
    return SiTConfig(**TINY) if size == "tiny" else model_config(f"SiT-{size}")


def bench_inception(
    *, device: str = "cpu", batch: int = 100, batches: int = 5, weights: str | None = None
) -> dict[str, Any]:
    """Inception feature extraction (pool, logits and ADM's spatial features) on 256² uint8
    images, as the evaluator runs it. Throughput does not depend on the weights' values: without
    real weights a random-initialised network is timed, and the record says so."""
    import tempfile

    from .metrics.extractors import InceptionExtractor, build_random_inception_weights

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

    median = statistics.median(_time(run, device, WARMUP["inception"], batches))
    return {
        "device": device, "batch": batch, "image_size": 256, "weights": used,
        "warmup": WARMUP["inception"], "repeats": batches,
        "ms_per_batch": 1e3 * median, "images_per_s": batch / median,
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
        return 1e3 * statistics.median(_time(fn, device, WARMUP["optimizer"], steps))

    out = {"size": size, "device": device, "params": count, "tensors": len(params)}
    out["update_ms"] = ms(_update(model, device, "library")[1])  # its state freed on return
    if update != "library":
        fused = _update(model, device, update)[1]
        (first,) = _time(fused, device, 0, 1)  # compiled: ~1 s per tensor on a 2-core CPU
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
        _time(run, device, WARMUP["sampler"], 0)
    repeats = rounds if compiled else SAMPLER_REPEATS
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name] += _time(run, device, 0, 1)
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


def _cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# Environment variables that change how torch compiles, allocates or profiles
# (``TORCHINDUCTOR_CPP_WRAPPER`` and the like): recorded with the machine, since they change the
# timings but no flag shows them.
TORCH_ENV = (
    "TORCHINDUCTOR_", "TORCHDYNAMO_", "TORCH_COMPILE", "PYTORCH_CUDA_ALLOC_CONF", "TEARDOWN_CUPTI",
)  # fmt: skip


def machine() -> dict[str, Any]:
    """Hardware and versions (Triton's where installed), the code's git revision (commit,
    uncommitted changes) and the torch settings made in the environment (:data:`TORCH_ENV`)."""
    info = git_revision() | {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable_cpus(),
        "threads": torch.get_num_threads(),
        "torch_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(TORCH_ENV)},
    }
    try:  # the Triton kernels' code depends on its version
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _describe(variant: str) -> dict[str, Any]:
    """A variant's model options and objective terms, as recorded with its measurements."""
    model_kw, obj_kw = VARIANTS[variant]
    terms = {k: asdict(v) for k, v in obj_kw.items()}
    note = "REPA targets: stand-in encoder features (random, no DINOv2 forward)"
    return {"model": model_kw, "objective": terms} | ({"note": note} if "repa" in obj_kw else {})


def _check_choices(what: str, given: Sequence[str], valid: Sequence[str]) -> None:
    """ValueError naming the values of ``given`` not in ``valid``, and listing ``valid``."""
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise ValueError(f"unknown bench {what} {unknown}; choose from {', '.join(valid)}")


def _check_device(device: str) -> None:
    """ValueError for a device string other than a CPU or CUDA one, or a CUDA device this
    machine lacks."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: not a device; choose cpu, cuda or cuda:N")
    if dev.type == "cuda" and (dev.index or 0) >= (count := torch.cuda.device_count()):
        found = f"only {count} CUDA device(s) are" if count else "no CUDA device is"
        raise ValueError(f"--device {device}: {found} available")


def _interleaves(device: str, interleave: bool | None) -> bool:
    """Whether training variants are timed round-robin: as asked, else on a CPU only."""
    return device == "cpu" if interleave is None else interleave


def check_options(
    parts: Sequence[str], compile_mode: str, compile_scope: str = "model", *,
    sizes: Sequence[str] = (), variants: Sequence[str] = (), device: str = "cpu",
    diversity_triton: bool = False, update: str = "library", peak_tflops: float | None = None,
    interleave: bool | None = None,
) -> None:  # fmt: skip
    """ValueError for an unknown size, variant, part, device, compile mode, scope or update,
    Triton kernels on a device that cannot run them, a bf16 peak for MFU that is not a
    positive number or is given for a CPU run (which has no MFU), or training variants to be
    timed round-robin (``interleave``, None: on a CPU) whose training state together exceeds
    the device's available memory, before anything is built or timed."""
    _check_choices("sizes", sizes, SIZES)
    _check_choices("variants", variants, tuple(VARIANTS))
    _check_choices("parts", parts, PARTS)
    _check_device(device)
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {compile_mode!r}; choose from {COMPILE_MODES}")
    if compile_scope not in COMPILE_SCOPES:
        raise ValueError(f"unknown compile scope {compile_scope!r}; choose from {COMPILE_SCOPES}")
    if update not in UPDATES:
        raise ValueError(f"unknown update {update!r}; choose from {UPDATES}")
    for flag, on in (
        ("--diversity-triton", diversity_triton),
        ("--update triton", update == "triton"),
    ):
        if on and not triton_runs_on(torch.device(device)):
            raise ValueError(f"{flag} needs a CUDA device, not {device} (or TRITON_INTERPRET=1)")
    if peak_tflops is not None:
        if not (math.isfinite(peak_tflops) and peak_tflops > 0):
            raise ValueError(f"--peak-tflops must be a positive number, got {peak_tflops!r}")
        if torch.device(device).type != "cuda":
            raise ValueError(f"--peak-tflops: MFU is measured on CUDA only, not on {device}")
    if "train" in parts and _interleaves(device, interleave):
        _check_interleaved_memory(sizes, variants, device)


def run(
    sizes: Sequence[str],
    variants: Sequence[str],
    *,
    device: str,
    batch: int,
    dtype: str | None,
    compile_model: bool,
    out: Path | None,
    parts: Sequence[str] = DEFAULT_PARTS,
    steps: int = 10,
    interleave: bool | None = None,
    compile_mode: str = "default",
    compile_scope: str = "model",
    profile: bool = False,
    diversity_triton: bool = False,
    update: str = "library",
    peak_tflops: float | None = None,
    accum: int = 1,
) -> dict[str, Any]:
    """Benchmark ``parts`` (train, loss, optimizer, sampler, inception) for every size; writes
    the JSON after each measurement. ``interleave`` (default: on CPU) times the training variants
    round-robin instead of one after another. ``dtype`` None: bf16 on CUDA, fp32 elsewhere. On
    the CPU, freed memory stays in the process as in CPU training (:mod:`.host_memory`).
    ``peak_tflops``: the dense bf16 peak for MFU on a GPU that :data:`BF16_PEAK` lacks, or
    another than the one it lists. ``accum``: micro-batches of ``batch`` per training step.
    """
    check_options(
        parts, compile_mode, compile_scope, sizes=sizes, variants=variants, device=device,
        diversity_triton=diversity_triton, update=update, peak_tflops=peak_tflops,
        interleave=interleave,
    )  # fmt: skip
    interleave = _interleaves(device, interleave)
    step_settings = StepSettings(
        device, batch, dtype, compile_model, compile_mode, compile_scope, diversity_triton, update,
        peak_tflops * 1e12 if peak_tflops else None, accum,
    )  # fmt: skip
    if torch.device(device).type == "cuda" and step_settings.peak_flops is None:
        print(f"MFU left out: no dense bf16 peak known for {torch.cuda.get_device_name(device)!r}"
              " (give it with --peak-tflops)", flush=True)  # fmt: skip
    dtype = step_settings.dtype
    settings = {
        "device": device, "batch": batch, "accum": accum, "dtype": dtype, "compile": compile_model,
        "compile_mode": compile_mode if compile_model else None,
        "compile_scope": compile_scope if compile_model else None, "steps": steps,
        "interleave": interleave, "parts": list(parts), "profile": profile,
        "profile_detaches_cupti": os.environ.get("TEARDOWN_CUPTI", "1") == "1" if profile else None,
        "diversity_triton": diversity_triton, "update": update,
        "mfu_peak_flops": step_settings.peak_flops,
        "mfu_peak_from": ("--peak-tflops" if peak_tflops else "the GPU's name")
        if step_settings.peak_flops else None,
        "keep_freed_memory": torch.device(device).type == "cpu" and keep_freed_memory(),
        "warmup": WARMUP, "gpu_only": list(GPU_ONLY),
        "statistic": "median over the timed repeats (train: over steps; interleaved: rounds)",
        "variants": {v: _describe(v) for v in variants},
        "sampler": {"batch": SAMPLER_BATCH, "timed_steps": SAMPLER_TIMED_STEPS,
                    "repeats": SAMPLER_REPEATS,
                    "compiled": "as diversedit sample --compile (default mode, static shapes), "
                    "against eager round-robin over `steps` rounds" if compile_model else None},
        "inception_batch": 100 if device.startswith("cuda") else 8,
    }  # fmt: skip
    report: dict[str, Any] = {
        "machine": machine(), "settings": settings, "train_step": [], "diversity_loss": [],
        "optimizer": [], "sampler": [], "inception": [],
    }  # fmt: skip

    def save() -> None:
        if out is not None:
            atomic_write_bytes(out, json.dumps(report, indent=2).encode())

    base: dict[str, Any] | None = None  # the size's SiT record

    def record(result: StepResult) -> None:
        nonlocal base
        r = asdict(result)
        r["timing"] = "interleaved" if interleave else "sequential"
        base = r if r["variant"] == "sit" else base
        r["overhead_vs_sit"] = r["step_ms"] / base["step_ms"] - 1 if base else None
        paired = None, None  # interleaved: each round's overhead, median and interval
        if base and interleave:
            paired = paired_overhead(r["step_times_ms"], base["step_times_ms"])
        r["overhead_paired"], r["overhead_ci95"] = paired
        report["train_step"].append(r)
        print(_train_line(r), flush=True)
        save()

    kw = dict(steps=steps, profile=profile)
    for size in sizes:
        if compile_model:  # a fresh graph cache: torch stops compiling after 8 graphs a function
            torch._dynamo.reset()
        base, first = None, len(report["train_step"])
        # each record saved once timed, its profile added after: a run cut short while
        # profiling (a time limit) keeps its timings
        if "train" not in parts:
            results: Iterable[StepResult] = ()
        elif interleave:
            results = bench_train_steps_interleaved(
                size, variants, step_settings, on_timed=record, **kw
            )
        else:
            results = (
                bench_train_step(size, v, step_settings, on_timed=record, **kw) for v in variants
            )
        for i, result in enumerate(results):
            if profile:
                r = report["train_step"][first + i]
                r["profile"] = result.profile
                if idle := _idle_text(r["profile"]):
                    print(f"{size:>5} {_label(r):>16}{idle}", flush=True)
                save()
        impls = [i for i in LOSS_IMPLS if not i.startswith("triton") or device.startswith("cuda")]
        for impl in impls if "loss" in parts else ():
            r = bench_diversity_loss(
                size, impl, device=device, batch=batch, dtype=dtype, steps=steps, profile=profile
            )
            report["diversity_loss"].append(r)
            print(f"{size:>5} diversity loss {impl:>9} {r['fwd_bwd_ms']:8.2f} ms", flush=True)
            save()
        if "optimizer" in parts:
            r = bench_optimizer(size, device=device, steps=steps, update=update)
            report["optimizer"].append(r)
            fused = r.get(f"{update}_update_ms")
            print(
                f"{size:>5} update {r['update_ms']:.2f} ms"
                + (f" ({update} {fused:.2f} ms)" if fused is not None else "")
                + f": AdamW {r['adamw_step_ms']:.2f} ms, clip "
                f"{r['clip_grad_norm_ms']:.2f} ms, EMA {r['ema_lerp_ms']:.2f} ms",
                flush=True,
            )
            save()
        # the CPU, and compiled sampling (a compilation per setting): the default numerics only
        all_numerics = device.startswith("cuda") and not compile_model
        for (precision, tf32), scale in product(
            SAMPLER_NUMERICS if all_numerics else SAMPLER_NUMERICS[:1],
            (1.0, 1.8) if "sampler" in parts else (),
        ):
            r = bench_sampler(
                size, device=device, cfg_scale=scale, precision=precision, tf32=tf32,
                compiled=compile_model, rounds=steps,
            )  # fmt: skip
            report["sampler"].append(r)
            numerics = precision
            if precision == "fp32" and r["tf32"] is not None:  # CUDA float32: TF32 or IEEE
                numerics += " TF32" if tf32 else " IEEE"
            numerics += " compiled" if compile_model else ""
            ci = r.get("speedup_ci95")
            print(
                f"{size:>5} sampler SDE {numerics} cfg {scale:.1f} "
                f"{r['images_per_s_250_steps']:9.3f} img/s at 250 steps "
                f"({r['sde_step_ms']:.1f} ms per step, batch {r['batch']})"
                + (f"; ×{r['speedup_paired']:.2f} over eager" if compile_model else "")
                + (f" (95% ×{ci[0]:.2f}..×{ci[1]:.2f})" if ci else ""),
                flush=True,
            )  # fmt: skip
            save()
    if "inception" in parts:
        r = bench_inception(device=device, batch=settings["inception_batch"], batches=steps)
        report["inception"].append(r)
        print(f"inception {r['images_per_s']:9.1f} img/s ({r['weights']})", flush=True)
        save()
    return report

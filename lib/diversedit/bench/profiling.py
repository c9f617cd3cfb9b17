"""Where a profiled step's time goes: top operators, CUDA kernel time per class and the GPU's
idle time between kernels (:mod:`..timeline`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..timeline import idle_summary, trace_intervals

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
    :func:`~..timeline.idle_summary`)."""
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
    per step) and ``gpu_idle`` (:func:`~..timeline.idle_summary`) from a CUDA profile's events."""
    from torch.autograd import DeviceType

    kernels = trace_intervals(events, DeviceType.CUDA)
    kernel_ms: dict[str, float] = {}
    for start, end, name in kernels:
        cls = kernel_class(name)
        kernel_ms[cls] = kernel_ms.get(cls, 0.0) + (end - start) / 1e3 / steps
    kernel_ms["total"] = sum(kernel_ms.values())
    host = trace_intervals(events, DeviceType.CPU, leaves=True)
    return {"kernel_ms": kernel_ms, "gpu_idle": idle_summary(kernels, host, steps)}

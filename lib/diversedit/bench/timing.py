"""Timing calls: wall clock after warm-up, page faults, host time, CPU allocation peaks and the
memory a device has left."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

WARMUP = {"train": 3, "loss": 3, "optimizer": 2, "sampler": 1, "inception": 1}  # untimed calls


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


def time_calls(
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

"""Where a GPU waits: the idle time between the kernels of a profiled stretch, sorted by gap
length, and what the host ran during the gaps (``diversedit bench --profile`` on CUDA).

The profiler adds host time to every operator it records, so profiled steps idle more than
unprofiled ones. Compare variants profiled alike, not these numbers with wall-clock steps.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable
from itertools import pairwise
from typing import Any

Interval = tuple[float, float, str]  # start, end (µs on the profiler's clock), name
# Gap classes by length: launch gaps between back-to-back kernels, then longer and longer stalls.
GAP_CLASSES_US = (
    ("under_10us", 10.0),
    ("10us_100us", 100.0),
    ("100us_1ms", 1e3),
    ("over_1ms", None),
)
NAME_CHARS = 100  # Inductor's kernel names run to hundreds of characters


def trace_intervals(
    events: Iterable[Any], device_type: Any, leaves: bool = False
) -> list[Interval]:
    """The (start, end, name) of a profiler's events on one device type (``DeviceType.CUDA``:
    kernels, copies and fills), without user annotations or asynchronous events (ranges that
    span other events); ``leaves`` keeps only events without children (the innermost calls)."""
    return [
        (e.time_range.start, e.time_range.end, e.name)
        for e in events
        if e.device_type == device_type
        and not (e.is_async or getattr(e, "is_user_annotation", False))
        and not (leaves and e.cpu_children)
    ]


def _merge(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of intervals as sorted, disjoint intervals."""
    out: list[tuple[float, float]] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _host_overlaps(
    gaps: list[tuple[float, float]], host: list[Interval]
) -> list[tuple[dict[str, float], float]]:
    """For each of the sorted, disjoint ``gaps``: µs of it per host call name that overlaps
    it, and µs that no host call covers. Work grows with the overlaps, not gaps × calls."""
    lows, highs = [g[0] for g in gaps], [g[1] for g in gaps]
    names: list[dict[str, float]] = [{} for _ in gaps]
    covered: list[list[tuple[float, float]]] = [[] for _ in gaps]
    for start, end, name in host:
        for i in range(bisect_right(highs, start), bisect_left(lows, end)):
            lo, hi = max(start, lows[i]), min(end, highs[i])
            names[i][name] = names[i].get(name, 0.0) + (hi - lo)
            covered[i].append((lo, hi))
    return [
        (by_name, (hi - lo) - sum(b - a for a, b in _merge(spans)))
        for by_name, spans, lo, hi in zip(names, covered, lows, highs, strict=True)
    ]


def _top(amounts: dict[str, float], n: int, scale: float) -> dict[str, float]:
    ranked = sorted(amounts.items(), key=lambda kv: kv[1], reverse=True)[:n]
    return {name[:NAME_CHARS]: round(us * scale, 4) for name, us in ranked}


def idle_summary(
    kernels: list[Interval], host: list[Interval], steps: int, top: int = 5
) -> dict[str, Any]:
    """GPU idle time per step between the first and the last kernel, by gap length class
    (:data:`GAP_CLASSES_US`: count and ms per step), with what the host ran meanwhile in gaps
    of 10 µs or more (``host_during_gaps_ms``: per innermost host call, plus ``untraced`` for
    time no recorded call covers, such as Python) and the ``top`` longest gaps (where they start
    in the stretch, the kernels around them, the host calls that overlap them most)."""
    if not kernels:
        return {"kernels": 0}
    kernels = sorted(kernels)
    busy = _merge([(s, e) for s, e, _ in kernels])
    span = busy[-1][1] - busy[0][0]
    busy_us = sum(e - s for s, e in busy)
    per_step = 1e-3 / steps  # µs over the stretch → ms per step
    kernel_starts = [s for s, _, _ in kernels]
    classes = {name: [0, 0.0] for name, _ in GAP_CLASSES_US}
    long_gaps = []
    for (_, prev_end), (start, _) in pairwise(busy):
        length = start - prev_end
        name = next(n for n, limit in GAP_CLASSES_US if limit is None or length < limit)
        classes[name][0] += 1
        classes[name][1] += length
        if length >= GAP_CLASSES_US[0][1]:
            long_gaps.append((prev_end, start))
    during: dict[str, float] = {}
    gaps = []
    for (lo, hi), (by_name, untraced) in zip(
        long_gaps, _host_overlaps(long_gaps, host), strict=True
    ):
        by_name["untraced"] = untraced
        for key, us in by_name.items():
            during[key] = during.get(key, 0.0) + us
        gaps.append((hi - lo, lo, hi, by_name))
    gaps.sort(key=lambda g: g[0], reverse=True)

    def kernel_before(t: float) -> str:  # the last to end before t
        return max((k for k in kernels if k[1] <= t), key=lambda k: k[1])[2][:NAME_CHARS]

    def kernel_after(t: float) -> str:  # the first to start at t
        return kernels[bisect_left(kernel_starts, t)][2][:NAME_CHARS]

    return {
        "kernels": len(kernels) / steps,
        "span_ms": round(span * per_step, 4),
        "busy_ms": round(busy_us * per_step, 4),
        "idle_ms": round((span - busy_us) * per_step, 4),
        "gaps": {
            n: {"count": c / steps, "ms": round(us * per_step, 4)} for n, (c, us) in classes.items()
        },
        "host_during_gaps_ms": _top(during, 12, per_step),
        "longest_gaps": [
            {
                "ms": round(length * 1e-3, 4),
                "at_ms": round((lo - busy[0][0]) * 1e-3, 4),
                "after": kernel_before(lo),
                "before": kernel_after(hi),
                "host_ms": _top(by_name, 3, 1e-3),
            }
            for length, lo, hi, by_name in gaps[:top]
        ],
    }

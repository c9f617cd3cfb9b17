"""GPU idle time from a profiler's events (:mod:`diversedit.timeline`), checked on hand-made
timelines and on the CPU profiler's real events."""

import pytest
import torch
from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, profile

from diversedit.bench import _idle_text
from diversedit.bench.profiling import gpu_timeline
from diversedit.timeline import idle_summary, trace_intervals


def test_idle_time_by_gap_length_and_what_the_host_ran():
    kernels = [
        (0.0, 10.0, "gemm_a"),
        (5.0, 20.0, "gemm_b"),  # overlaps gemm_a: one busy stretch 0–20
        (24.0, 30.0, "triton_poi_c"),  # a 4 µs launch gap
        (80.0, 100.0, "triton_red_d"),  # a 50 µs gap
        (2100.0, 2200.0, "adamw_ema"),  # a 2 ms gap
    ]
    host = [
        (21.0, 23.0, "cudaLaunchKernel"),  # in a gap under 10 µs: not attributed
        (40.0, 60.0, "aten::empty"),
        (100.0, 1100.0, "cudaStreamSynchronize"),
        (600.0, 700.0, "cudaMalloc"),  # another thread, inside the synchronisation
        (1500.0, 2150.0, "cudaLaunchKernel"),  # runs past the gap's end
    ]
    s = idle_summary(kernels, host, steps=2)
    assert s["kernels"] == 2.5 and s["span_ms"] == pytest.approx(1.1)  # per step: 2200 µs / 2
    assert s["busy_ms"] == pytest.approx(0.073) and s["idle_ms"] == pytest.approx(1.027)
    assert s["busy_ms"] + s["idle_ms"] == pytest.approx(s["span_ms"])
    assert s["gaps"] == {
        "under_10us": {"count": 0.5, "ms": 0.002},
        "10us_100us": {"count": 0.5, "ms": 0.025},
        "100us_1ms": {"count": 0.0, "ms": 0.0},
        "over_1ms": {"count": 0.5, "ms": 1.0},
    }
    # host time in the 50 µs and 2 ms gaps, per step; untraced = no host call at all
    during = {"cudaStreamSynchronize": 0.5, "cudaLaunchKernel": 0.3, "untraced": 0.215}
    during |= {"cudaMalloc": 0.05, "aten::empty": 0.01}
    assert s["host_during_gaps_ms"] == pytest.approx(during)
    longest = s["longest_gaps"]
    assert [g["ms"] for g in longest] == [2.0, 0.05]
    assert longest[0] == {
        "ms": 2.0, "at_ms": 0.1, "after": "triton_red_d", "before": "adamw_ema",
        "host_ms": {"cudaStreamSynchronize": 1.0, "cudaLaunchKernel": 0.6, "untraced": 0.4},
    }  # fmt: skip
    assert longest[1]["after"] == "triton_poi_c" and longest[1]["before"] == "triton_red_d"
    assert idle_summary([], host, steps=1) == {"kernels": 0}


def _event(i, name, start, end, device=DeviceType.CUDA, **kw):
    return FunctionEvent(i, name, 1, start, end, device_type=device, use_device="cuda", **kw)


def test_gpu_timeline_reads_kernels_not_annotations():
    step = _event(0, "ProfilerStep#0", 0, 400, is_user_annotation=True)  # spans every kernel
    events = [
        step,
        _event(1, "nvjet_sm90_tst_192x192", 0, 100),
        _event(2, "triton_poi_fused_add_0", 150, 200),
        _event(3, "void at::native::vectorized_elementwise_kernel<4>", 300, 400),
        _event(4, "aten::add", 90, 310, device=DeviceType.CPU),
        _event(5, "cudaLaunchKernel", 100, 140, device=DeviceType.CPU),
    ]
    events[4].append_cpu_child(events[5])  # aten::add is not a leaf; the launch is
    t = gpu_timeline(events, steps=1)
    assert t["kernel_ms"] == pytest.approx(
        {"gemm": 0.1, "compiled": 0.05, "other": 0.1, "total": 0.25}
    )
    idle = t["gpu_idle"]
    assert idle["kernels"] == 3 and idle["idle_ms"] == pytest.approx(0.15)
    during = idle["host_during_gaps_ms"]
    assert during == pytest.approx({"cudaLaunchKernel": 0.04, "untraced": 0.11})
    assert _idle_text({"gpu_idle": idle}) == "  GPU idle 0.1 of 0.4 ms (profiled)"
    assert _idle_text(None) == _idle_text({"top": [], "kernel_ms": {}}) == ""  # CPU profiles


def test_real_profiler_events_read_back():
    """The attributes :func:`trace_intervals` reads exist on this torch's events: CPU
    operators stand in for kernels."""
    x = torch.randn(64, 64, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            (x @ x).relu().sum().backward()
    events = prof.events()
    ops = trace_intervals(events, DeviceType.CPU)
    leaves = trace_intervals(events, DeviceType.CPU, leaves=True)
    assert {"aten::mm", "aten::relu"} <= {name for _, _, name in ops}
    assert "aten::matmul" not in {name for _, _, name in leaves}  # it calls aten::mm
    assert 0 < len(leaves) < len(ops)
    s = idle_summary(ops, leaves, steps=2)
    assert s["busy_ms"] > 0 and s["busy_ms"] + s["idle_ms"] == pytest.approx(s["span_ms"], abs=1e-3)
    assert trace_intervals(events, DeviceType.CUDA) == []

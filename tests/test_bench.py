"""The benchmark runs on the CPU and writes its JSON (timings are recorded, never asserted)."""

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest

from diversedit.__main__ import main
from diversedit.bench import parts as bench_parts
from diversedit.bench import steps as bench_steps
from diversedit.bench import timing as bench_timing
from diversedit.overhead import pool

ROOT = Path(__file__).resolve().parents[1]


def test_bench_cli_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    main(["bench", "--sizes", "tiny", "--variants", "sit,diversedit", "--batch", "2",
          "--steps", "1", "--parts", "train,loss,optimizer,inception",
          "--profile", "--out", str(out)])  # fmt: skip
    report = json.loads(out.read_text())
    rows = report["train_step"]
    assert [r["variant"] for r in rows] == ["sit", "diversedit"]
    assert all(r["images_per_s"] > 0 and r["batch"] == 2 for r in rows)
    assert rows[0]["overhead_vs_sit"] == 0 and "torch" in report["machine"]
    assert all(len(r["step_times_ms"]) == 1 for r in rows)  # every timed step, recorded
    assert rows[0]["overhead_paired"] == 0 and rows[1]["overhead_paired"] == pytest.approx(
        rows[1]["step_times_ms"][0] / rows[0]["step_times_ms"][0] - 1
    )
    assert all(r["overhead_ci95"] is None for r in rows)  # one round: no interval
    (pooled,), skipped = pool([out])  # `diversedit overhead` reads the record back alike
    assert pooled["overhead"] == rows[1]["overhead_paired"] and not skipped
    code = report["machine"]  # the code that was measured: a checkout's commit and dirty flag
    assert len(code["git_commit"]) == 40 and isinstance(code["dirty"], bool)
    assert ("triton" in code) == (importlib.util.find_spec("triton") is not None)
    assert all(r["timing"] == "interleaved" for r in rows)  # the CPU defaults
    assert all(r["dtype"] == "fp32" for r in rows) and report["settings"]["dtype"] == "fp32"
    assert all(r["page_faults"] >= 0 for r in rows)  # per step: host memory kept or not
    # peak tensor memory per variant, on the CPU too: at least the parameters, their gradients,
    # AdamW's two moments and the EMA; the long residuals' weights and the kept features add
    state = [5 * _param_bytes(v) / 2**30 for v in ("sit", "diversedit")]
    assert rows[0]["peak_mem_gib"] > state[0] and rows[1]["peak_mem_gib"] > state[1]
    assert rows[1]["peak_mem_gib"] > rows[0]["peak_mem_gib"]
    assert report["settings"]["keep_freed_memory"] is sys.platform.startswith("linux")
    for r in rows:  # the profile names the matmuls that dominate a step on the CPU
        top = r["profile"]["top"]
        assert top and all(op["self_ms"] >= 0 for op in top)
        assert any("mm" in op["name"] for op in top[:3]), top[:3]
    loss = report["diversity_loss"]
    assert [r["impl"] for r in loss] == ["fused", "autograd", "compiled"]
    assert all(r["fwd_bwd_ms"] > 0 and r["blocks"] == 12 for r in loss)
    assert all(r["profile"]["top"] for r in loss)
    detaches = os.environ.get("TEARDOWN_CUPTI", "1") == "1"  # the profiles' CUPTI teardown
    assert report["settings"]["profile_detaches_cupti"] is detaches
    (update,) = report["optimizer"]
    assert update["params"] > 0 and update["tensors"] > 1
    assert all(v > 0 for k, v in update.items() if k.endswith("_ms")), update
    (inception,) = report["inception"]
    assert inception["images_per_s"] > 0 and inception["weights"].startswith("random init")
    assert report["sampler"] == []


def _param_bytes(variant: str) -> int:
    from diversedit import bench

    model, _ = bench.build("tiny", variant, "cpu")
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_cpu_allocation_peak_counts_what_is_held_at_once():
    """The running sum of the CPU allocator's events: a tensor made before is not counted, a
    freed one stops counting; a step timed alone records its peak as in the round-robin."""
    import torch

    from diversedit import bench

    before = torch.empty(1 << 22)  # 16 MiB held already

    def fn():
        a, b = torch.empty(1 << 20), torch.empty(1 << 21)  # 4 + 8 MiB
        del a
        return b, torch.empty(1 << 18)  # + 1 MiB after 4 were freed

    (_, c), peak = bench.cpu_allocation_peak(fn)
    assert peak == 12 * 2**20 and c.numel() == 1 << 18 and before.numel() == 1 << 22
    alone = bench.bench_train_step("tiny", "sit", bench.StepSettings(batch=2), warmup=1, steps=1)
    assert alone.peak_mem_gib > 5 * _param_bytes("sit") / 2**30


def test_cpu_allocation_peak_ignores_garbage_of_earlier_profiles():
    """A block allocated under an earlier memory profile and left in a reference cycle is
    freed before the window opens, not inside it, where its free would lower the peak."""
    import gc

    import torch

    from diversedit import bench

    class Node:
        pass

    def leave_a_cycle():
        node = Node()
        node.self, node.block = node, torch.empty(1 << 22)  # 16 MiB, garbage once we return

    def fn():
        gc.collect()  # a collection inside the window, as one may start at any allocation
        return torch.empty(1 << 20)

    gc.disable()
    try:
        bench.cpu_allocation_peak(leave_a_cycle)
        _, peak = bench.cpu_allocation_peak(fn)
    finally:
        gc.enable()
    assert peak == 4 * 2**20


def test_records_describe_themselves(tmp_path, capsys, monkeypatch):
    """Warm-up, variants, the sampler's own batch and repeats, CUDA-only fields, the CPU and
    torch's settings from the environment; the sampler is printed too."""
    monkeypatch.setenv("TORCHINDUCTOR_CPP_WRAPPER", "1")
    monkeypatch.setenv("TORCH_HOME_UNRELATED", "x")
    out = tmp_path / "bench.json"
    main(["bench", "--sizes", "tiny", "--variants", "sit,repa", "--batch", "2", "--steps", "1",
          "--parts", "sampler", "--out", str(out)])  # fmt: skip
    report = json.loads(out.read_text())
    settings, machine = report["settings"], report["machine"]
    assert settings["warmup"]["train"] == 3 and settings["warmup"]["sampler"] == 1
    assert settings["gpu_only"] == ["flops_per_step", "mfu", "host_ms"]
    assert settings["mfu_peak_flops"] is settings["mfu_peak_from"] is None  # no MFU on a CPU
    repa = settings["variants"]["repa"]
    assert "repa" in repa["objective"] and "stand-in" in repa["note"]
    assert settings["variants"]["sit"] == {"model": {}, "objective": {}}
    assert machine["cpu"] and machine["cpu_count"] >= machine["cpus_usable"] >= 1
    assert machine["torch_env"].get("TORCHINDUCTOR_CPP_WRAPPER") == "1"
    assert "TORCH_HOME_UNRELATED" not in machine["torch_env"]
    sampler = report["sampler"]
    assert [r["cfg_scale"] for r in sampler] == [1.0, 1.8]
    assert all((r["timed_steps"], r["repeats"], r["batch"]) == (10, 3, 64) for r in sampler)
    assert all((r["precision"], r["tf32"]) == ("fp32", None) for r in sampler)  # CPU: fp32
    assert capsys.readouterr().out.count("sampler SDE fp32") == 2


def test_host_time_is_the_time_to_return(monkeypatch):
    """Each timed call's host time ends when it returns, before the device is waited for; a
    CUDA record keeps its median as ``host_ms`` (a step taking no longer than it was
    host-bound), a CPU record none (there the two are the same)."""
    import time

    from diversedit import bench

    host: list[float] = []
    times = bench_timing.time_calls(lambda: time.sleep(0.002), "cpu", 1, 3, host=host)
    assert len(host) == 3 and all(0.002 <= h <= t for h, t in zip(host, times, strict=True))
    args = ("tiny", "sit")
    steps, faults, launches = [0.05, 0.04, 0.06], [0, 0, 0], [0.01, 0.03, 0.02]
    cuda = bench_steps._result(*args, bench.StepSettings(device="cuda"), steps, None, 1.0, faults,
                         launches)  # fmt: skip
    assert cuda.host_ms == pytest.approx(20.0) and cuda.step_ms == pytest.approx(50.0)
    cpu = bench_steps._result(*args, bench.StepSettings(), steps, None, None, faults, launches)
    assert cpu.host_ms is None


class _Cut(Exception):
    """A run cut short (a part's time limit, the end of a device call)."""


@pytest.mark.parametrize("interleave", [True, False])
def test_timings_are_saved_before_their_profile(interleave, tmp_path, monkeypatch):
    """A run cut short while profiling keeps its timings: a variant's record, with how long it
    took to build and warm up, is on disk before its profile starts; round-robin, every
    variant's is (``make gpu-check``'s question is the timings; its profiles come after)."""
    from diversedit import bench

    out = tmp_path / "bench.json"
    seen: list[dict] = []

    def cut_profile(*_args, **_kwargs):
        seen.extend(json.loads(out.read_text())["train_step"])
        raise _Cut

    monkeypatch.setattr(bench_steps, "profile_step", cut_profile)
    with pytest.raises(_Cut):
        main(["bench", "--sizes", "tiny", "--variants", "sit,diversedit", "--batch", "2",
              "--steps", "2", "--interleave" if interleave else "--no-interleave",
              "--parts", "train", "--profile", "--out", str(out)])  # fmt: skip
    assert [r["variant"] for r in seen] == ["sit", "diversedit"][: 2 if interleave else 1]
    assert all(r["profile"] is None and len(r["step_times_ms"]) == 2 for r in seen)
    assert (seen[-1]["overhead_paired"] is not None) is interleave
    for r in seen:  # build and three warm-up steps, each about as long as a timed one or more
        assert r["ready_s"] * 1e3 > min(r["step_times_ms"])
    line = bench._train_line(dict(seen[0], compiled=True, ready_s=41.6))
    assert "ready in 42 s" in line and "ready" not in bench._train_line(seen[0])


def test_profiles_are_added_to_the_saved_records(tmp_path, monkeypatch, capsys):
    """Profiled one after another, each variant's profile joins its record before the next
    variant is timed, and its GPU idle time is printed on a line of its own."""
    out = tmp_path / "bench.json"
    saved: list[list] = []
    profile = {"top": [], "kernel_ms": {}, "gpu_idle": {"kernels": 9, "idle_ms": 1.25,
                                                        "span_ms": 10.0}}  # fmt: skip

    def fake_profile(*_args, **_kwargs):
        saved.append([r["profile"] for r in json.loads(out.read_text())["train_step"]])
        return profile

    monkeypatch.setattr(bench_steps, "profile_step", fake_profile)
    main(["bench", "--sizes", "tiny", "--variants", "sit,diversedit", "--batch", "2",
          "--steps", "1", "--no-interleave", "--parts", "train", "--profile",
          "--out", str(out)])  # fmt: skip
    assert saved == [[None], [profile, None]]  # diversedit timed after sit's profile
    rows = json.loads(out.read_text())["train_step"]
    assert [r["profile"]["gpu_idle"]["idle_ms"] for r in rows] == [1.25, 1.25]
    printed = capsys.readouterr().out
    assert printed.count("GPU idle 1.2 of 10.0 ms (profiled)") == 2


def test_an_accumulated_step_averages_its_micro_batches(monkeypatch):
    """With ``accum``, a step runs the loss on that many distinct micro-batches, each scaled by
    1/accum as accelerate does, and updates once; its images per second count them all."""
    import torch

    from diversedit import bench

    seen, updates = [], []

    def trained(model):
        return next(p for p in model.parameters() if p.requires_grad)

    def loss_of(network, x0, *args, **kwargs):
        seen.append(x0)
        return trained(network).sum() * 1.0, {}  # d loss / d that parameter: 1

    def fake_update(model, device, impl):
        first = trained(model)
        return torch.optim.SGD(model.parameters()), lambda: updates.append(first.grad.clone())

    monkeypatch.setattr(bench_steps, "compute_loss", loss_of)
    monkeypatch.setattr(bench_steps, "make_update", fake_update)
    step, _ = bench.prepare_train_step("tiny", "sit", bench.StepSettings(batch=2, accum=3))
    step()
    assert len(seen) == 3 and len(updates) == 1
    assert not torch.equal(seen[0], seen[1]) and seen[0].shape[0] == 2
    assert torch.allclose(updates[0], torch.ones_like(updates[0]))  # mean of three, not sum
    with pytest.raises(ValueError, match="accum must be >= 1, got 0"):
        bench.StepSettings(accum=0)
    settings = bench.StepSettings(batch=2, accum=3)
    result = bench_steps._result("tiny", "sit", settings, [0.5], None, None, [0], [0.5])
    assert result.images_per_s == pytest.approx(12.0) and result.accum == 3


def test_bench_cli_times_accumulated_steps(tmp_path, capsys):
    """``--accum`` reaches the timed step, the record (settings and result) and the printed
    line."""
    out = tmp_path / "bench.json"
    main(["bench", "--sizes", "tiny", "--variants", "sit", "--batch", "2", "--accum", "2",
          "--steps", "1", "--parts", "train", "--out", str(out)])  # fmt: skip
    report = json.loads(out.read_text())
    (result,) = report["train_step"]
    assert report["settings"]["accum"] == 2 and (result["batch"], result["accum"]) == (2, 2)
    assert result["images_per_s"] == pytest.approx(4e3 / result["step_ms"])
    assert "(2 × 2)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989),  # SXM
        ("NVIDIA H100 PCIe", 756),
        ("NVIDIA H100 NVL", 835),
        ("NVIDIA H200", 989),
        ("NVIDIA H200 NVL", 835),
        ("NVIDIA GH200 480GB", 989),
        ("NVIDIA A100-SXM4-80GB", 312),
        ("NVIDIA A100 80GB PCIe", 312),
        ("NVIDIA B200", 2250),
        ("NVIDIA L40S", 362),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_mfu_peak_by_gpu_name(name, tflops):
    """Each board's dense bf16 peak: an H100 PCIe or NVL is not reckoned against the SXM's."""
    from diversedit.bench import bf16_peak

    assert bf16_peak(name) == (tflops and pytest.approx(tflops * 1e12))


def test_mfu_is_reckoned_against_the_settings_peak(monkeypatch):
    """MFU = FLOPs per step / median step time / the settings' peak; none without a peak, and
    a CUDA step's peak comes from its GPU's name unless given."""
    import torch

    from diversedit import bench

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a GPU the name can't tell
    steps = [0.05, 0.04, 0.06]
    given = bench.StepSettings(device="cuda", peak_flops=1e12)
    result = bench_steps._result("tiny", "sit", given, steps, 1e10, None, [0, 0, 0], steps)
    assert result.mfu == pytest.approx(1e10 / 0.05 / 1e12)
    assert bench_steps._result("tiny", "sit", bench.StepSettings(device="cuda"), steps, 1e10, None,
                         [0, 0, 0], steps).mfu is None  # fmt: skip
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert bench.StepSettings(device="cuda").peak_flops == pytest.approx(756e12)
    assert bench.StepSettings(device="cuda", peak_flops=5e14).peak_flops == 5e14
    assert bench.StepSettings(device="cpu").peak_flops is None


@pytest.mark.parametrize(
    ("given", "peak", "source"),
    [(None, 756e12, "the GPU's name"), (500.0, 500e12, "--peak-tflops")],
)
def test_records_say_what_mfu_is_reckoned_against(given, peak, source, capsys, monkeypatch):
    """A CUDA record names its MFU's peak and where it came from (nothing is timed: no parts);
    a GPU the table lacks, given no peak, is told how to give one."""
    import torch

    from diversedit import bench

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    kw = dict(device="cuda", batch=2, dtype=None, compile_model=False, out=None, parts=[])
    settings = bench.run(["tiny"], ["sit"], peak_tflops=given, **kw)["settings"]
    assert (settings["mfu_peak_flops"], settings["mfu_peak_from"]) == (pytest.approx(peak), source)
    assert "MFU left out" not in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L4")
    settings = bench.run(["tiny"], ["sit"], peak_tflops=given, **kw)["settings"]
    if given is None:
        assert settings["mfu_peak_flops"] is settings["mfu_peak_from"] is None
        assert "no dense bf16 peak known for 'NVIDIA L4' (give it with --peak-tflops)" in (
            capsys.readouterr().out
        )
    else:
        assert settings["mfu_peak_flops"] == pytest.approx(peak)


def test_profiles_detach_cupti_when_they_end(monkeypatch):
    """A profile ends with ``TEARDOWN_CUPTI=1`` (Kineto then detaches CUPTI, which otherwise
    can slow every step timed after it in the process), left set for the process; a value the
    user (or torch) chose is kept and recorded with the machine."""
    import torch

    from diversedit import bench

    seen = []
    real_exit = torch.profiler.profile.__exit__

    def exit_spy(self, *args):
        seen.append(os.environ.get("TEARDOWN_CUPTI"))
        return real_exit(self, *args)

    monkeypatch.setattr(torch.profiler.profile, "__exit__", exit_spy)
    monkeypatch.setenv("TEARDOWN_CUPTI", "")  # so that the test's end restores its absence
    monkeypatch.delenv("TEARDOWN_CUPTI")
    assert bench.profile_step(lambda: torch.ones(4).sum(), "cpu", steps=1)["top"]
    assert seen == ["1"] and os.environ["TEARDOWN_CUPTI"] == "1"
    monkeypatch.setenv("TEARDOWN_CUPTI", "0")
    bench.profile_step(lambda: torch.ones(4).sum(), "cpu", steps=1)
    assert seen == ["1", "0"] and os.environ["TEARDOWN_CUPTI"] == "0"
    assert bench.machine()["torch_env"]["TEARDOWN_CUPTI"] == "0"


def test_compiled_sampler_bench_times_it_against_eager(monkeypatch, capsys):
    """``bench --compile --parts sampler``: the network ``diversedit sample --compile`` makes
    timed round-robin with the eager one over ``--steps`` rounds; the record holds both and
    the per-round speed-up with its interval, and the table says so. Each size starts on an
    empty graph cache (torch stops compiling a function after 8 graphs)."""
    import statistics

    import torch

    from diversedit import bench

    compiled, calls, resets = [], [], []

    def compile_(model, **kwargs):
        compiled.append(kwargs)
        return ("compiled", model)

    def sampler(model, z, y, **kwargs):
        calls.append("compiled" if isinstance(model, tuple) else "eager")
        return z

    monkeypatch.setattr(torch, "compile", compile_)
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    monkeypatch.setattr(bench_parts, "euler_maruyama_sampler", sampler)
    rounds = 6
    report = bench.run(
        ["tiny", "S/8"], ["sit"], device="cpu", batch=2, dtype=None, compile_model=True,
        out=None, parts=["sampler"], steps=rounds,
    )  # fmt: skip
    assert compiled == [{"dynamic": False}] * 4 and len(resets) == 2  # 2 sizes, 2 cfg scales
    warmup = ["eager"] * bench.WARMUP["sampler"] + ["compiled"] * bench.WARMUP["sampler"]
    assert calls == (warmup + ["eager", "compiled"] * rounds) * 4
    for r, scale in zip(report["sampler"], (1.0, 1.8) * 2, strict=True):
        assert (r["compiled"], r["cfg_scale"], r["repeats"]) == (True, scale, rounds)
        times = r["round_times_ms"]
        ratios = [e / c for e, c in zip(times["eager"], times["compiled"], strict=True)]
        assert r["speedup_paired"] == pytest.approx(statistics.median(ratios))
        assert r["eager_sde_step_ms"] == pytest.approx(statistics.median(times["eager"]) / 10)
        assert r["speedup_ci95"] is not None  # six rounds are the fewest with a 95% interval
    out = capsys.readouterr().out
    assert out.count("sampler SDE fp32 compiled") == 4 and out.count("over eager (95% ×") == 4


@pytest.mark.parametrize(("precision", "tf32"), [("fp32", False), ("bf16", True)])
def test_sampler_bench_runs_the_network_as_sampling_does(monkeypatch, precision, tf32):
    """The timed sampler sees the autocast and TF32 switches that ``diversedit sample`` sets for
    the same settings, and the switches are given back afterwards."""
    import torch

    from diversedit import bench

    seen = []

    def sampler(model, z, y, **kwargs):
        flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), *flags))
        return z

    monkeypatch.setattr(bench_parts, "euler_maruyama_sampler", sampler)
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    r = bench.bench_sampler("tiny", batch=2, precision=precision, tf32=tf32, steps=1)
    autocast = (True, torch.bfloat16) if precision == "bf16" else (False,)
    assert seen and all(s[: len(autocast)] == autocast and s[2:] == (tf32, tf32) for s in seen)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    assert (r["precision"], r["tf32"]) == (precision, None)  # TF32 is recorded on CUDA only


@pytest.mark.triton_interpreted
def test_bench_times_steps_with_the_triton_statistics(tmp_path, monkeypatch):
    """``--diversity-triton``: the steps run the Triton kernels (interpreted here) and say so;
    where they cannot run, the command stops before building anything."""
    import diversedit.losses.diversity_triton as kernels

    for name, tile in (("BLOCK_M", 128), ("BLOCK_D", 256), ("ROWS", 128)):  # few, large
        monkeypatch.setattr(kernels, name, tile)  # programs: the interpreter runs each alone
    out = tmp_path / "bench.json"
    args = ["bench", "--sizes", "tiny", "--variants", "diversity", "--batch", "2", "--steps",
            "1", "--parts", "train", "--diversity-triton", "--out", str(out)]  # fmt: skip
    main(args)
    (row,) = json.loads(out.read_text())["train_step"]
    assert row["diversity_triton"] and row["images_per_s"] > 0
    monkeypatch.delenv("TRITON_INTERPRET")
    out.unlink()
    with pytest.raises(SystemExit, match="--diversity-triton needs a CUDA device"):
        main(args)
    assert not out.exists()


@pytest.mark.parametrize(
    "update", ["compiled", pytest.param("triton", marks=pytest.mark.triton_interpreted)]
)
def test_bench_times_the_fused_update(update, tmp_path, monkeypatch, capsys):
    """``--update compiled|triton``: the steps take the fused update and the optimizer part
    times it next to the library update. Both run the eager function here (on the CPU
    torch.compile takes minutes for the tiny model's 132 tensors and Triton's interpreter
    about ten seconds per update; tests/test_update.py checks both for real). Where the
    kernels cannot run, the command stops before building anything."""
    import torch

    import diversedit.update_triton as kernels
    from diversedit.update import _foreach_update

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn.__name__) or fn)
    monkeypatch.setattr(
        kernels.TritonUpdate, "__call__", lambda self, *a, **kw: compiled.append("triton")
        or _foreach_update(*a, **kw)
    )  # fmt: skip
    out = tmp_path / "bench.json"
    args = ["bench", "--sizes", "tiny", "--variants", "sit", "--batch", "2", "--steps", "1",
            "--parts", "train,optimizer", "--update", update, "--out", str(out)]  # fmt: skip
    main(args)
    report = json.loads(out.read_text())
    (row,) = report["train_step"]
    assert row["update"] == report["settings"]["update"] == update
    (timed,) = report["optimizer"]
    assert timed[f"{update}_update_ms"] > 0 and timed["update_ms"] > 0
    assert timed[f"{update}_update_first_call_s"] > 0 and timed["update"] == update
    assert re.search(
        rf"tiny update [0-9.]+ ms \({update} [0-9.]+ ms\): AdamW", capsys.readouterr().out
    )
    name = {"compiled": "_foreach_update", "triton": "triton"}[update]
    assert compiled == [name] * len(compiled) and len(compiled) >= 2  # steps, optimizer part
    if update == "triton":
        monkeypatch.delenv("TRITON_INTERPRET")
        out.unlink()
        with pytest.raises(SystemExit, match="--update triton needs a CUDA device"):
            main(args)
        assert not out.exists()


@pytest.mark.parametrize(
    "flag",
    [
        ["--parts", "train,speed"],
        ["--compile-mode", "fastest"],
        ["--compile-scope", "layers"],
        ["--update", "apex"],
    ],
)
def test_bench_cli_rejects_unknown_choices(flag, tmp_path):
    out = tmp_path / "bench.json"
    with pytest.raises(SystemExit, match="diversedit bench: unknown"):
        main(["bench", "--sizes", "tiny", "--out", str(out), *flag])
    assert not out.exists()


def test_kernel_classes():
    from diversedit.bench.profiling import kernel_class

    assert kernel_class("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n") == "gemm"
    assert kernel_class("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT") == "gemm"
    assert kernel_class("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits>") == (
        "attention"
    )
    assert kernel_class("void at::native::(anonymous)::fused_adamw_kernel") == "optimizer"
    assert kernel_class("grad_squares") == kernel_class("adamw_ema") == "optimizer"  # Triton
    assert kernel_class("block_grads") == kernel_class("column_sums") == "diversity"
    assert kernel_class("triton_per_fused_add_mul_native_layer_norm_3") == "compiled"
    assert kernel_class("void at::native::vectorized_elementwise_kernel<4>") == "other"


def test_median_interval_order_statistics_and_coverage():
    """The distribution-free interval of the median: the textbook ranks, and at least 95%
    coverage of a known median in simulation (a wrong rank fails one or the other)."""
    import random

    from diversedit.overhead import median_ci, paired_overhead

    assert median_ci(range(5)) is None  # even the extremes cover only 93.75%
    assert median_ci(range(6)) == (0, 5)
    assert median_ci(range(12)) == (2, 9)  # 3rd and 10th of 12
    assert median_ci(list(range(100))[::-1]) == (39, 60)  # 40th and 61st of 100, any order
    rng = random.Random(0)
    for n in (6, 9, 15, 40):
        covered = 0
        for _ in range(2000):
            lo, hi = median_ci([rng.expovariate(1.0) for _ in range(n)])
            covered += lo <= 0.6931471805599453 <= hi  # the median of Exp(1): ln 2
        assert 0.945 <= covered / 2000 <= 0.995, (n, covered)
    # paired by round: a machine that runs every third round 50% slower moves both alike
    base = [100.0, 100.0, 150.0] * 4
    median, (lo, hi) = paired_overhead([1.1 * b for b in base], base)
    assert median == pytest.approx(0.1) and lo == pytest.approx(0.1) and hi == pytest.approx(0.1)
    with pytest.raises(ValueError):
        paired_overhead([1.0, 2.0], [1.0])


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        (["--sizes", "tiny,Q/2"], "unknown bench sizes ['Q/2']; choose from tiny, S/1, S/2"),
        (["--variants", "sit,fast"], "unknown bench variants ['fast']; choose from sit, long_skip"),
        (["--parts", "loss,speed"], "unknown bench parts ['speed']; choose from train, loss"),
        (["--device", "gpu"], "--device gpu: not a device; choose cpu, cuda or cuda:N"),
        (["--device", "cuda"], "--device cuda: no CUDA device is available"),
        (["--peak-tflops", "989"], "--peak-tflops: MFU is measured on CUDA only, not on cpu"),
        (["--peak-tflops", "0"], "--peak-tflops must be a positive number, got 0.0"),
        (["--peak-tflops", "nan"], "--peak-tflops must be a positive number, got nan"),
        (["--accum", "0"], "--accum must be >= 1, got 0"),
        (["--out", "/proc/none/b.json"], "--out /proc/none/b.json: "),  # not after the timing
    ],
)
def test_bench_cli_checks_every_value_before_timing(flag, message, tmp_path, capsys, monkeypatch):
    """Every size, variant, part and the device are checked before the first measurement:
    one error line, exit status 2, no JSON (``tiny`` would be timed and written first)."""
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # as on a machine without GPU
    out = tmp_path / "bench.json"
    with pytest.raises(SystemExit) as err:
        main(["bench", "--sizes", "tiny", "--parts", "loss", "--steps", "1", "--batch", "2",
              "--out", str(out), *flag])  # fmt: skip
    assert err.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith(f"error: diversedit bench: {message}") and stderr.count("\n") == 1
    assert not out.exists()


def test_bench_run_checks_options_before_building(tmp_path, monkeypatch):
    """The library entry refuses a bad device or a CUDA index beyond the machine's count."""
    import torch

    from diversedit.bench import check_options, run

    out = tmp_path / "bench.json"
    with pytest.raises(ValueError, match="--device gpu: not a device"):
        run(["tiny"], ["sit"], device="gpu", batch=2, dtype=None, compile_model=False, out=out)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"--device cuda:1: only 1 CUDA device\(s\) are"):
        check_options(["loss"], "default", device="cuda:1")
    assert not out.exists()


def test_bench_refuses_to_interleave_more_state_than_memory(tmp_path, capsys, monkeypatch):
    """Variants timed round-robin are all built at once: when their training state alone
    (5 float32 copies of the parameters) exceeds the available memory, the command says so
    and how to time them, exit status 2, before the first size is timed."""
    from diversedit import bench

    assert bench.training_state_bytes("tiny", "diversedit") == 5 * _param_bytes("diversedit")
    xl = sum(bench.training_state_bytes("XL/2", v) for v in ("sit", "diversedit")) / 2**30
    assert 25 < xl < 27  # 675M + 712M parameters, counted without allocating them
    assert bench.available_memory("cpu") is None or bench.available_memory("cpu") > 0
    monkeypatch.setattr(bench, "available_memory", lambda device: 2**30)
    need = sum(bench.training_state_bytes("S/2", v) for v in ("sit", "diversedit")) / 2**30
    out = tmp_path / "bench.json"
    with pytest.raises(SystemExit) as err:  # tiny's 0.3 GiB fits, S/2's 1.3 GiB does not
        main(["bench", "--sizes", "tiny,S/2", "--variants", "sit,diversedit", "--parts",
              "train", "--steps", "1", "--batch", "2", "--out", str(out)])  # fmt: skip
    assert err.value.code == 2 and not out.exists()
    assert capsys.readouterr().err == (
        f"error: diversedit bench: --interleave: 2 S/2 variants built at once hold at least "
        f"{need:.1f} GiB of training state (float32 parameters, gradients, AdamW moments, EMA) "
        "and cpu has 1.0 GiB available; time them one after another (--no-interleave) or "
        "fewer variants per run\n"
    )
    check = partial(bench.check_options, ["train"], "default", sizes=["XL/2"])
    check(variants=["sit", "diversedit"], interleave=False)  # one at a time
    check(variants=["sit"])  # one variant
    bench.check_options(["loss"], "default", sizes=["XL/2"], variants=["sit", "diversedit"])


def test_optimizer_bench_holds_one_update_state_at_a_time():
    """The optimizer part holds about five parameter-sized copies at most (parameters,
    gradients, one update's AdamW moments and EMA), so XL/2 fits a 24 GiB CPU machine; it
    held ten, and XL/2 was killed there."""
    from diversedit import bench

    copy = bench.training_state_bytes("tiny", "sit") / 5
    _, peak = bench.cpu_allocation_peak(lambda: bench.bench_optimizer("tiny", steps=1))
    assert 4.5 * copy < peak < 6 * copy


def _gpu_check_recipe() -> tuple[list[str], list[str]]:
    """The Makefile's benchmark command (after the interpreter) and ``gpu-check``'s lines."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    bench = shlex.split(
        re.search(r"^BENCH\s*:?=\s*\$\(GPU_PY\) -m diversedit (.*)$", text, re.M)[1]
    )
    defaults = re.search(r"^DEFAULTS\s*:?=\s*(.*)$", text, re.M)[1]
    recipe = text[text.index("\ngpu-check:\n") :].split("\n\n")[0].splitlines()[2:]
    return bench, [line.strip().replace("$(DEFAULTS)", defaults) for line in recipe]


def test_gpu_check_commands_parse(tmp_path, monkeypatch):
    """Every ``make gpu-check`` benchmark passes the command line's checks (a renamed flag would
    waste a GPU session's few minutes): parsed here with a pretend CUDA device, nothing timed."""
    import torch

    from diversedit import bench

    base, recipe = _gpu_check_recipe()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(bench, "triton_runs_on", lambda device: True)
    monkeypatch.setattr(bench, "available_memory", lambda device: 79 * 2**30)  # an H100's free
    calls = []
    monkeypatch.setattr(bench, "run", lambda *args, **kwargs: calls.append((args, kwargs)))
    lines = [line for line in recipe if "$(BENCH)" in line]
    for line in lines:
        rest = shlex.split(line.split("$(BENCH)", 1)[1].replace("$(GPU_OUT)", str(tmp_path)))
        main([*base, *rest])
    assert len(calls) == len(lines) >= 3
    assert all(kwargs["device"] == "cuda" and kwargs["batch"] in (32, 64) for _, kwargs in calls)
    assert {kwargs["update"] for _, kwargs in calls} == {"triton"}  # the trainer's bf16 default
    assert {kwargs["compile_mode"] for _, kwargs in calls} == {"default", "reduce-overhead"}
    assert calls[0][1]["interleave"] is True  # the long-skip question, in paired rounds
    # session 15's sequential profiled timing again, its profiles now detaching CUPTI
    assert calls[1][1]["interleave"] is False and calls[1][1]["profile"] is True


def test_gpu_check_test_selections_collect_tests():
    """``make gpu-check``'s pytest selections each pick CUDA tests (collected, not run, here)."""
    selections = [line for line in _gpu_check_recipe()[1] if " -m pytest " in line]
    assert len(selections) == 2
    for line in selections:
        args = shlex.split(line.split(" -m pytest ", 1)[1].split(" 2>&1")[0])
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "--collect-only", *args],  # args hold one -q
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        tests = re.findall(r"^tests/test_\w+\.py::\S+", done.stdout, re.M)
        assert done.returncode == 0 and tests, done.stdout[-2000:]

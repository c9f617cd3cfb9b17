"""Throughput benchmarks, JSON out, no assertions: training steps per variant, the diversity
loss alone (per implementation), the parameter update (AdamW, clipping, EMA), the SDE sampler
and Inception feature extraction.

Run ``diversedit bench --device cuda --sizes S/2,B/2,XL/2`` on a GPU node (or ``--sizes tiny``
on a CPU). Each measurement is the median over timed repeats after warm-up, with the machine's
description recorded beside it.

Modules: :mod:`.steps` (training steps per variant, timed alone or round-robin), :mod:`.parts`
(the diversity loss, the parameter update, the sampler and Inception alone), :mod:`.timing`,
:mod:`.profiling` and :mod:`.machine`; here the options' checks and :func:`run`, which writes
the record.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from itertools import product
from pathlib import Path
from typing import Any

import torch

from ..config import COMPILE_MODES, COMPILE_SCOPES, UPDATES
from ..files import atomic_write_bytes
from ..host_memory import keep_freed_memory
from ..models import MODEL_NAMES
from ..overhead import paired_overhead
from ..triton_support import triton_runs_on
from .machine import machine
from .parts import (
    LOSS_IMPLS,
    SAMPLER_BATCH,
    SAMPLER_NUMERICS,
    SAMPLER_REPEATS,
    SAMPLER_TIMED_STEPS,
    bench_diversity_loss,
    bench_inception,
    bench_optimizer,
    bench_sampler,
)
from .profiling import profile_step
from .steps import (
    VARIANTS,
    StepResult,
    StepSettings,
    bench_train_step,
    bench_train_steps_interleaved,
    bf16_peak,
    build,
    prepare_train_step,
    training_state_bytes,
)
from .timing import WARMUP, available_memory, cpu_allocation_peak

__all__ = [
    "DEFAULT_PARTS", "LOSS_IMPLS", "PARTS", "SIZES", "VARIANTS", "WARMUP", "StepResult",
    "StepSettings", "bench_diversity_loss", "bench_inception", "bench_optimizer", "bench_sampler",
    "bench_train_step", "bench_train_steps_interleaved", "bf16_peak", "build", "check_options",
    "cpu_allocation_peak", "machine", "prepare_train_step", "profile_step", "run",
]  # fmt: skip

PARTS = ("train", "loss", "optimizer", "sampler", "inception")
DEFAULT_PARTS = ("train", "loss", "sampler", "inception")  # optimizer: its compiled update
# takes minutes to build on a CPU
GPU_ONLY = ("flops_per_step", "mfu", "host_ms")  # null on a CPU
SIZES = ("tiny", *(name.removeprefix("SiT-") for name in MODEL_NAMES))  # tiny, S/1 … XL/8


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


def _loss_line(r: dict[str, Any]) -> str:
    return f"{r['size']:>5} diversity loss {r['impl']:>9} {r['fwd_bwd_ms']:8.2f} ms"


def _update_line(r: dict[str, Any]) -> str:
    fused = r.get(f"{r['update']}_update_ms")
    fused = f" ({r['update']} {fused:.2f} ms)" if fused is not None else ""
    return (
        f"{r['size']:>5} update {r['update_ms']:.2f} ms{fused}: AdamW {r['adamw_step_ms']:.2f} ms, "
        f"clip {r['clip_grad_norm_ms']:.2f} ms, EMA {r['ema_lerp_ms']:.2f} ms"
    )


def _sampler_line(r: dict[str, Any]) -> str:
    numerics = r["precision"]
    if r["precision"] == "fp32" and r["tf32"] is not None:  # CUDA float32: TF32 or IEEE
        numerics += " TF32" if r["tf32"] else " IEEE"
    ci = r.get("speedup_ci95")
    return (
        f"{r['size']:>5} sampler SDE {numerics}{' compiled' * r['compiled']} "
        f"cfg {r['cfg_scale']:.1f} {r['images_per_s_250_steps']:9.3f} img/s at 250 steps "
        f"({r['sde_step_ms']:.1f} ms per step, batch {r['batch']})"
        + (f"; ×{r['speedup_paired']:.2f} over eager" if r["compiled"] else "")
        + (f" (95% ×{ci[0]:.2f}..×{ci[1]:.2f})" if ci else "")
    )


def _inception_line(r: dict[str, Any]) -> str:
    return f"inception {r['images_per_s']:9.1f} img/s ({r['weights']})"


# The printed line of each part's record (training steps: :func:`_train_line`).
LINES = {
    "diversity_loss": _loss_line, "optimizer": _update_line, "sampler": _sampler_line,
    "inception": _inception_line,
}  # fmt: skip


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
    the CPU, freed memory stays in the process as in CPU training (:mod:`..host_memory`).
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

    def add(part: str, r: dict[str, Any]) -> None:
        report[part].append(r)
        print(LINES[part](r), flush=True)
        save()

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
            add("diversity_loss", bench_diversity_loss(
                size, impl, device=device, batch=batch, dtype=dtype, steps=steps, profile=profile
            ))  # fmt: skip
        if "optimizer" in parts:
            add("optimizer", bench_optimizer(size, device=device, steps=steps, update=update))
        # the CPU, and compiled sampling (a compilation per setting): the default numerics only
        all_numerics = device.startswith("cuda") and not compile_model
        for (precision, tf32), scale in product(
            SAMPLER_NUMERICS if all_numerics else SAMPLER_NUMERICS[:1],
            (1.0, 1.8) if "sampler" in parts else (),
        ):
            add("sampler", bench_sampler(
                size, device=device, cfg_scale=scale, precision=precision, tf32=tf32,
                compiled=compile_model, rounds=steps,
            ))  # fmt: skip
    if "inception" in parts:
        add("inception", bench_inception(device=device, batch=settings["inception_batch"],
                                         batches=steps))  # fmt: skip
    return report

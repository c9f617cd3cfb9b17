"""Kept freed memory on the CPU: a training step stops paying page faults for its temporaries."""

import os
import subprocess
import sys

import pytest

from diversedit.host_memory import OPT_OUT, USER_KEYS, keep_freed_memory

FAULTS = """
import resource, sys, torch
from diversedit.host_memory import keep_freed_memory
kept = sys.argv[1] == "kept" and keep_freed_memory()
torch.set_num_threads(1)
{setup}
for _ in range({warmup}):  # the heap grows to its working size
    {call}
faults = []
for _ in range({calls}):  # the median call: a one-off growth of the heap is not the point
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    {call}
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, sorted(faults)[len(faults) // 2])
"""
STEP = """
from diversedit.bench import StepSettings, prepare_train_step
step, _ = prepare_train_step("tiny", "diversedit", StepSettings(batch=8, dtype="fp32"))
"""
# A temporary above glibc's largest mmap threshold (32 MiB): the diversity loss's stacked
# features from SiT-S/2 at batch 8 up (12 blocks of 8 × 256 × 384 float32 are 36 MiB). glibc
# 2.36 pads 64-byte aligned requests, so a freed block of the same size is not reused until it
# merges with a neighbour: the heap grows by a few blocks first (1–8 calls seen here), then
# stops; a heap that kept growing fails this.
LARGE = "x = torch.ones(12, 2048, 384)"
# A step's heap still grows now and then after its third call (a few hundred faults in one of
# three to five calls, seen here), so its median is taken over nine calls after six. With glibc's
# defaults its faults vary from process to process (480 to 9,700 seen, as the heap's layout
# decides what is trimmed), so only the 36 MiB temporary, always mmapped, has a floor for them.
CASES = {"tiny_step": (STEP, "step()", 6, 9), "36MiB": (LARGE, "x * 2", 20, 9)}
DEFAULT_FLOOR = {"tiny_step": 1, "36MiB": 9000}  # 36 MiB are 9,216 pages
KEPT_CEILING = 50  # pages: 200 KiB, a tenth of the fewest faults a default step had


def _faults(setup: str, call: str, warmup: int, calls: int) -> dict[str, tuple[bool, int]]:
    """Median page faults of ``calls`` calls after ``setup`` and ``warmup`` calls, in fresh
    processes with glibc's defaults and with kept memory, and whether the setting applied."""
    script = FAULTS.format(setup=setup, call=call, warmup=warmup, calls=calls)
    env = {k: v for k, v in os.environ.items() if k not in (*USER_KEYS, OPT_OUT)}
    faults = {}
    for mode in ("default", "kept"):
        out = subprocess.run(
            [sys.executable, "-c", script, mode], env=env, capture_output=True, text=True,
            check=True,
        ).stdout.split()  # fmt: skip
        faults[mode] = (out[-2] == "True", int(out[-1]))
    return faults


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
@pytest.mark.parametrize("case", CASES)
def test_kept_memory_removes_the_page_faults(case):
    faults = _faults(*CASES[case])
    (_, default), (applied, kept) = faults["default"], faults["kept"]
    assert applied
    assert default >= DEFAULT_FLOOR[case], faults  # glibc returned temporaries to the kernel
    assert kept <= min(KEPT_CEILING, default / 10), faults


def test_user_settings_win(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert keep_freed_memory() is False
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv(OPT_OUT, "0")
    assert keep_freed_memory() is False

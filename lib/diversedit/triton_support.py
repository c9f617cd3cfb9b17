"""What the Triton kernels share: where they run (and are on by default), tables of addresses.

The kernels (:mod:`.losses.diversity_triton`, :mod:`.update_triton`) read many tensors in place
through a device table of their addresses instead of stacking or flattening them first. Both
import this module, which mends the CPU interpreter of Triton before 3.7 when it is on.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

import torch
from torch import Tensor


def triton_runs_on(device: torch.device) -> bool:
    """Whether the Triton kernels can run on ``device``: CUDA, or any device with Triton's CPU
    interpreter on (``TRITON_INTERPRET=1`` before Triton is imported; how the tests run them)."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _triton_gpu(device: torch.device, capability: tuple[int, int]) -> bool:
    """A CUDA device of at least ``capability``, with Triton installed."""
    return (
        device.type == "cuda"
        and torch.cuda.get_device_capability(device) >= capability
        and importlib.util.find_spec("triton") is not None
    )


def compile_default_on(device: torch.device) -> bool:
    """Whether ``torch.compile`` is on by default (``precision.compile`` left ``null``, and
    sampling): CUDA devices whose Triton kernels Inductor supports (compute capability 7.0+),
    with Triton installed; off on the CPU, where compiling costs more than it saves for short
    runs."""
    return _triton_gpu(device, (7, 0))


def triton_default_on(device: torch.device) -> bool:
    """Whether the Triton kernels are on by default (``precision.diversity_triton`` and
    ``precision.update`` left ``null``): a CUDA device of compute capability 8.0+ (the
    Triton-supported GPUs; they were timed on an H200, NOTES entry 28) with Triton installed."""
    return _triton_gpu(device, (8, 0))


def device_table(rows: Sequence[Sequence[int]], device: torch.device) -> Tensor:
    """``rows`` (e.g. ``data_ptr()`` values) as an int64 tensor on ``device``, copied without a
    host sync (pinned memory, non-blocking)."""
    host = torch.tensor(rows, dtype=torch.int64, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


def _mend_interpreter() -> None:
    """Triton's interpreter before 3.7 (torch 2.11 pins 3.6) makes a Python index of a scalar
    with ``int(array)``, which NumPy 2.4 refuses for the one-element arrays scalars are there,
    so any loop whose bounds are read from memory fails; give every interpreter 3.7's squeeze
    (what 3.7 and later do anyway). Compiled kernels are not concerned."""
    if os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None:
        return
    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None:
        return

    def index(self) -> int:
        return int(self.handle.data.squeeze())

    def mended(tensor, *scope) -> None:  # 3.6 passes a scope that restores what it patched
        patch(tensor, *scope)
        if scope:
            scope[0].set_attr(tensor, "__index__", index)
        else:
            tensor.__index__ = index

    interpreter._patch_lang_tensor = mended


_mend_interpreter()

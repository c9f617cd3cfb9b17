"""What the Triton kernels share: where they can run, and tables of tensor addresses.

The kernels (:mod:`.losses.diversity_triton`, :mod:`.update_triton`) read many tensors in place
through a device table of their addresses instead of stacking or flattening them first.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor


def triton_runs_on(device: torch.device) -> bool:
    """Whether the Triton kernels can run on ``device``: CUDA, or any device with Triton's CPU
    interpreter on (``TRITON_INTERPRET=1`` before Triton is imported; how the tests run them)."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def device_table(rows: Sequence[Sequence[int]], device: torch.device) -> Tensor:
    """``rows`` (e.g. ``data_ptr()`` values) as an int64 tensor on ``device``, copied without a
    host sync (pinned memory, non-blocking)."""
    host = torch.tensor(rows, dtype=torch.int64, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)

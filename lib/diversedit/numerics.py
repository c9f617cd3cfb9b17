"""Process-wide arithmetic switches, set for a region and given back afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["allow_tf32"]


@contextmanager
def allow_tf32(enabled: bool) -> Iterator[None]:
    """TF32 tensor cores for float32 matmuls and cuDNN convolutions on CUDA inside the region
    (``enabled``), or IEEE float32 arithmetic; the previous switches are restored on exit, also
    after an error. The switches are process-wide, so a region does not depend on what ran
    before it (the trainer sets them from ``precision.allow_tf32``). No effect on other devices."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

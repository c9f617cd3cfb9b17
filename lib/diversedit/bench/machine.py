"""What a record says of the machine: hardware, versions, the code's revision and torch's
environment settings."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

from ..files import git_revision, usable_cpus


def _cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# Environment variables that change how torch compiles, allocates or profiles
# (``TORCHINDUCTOR_CPP_WRAPPER`` and the like): recorded with the machine, since they change the
# timings but no flag shows them.
TORCH_ENV = (
    "TORCHINDUCTOR_", "TORCHDYNAMO_", "TORCH_COMPILE", "PYTORCH_CUDA_ALLOC_CONF", "TEARDOWN_CUPTI",
)  # fmt: skip


def machine() -> dict[str, Any]:
    """Hardware and versions (Triton's where installed), the code's git revision (commit,
    uncommitted changes) and the torch settings made in the environment (:data:`TORCH_ENV`)."""
    info = git_revision() | {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable_cpus(),
        "threads": torch.get_num_threads(),
        "torch_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(TORCH_ENV)},
    }
    try:  # the Triton kernels' code depends on its version
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info

"""Atomic checkpoints: write to a temporary file, flush, fsync, rename; keep the last K.

A checkpoint is one ``step_XXXXXXXX.pt`` file. Loading walks from the newest to the oldest and
skips (with a warning) any file that cannot be read, so a write interrupted by a node failure
never costs more than the interval since the previous checkpoint.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from .files import atomic_write

NAME = re.compile(r"step_(\d{8})\.pt$")
REQUIRED = ("model", "ema", "optimizer", "step")


def checkpoint_path(directory: Path, step: int) -> Path:
    return directory / f"step_{step:08d}.pt"


def save_checkpoint(directory: Path, step: int, state: dict[str, Any]) -> Path:
    """Write ``state`` for ``step`` atomically; returns the final path."""
    final = atomic_write(checkpoint_path(directory, step), lambda f: torch.save(state, f))
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return final


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint file, oldest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := NAME.search(p.name))]
    return sorted(found)


def load_latest(
    directory: Path, map_location: Any = "cpu", max_step: int | None = None
) -> tuple[dict[str, Any], Path] | None:
    """The newest readable checkpoint (at most ``max_step``), falling back past corrupt ones;
    ``None`` if there is none."""
    for step, path in reversed(list_checkpoints(directory)):
        if max_step is not None and step > max_step:
            continue
        try:
            state = torch.load(path, map_location=map_location, weights_only=False)
            missing = [k for k in REQUIRED if k not in state]
            if missing:
                raise KeyError(f"missing {missing}")
        except Exception as err:  # a truncated or foreign file: report it and use the previous
            warnings.warn(f"skipping unreadable checkpoint {path}: {err}", stacklevel=2)
            continue
        return state, path
    return None


def prune(directory: Path, keep_last: int) -> None:
    """Delete all but the ``keep_last`` newest checkpoints (and stray temporary files)."""
    for _, path in list_checkpoints(directory)[:-keep_last]:
        path.unlink(missing_ok=True)
    for tmp in directory.glob(".step_*.tmp"):
        tmp.unlink(missing_ok=True)

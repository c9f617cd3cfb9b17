"""Small helpers shared by every stage: atomic writes, file locks, temporary environments, the
usable CPU cores, the code's git revision."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """``write(binary file)`` into a temporary sibling, flush, fsync, then rename onto ``path``.

    A reader never sees a partial file; an interrupted write leaves only ``.<name>.*.tmp``.
    The file gets the permissions a plain ``open`` would give it (0666 less the umask). A write
    that fails on a full file system (torch reports it as "unexpected pos …") raises an
    ``OSError`` (ENOSPC) naming the path; the previous file, if any, is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide results from the group
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        full = isinstance(err, Exception) and _disk_full(err, path.parent)
        Path(tmp).unlink(missing_ok=True)
        if full:
            raise OSError(
                errno.ENOSPC, f"no space left on the file system to write {path} ({err})"
            ) from err
        raise
    return path


def _disk_full(err: Exception, directory: Path) -> bool:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return shutil.disk_usage(directory).free < 2**20  # checked before the temporary goes
    except OSError:
        return False


def _umask() -> int:
    """The process's umask (read by setting it back: there is no query-only call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if absent) for the block: processes
    that build the same cached file (e.g. parallel notebook rows) build it once."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextmanager
def environ(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the block, then restore them."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def git_revision() -> dict[str, object]:
    """The package's git commit and whether the working tree differs from it (``None`` outside
    a git checkout), recorded with every run and benchmark."""
    import subprocess

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], capture_output=True, text=True, check=False,
                cwd=Path(__file__).resolve().parent,
            )  # fmt: skip
        except OSError:
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"git_commit": commit, "dirty": bool(status) if status is not None else None}


def use_repository_root() -> Path:
    """Make the repository root (the nearest folder up from the working directory that holds
    ``params/`` and ``notebooks/``) the working directory, as it is in papermill runs, so a
    notebook opened in JupyterLab, whose kernel starts in ``notebooks/``, reads the relative
    paths of its parameters the same way. Returns it (the working directory if none is found)."""
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "params").is_dir() and (folder / "notebooks").is_dir():
            if folder != here:
                os.chdir(folder)
                print(f"working directory: {folder} (parameters' relative paths start there)")
            return folder
    return here

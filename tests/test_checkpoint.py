"""Atomic checkpoints, corrupt-file fallback, pruning; the resumable batch order."""

import pytest
import torch

from diversedit.checkpoint import list_checkpoints, load_latest, prune, save_checkpoint
from diversedit.data.sampler import BatchOrder


def state(step):
    return {"model": {"w": torch.full((2,), float(step))}, "ema": {}, "optimizer": {}, "step": step}


def test_save_is_atomic_and_listed_in_order(tmp_path):
    for step in (30, 10, 20):
        save_checkpoint(tmp_path, step, state(step))
    assert [s for s, _ in list_checkpoints(tmp_path)] == [10, 20, 30]
    assert not list(tmp_path.glob(".*.tmp"))
    loaded, path = load_latest(tmp_path)
    assert loaded["step"] == 30 and path.name == "step_00000030.pt"


def test_failed_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 10, state(10))

    def boom(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 20, state(20))
    monkeypatch.undo()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [10]
    assert not list(tmp_path.glob(".*.tmp"))


def test_corrupt_latest_falls_back_with_a_warning(tmp_path):
    save_checkpoint(tmp_path, 10, state(10))
    save_checkpoint(tmp_path, 20, state(20))
    (tmp_path / "step_00000020.pt").write_bytes(b"truncated")
    (tmp_path / "step_00000030.pt").write_bytes(b"")
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint"):
        loaded, path = load_latest(tmp_path)
    assert loaded["step"] == 10 and path.name == "step_00000010.pt"
    assert load_latest(tmp_path / "missing") is None


def test_prune_keeps_the_newest(tmp_path):
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, state(step))
    (tmp_path / ".step_00000009.pt.x1.tmp").write_bytes(b"x")
    prune(tmp_path, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 5]
    assert not list(tmp_path.glob(".*.tmp"))


def take(order, n):
    it = iter(order)
    return [next(it) for _ in range(n)]


def test_batch_order_resumes_exactly_and_covers_each_epoch():
    full = take(BatchOrder(10, 4, seed=3), 7)  # 2 batches per epoch, drop_last
    resumed = take(BatchOrder(10, 4, seed=3, start=3), 4)
    assert full[3:] == resumed
    epoch0 = full[0] + full[1]
    assert len(set(epoch0)) == 8 and full[:2] != full[2:4]  # reshuffled per epoch


def test_batch_order_shards_one_global_batch_across_ranks():
    ranks = [take(BatchOrder(12, 6, seed=1, rank=r, num_processes=3), 2) for r in range(3)]
    single = take(BatchOrder(12, 6, seed=1), 2)
    for b in range(2):
        assert [i for r in range(3) for i in ranks[r][b]] == single[b]
    with pytest.raises(ValueError, match="not divisible"):
        BatchOrder(12, 5, num_processes=2)
    with pytest.raises(ValueError, match="smaller than one batch"):
        BatchOrder(3, 4)


def test_atomic_write_gives_the_permissions_of_a_plain_open(tmp_path):
    """Results are readable by whoever the umask allows (mkstemp alone would make them 0600)."""
    import os
    import stat

    from diversedit.files import atomic_write_bytes

    saved = os.umask(0o027)
    try:
        for mask in (0o022, 0o027, 0o077):
            os.umask(mask)
            plain = tmp_path / f"plain-{mask:o}"
            plain.write_bytes(b"x")
            path = atomic_write_bytes(tmp_path / f"atomic-{mask:o}", b"x")
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode == stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~mask
            assert os.umask(mask) == mask  # the umask is left as it was
    finally:
        os.umask(saved)


def test_a_checkpoint_on_a_full_disk_names_the_path_and_keeps_the_old_one(tmp_path, monkeypatch):
    """torch reports a full disk as "unexpected pos …": the error says what and where."""
    import errno
    import shutil
    from collections import namedtuple

    from diversedit import files

    save_checkpoint(tmp_path, 10, state(10))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(2**30, 2**30, 4096))

    def full(f):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4424576")

    target = tmp_path / "step_00000020.pt"
    with pytest.raises(OSError, match=r"no space left .*step_00000020\.pt") as err:
        files.atomic_write(target, full)
    assert err.value.errno == errno.ENOSPC
    assert not target.exists() and not list(tmp_path.glob(".*.tmp"))
    assert load_latest(tmp_path)[0]["step"] == 10
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(2**30, 0, 2**30))
    with pytest.raises(RuntimeError, match="unexpected pos"):  # not a full disk: as it was
        files.atomic_write(target, full)

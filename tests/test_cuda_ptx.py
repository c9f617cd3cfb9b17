"""The Triton kernels as the CUDA compiler builds them (no GPU needed): they compile for Hopper,
spill no registers, and read and write their tiles as 128-bit vectors when the addresses are
declared aligned. Built by ``tests/cuda_ptx.py`` in a process without Triton's interpreter."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
if not all((BIN / tool).exists() for tool in ("ptxas", "cuobjdump")):
    pytest.skip("Triton's wheel ships no ptxas/cuobjdump here", allow_module_level=True)

TILE_STORES = {"adamw_ema", "block_grads"}  # kernels that write tensor tiles


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> dict[tuple[str, bool], dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))
    script = Path(__file__).with_name("cuda_ptx.py")
    out = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return {(r["kernel"], r["aligned"]): r for r in json.loads(out.stdout)["kernels"]}


def test_every_kernel_builds_for_hopper(records) -> None:
    names = {"grad_squares", "adamw_ema", "column_sums", "pair_rows", "block_grads"}
    assert set(records) == {(n, a) for n in names for a in (True, False)}


def test_no_kernel_spills(records) -> None:
    """No local memory with aligned addresses; at most a few spilled registers in the unaligned
    fallback (scalar loads need a 64-bit address per element). The pair loop of ``block_grads``,
    unrolled, once spilled 5–17 KB per thread."""
    for (name, aligned), r in records.items():
        assert r["stack_bytes"] <= (0 if aligned else 64), (name, aligned, r)


def test_aligned_tiles_move_as_vectors(records) -> None:
    """With 16-byte alignment declared, tiles are read (and written) 128 bits at a time: vector
    loads, no 16-bit accesses of bf16/fp16 blocks, fewer scalar loads than the unaligned variant
    (the loads of per-tensor scalars and row statistics stay scalar)."""

    def scalar(ops: dict) -> int:
        return sum(n for op, n in ops.items() if op.endswith((".b32", ".b16")) and ".v" not in op)

    for (name, aligned), r in records.items():
        if not aligned:
            continue
        fallback = records[(name, False)]
        assert r["loads"].get("ld.global.v4.b32", 0) > 0, (name, r)
        assert scalar(r["loads"]) < scalar(fallback["loads"]), (name, r, fallback)
        assert not any(".b16" in op for op in (*r["loads"], *r["stores"])), (name, r)
        if name in TILE_STORES:
            assert r["stores"].get("st.global.v4.b32", 0) > 0, (name, r)

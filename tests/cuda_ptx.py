"""Build the Triton kernels for a CUDA architecture without a GPU; report what ptxas made of them.

``python tests/cuda_ptx.py [arch]`` (default 90, Hopper) prints JSON: a record per kernel and
alignment variant: registers and stack (local memory: spills) per thread from ``cuobjdump``, and
the global loads and stores of the PTX by width (``ld.global.v4.b32`` is a 128-bit vector load).
Triton's CPU interpreter runs the kernels' mathematics but not this compiler: this is where a
register spill or a lost alignment hint shows before a GPU runs them. Needs the ``ptxas`` and
``cuobjdump`` that Triton's wheels ship, and must not run under ``TRITON_INTERPRET=1``.

The arguments are specialised as Triton's launcher would at SiT-XL/2: tensor addresses, and the
sizes that are multiples of 16 there (8,192 rows, 1,152 channels, chunks), marked divisible by 16.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from diversedit import update_triton
from diversedit.losses import diversity_triton

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
NUM_WARPS = 4  # Triton's default, as the kernels are launched


def types(*, i64: str = "", f32: str = "", i32: str = "", fp32: str = "") -> dict[str, str]:
    """Argument types by name: ``i64``/``f32`` pointers, ``i32``/``fp32`` scalars (names
    separated by spaces)."""
    kinds = {"*i64": i64, "*fp32": f32, "i32": i32, "fp32": fp32}
    return {name: kind for kind, names in kinds.items() for name in names.split()}


TABLES = "table numel chunk_tensor chunk_start"
TILE = {"BM": diversity_triton.BLOCK_M, "BD": diversity_triton.BLOCK_D}
# kernel → (argument types, constexprs besides ALIGNED, integer arguments that are 16·k)
KERNELS: dict[str, tuple[Any, dict[str, str], dict[str, int], tuple[str, ...]]] = {
    "grad_squares": (
        update_triton.grad_squares,
        types(i64=TABLES, f32="partial", i32="chunk T"),
        {"BLOCK": update_triton.BLOCK},
        ("chunk",),
    ),
    "adamw_ema": (
        update_triton.adamw_ema,
        types(
            i64=TABLES,
            f32="coef_ptr",
            i32="chunk T",
            fp32="lr beta1 beta2 log2_beta1 log2_beta2 eps decay ema_weight",
        ),
        {"BLOCK": update_triton.BLOCK},
        ("chunk",),
    ),
    "column_sums": (
        diversity_triton.column_sums,
        types(i64="table kind", f32="s1 sabs ssq nbad", i32="M D R"),
        TILE,
        ("M", "D", "R"),
    ),
    "pair_rows": (
        diversity_triton.pair_rows,
        types(i64="table kind a_slot b_slot", f32="cos na nb", i32="M D", fp32="eps"),
        TILE,
        ("M", "D"),
    ),
    "block_grads": (
        diversity_triton.block_grads,
        types(
            i64="table kind grad_table a_slot b_slot",
            f32="g_mu g_l1 g_l2n gr cos na nb",
            i32="M D S",
            fp32="eps",
        ),
        TILE,
        ("M", "D"),
    ),
}


def build(name: str, aligned: bool, arch: int = 90) -> dict[str, Any]:
    """Compile kernel ``name`` for ``sm_{arch}`` and report its resources and memory accesses."""
    fn, types, constexprs, multiples = KERNELS[name]
    signature = {arg: types.get(arg, "constexpr") for arg in fn.arg_names}
    unknown = set(types) - set(fn.arg_names)
    if unknown:
        raise ValueError(f"{name}: no arguments named {sorted(unknown)}")
    marked = [a for a, t in types.items() if t.startswith("*") or a in multiples]
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in marked}
    src = ASTSource(fn, signature, constexprs={**constexprs, "ALIGNED": aligned}, attrs=attrs)
    kernel = triton.compile(
        src, target=GPUTarget("cuda", arch, 32), options={"num_warps": NUM_WARPS}
    )
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / f"{name}.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run(
            [str(BIN / "cuobjdump"), "--dump-resource-usage", str(cubin)],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    resources = dict(re.findall(r"\b(REG|STACK):(\d+)", usage))
    ptx = kernel.asm["ptx"]
    return {
        "kernel": name,
        "aligned": aligned,
        "arch": f"sm_{arch}",
        "registers": int(resources["REG"]),
        "stack_bytes": int(resources["STACK"]),
        "loads": dict(Counter(re.findall(r"\bld\.global\S*", ptx))),
        "stores": dict(Counter(re.findall(r"\bst\.global\S*", ptx))),
    }


def main(arch: int = 90) -> dict[str, Any]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter does not compile kernels")
    kernels = [build(name, aligned, arch) for name in KERNELS for aligned in (True, False)]
    return {"triton": triton.__version__, "num_warps": NUM_WARPS, "kernels": kernels}


if __name__ == "__main__":
    print(json.dumps(main(*map(int, sys.argv[1:])), indent=1))

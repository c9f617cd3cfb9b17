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
F32 = "*fp32"
I64 = "*i64"
TABLES = {"table": I64, "numel": I64, "chunk_tensor": I64, "chunk_start": I64}
SCALARS = {k: "fp32" for k in ("lr", "beta1", "beta2", "log2_beta1", "log2_beta2", "eps")}
# kernel → (argument types, constexprs besides ALIGNED, integer arguments that are 16·k)
KERNELS: dict[str, tuple[Any, dict[str, str], dict[str, int], tuple[str, ...]]] = {
    "grad_squares": (
        update_triton.grad_squares,
        {**TABLES, "chunk": "i32", "partial": F32, "T": "i32"},
        {"BLOCK": update_triton.BLOCK},
        ("chunk",),
    ),
    "adamw_ema": (
        update_triton.adamw_ema,
        {
            **TABLES,
            "chunk": "i32",
            "coef_ptr": F32,
            "T": "i32",
            **SCALARS,
            "decay": "fp32",
            "ema_weight": "fp32",
        },
        {"BLOCK": update_triton.BLOCK},
        ("chunk",),
    ),
    "column_sums": (
        diversity_triton.column_sums,
        {
            "table": I64,
            "kind": I64,
            "s1": F32,
            "sabs": F32,
            "ssq": F32,
            "nbad": F32,
            "M": "i32",
            "D": "i32",
            "R": "i32",
        },
        {"BM": diversity_triton.BLOCK_M, "BD": diversity_triton.BLOCK_D},
        ("M", "D", "R"),
    ),
    "pair_rows": (
        diversity_triton.pair_rows,
        {
            "table": I64,
            "kind": I64,
            "a_slot": I64,
            "b_slot": I64,
            "cos": F32,
            "na": F32,
            "nb": F32,
            "M": "i32",
            "D": "i32",
            "eps": "fp32",
        },
        {"BM": diversity_triton.BLOCK_M, "BD": diversity_triton.BLOCK_D},
        ("M", "D"),
    ),
    "block_grads": (
        diversity_triton.block_grads,
        {
            "table": I64,
            "kind": I64,
            "grad_table": I64,
            "g_mu": F32,
            "g_l1": F32,
            "g_l2n": F32,
            "a_slot": I64,
            "b_slot": I64,
            "gr": F32,
            "cos": F32,
            "na": F32,
            "nb": F32,
            "M": "i32",
            "D": "i32",
            "eps": "fp32",
            "S": "i32",
        },
        {"BM": diversity_triton.BLOCK_M, "BD": diversity_triton.BLOCK_D},
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
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32))
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
    return {"triton": triton.__version__, "num_warps": 4, "kernels": kernels}


if __name__ == "__main__":
    print(json.dumps(main(*map(int, sys.argv[1:])), indent=1))

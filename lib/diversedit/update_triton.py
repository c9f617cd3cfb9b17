"""Triton kernels for the fused parameter update: clipping, AdamW and EMA in two launches.

Inductor compiles :func:`~diversedit.update._foreach_update` into fused kernels, but its
scheduler spends about a second per parameter tensor (minutes for SiT-XL/2's 291, NOTES entry
17). These two kernels do the same passes over every tensor through a table of addresses and
build in seconds whatever the model: ``grad_squares`` sums each chunk's squared gradients (the
clipping norm), then ``adamw_ema`` reads gradient, parameter, both moments and EMA once and
writes each once (the clipped gradient is never written back). The work is cut into chunks of
``CHUNK`` elements of one tensor, one program each. Everything is float32 and contiguous, as
the trainer's master weights and their state are; the per-tensor step counts are read on the
device, so nothing waits for the host. Kernels are built when this module is imported: with
``TRITON_INTERPRET=1`` set before, they run in Triton's CPU interpreter (how the tests run them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_support import device_table

CHUNK, BLOCK = 65536, 1024  # elements per program, per vector operation
# rows of the address table: parameter, gradient, exp_avg, exp_avg_sq, EMA, step (0 … 5)


@triton.jit
def address(table, row, t, T, ALIGNED: tl.constexpr):
    """Float32 pointer to tensor ``t`` of table row ``row`` (rows of ``T`` addresses);
    ``ALIGNED``: every address is a multiple of 16 bytes, so loads may be 128-bit vectors."""
    ptr = tl.load(table + row * T + t).to(tl.pointer_type(tl.float32))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def span(chunk_tensor, chunk_start, numel, chunk, c, BLOCK: tl.constexpr):
    """Program ``c``'s tensor and element range [start, end), and where its whole ``BLOCK``s
    end: those are read without a mask (a mask of unknown extent rules out vector loads)."""
    t, start = tl.load(chunk_tensor + c), tl.load(chunk_start + c)
    end = tl.minimum(start + chunk, tl.load(numel + t))
    return t, start, end, start + (end - start) // BLOCK * BLOCK


@triton.jit
def offsets(i, BLOCK: tl.constexpr):
    """The ``BLOCK`` offsets from ``i``, a multiple of ``BLOCK`` (chunks start at multiples of
    ``CHUNK``): the hint goes on the computed offsets, since Triton drops hints on a function's
    arguments."""
    return tl.max_contiguous(tl.multiple_of(i + tl.arange(0, BLOCK), BLOCK), BLOCK)


@triton.jit
def grad_squares(
    table, numel, chunk_tensor, chunk_start, chunk, partial, T,
    BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    c = tl.program_id(0)
    t, start, end, whole = span(chunk_tensor, chunk_start, numel, chunk, c, BLOCK)
    g = address(table, 1, t, T, ALIGNED)
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(start, whole, BLOCK):
        x = tl.load(g + offsets(i, BLOCK))
        acc += x * x
    offs = offsets(whole, BLOCK)
    x = tl.load(g + offs, mask=offs < end, other=0.0)  # the tail (may be empty)
    tl.store(partial + c, tl.sum(acc + x * x, axis=0))


@triton.jit
def adamw_ema_block(
    p_ptr, g_ptr, m_ptr, v_ptr, e_ptr, offs, mask, other,
    coef, decay, beta1, beta2, step_size, bias2_sqrt, eps, ema_weight,
):  # fmt: skip
    """One block of the update at ``offs`` (``mask``/``other`` None: a whole block)."""
    g = tl.load(g_ptr + offs, mask=mask, other=other) * coef
    p = tl.load(p_ptr + offs, mask=mask, other=other) * decay
    m = tl.load(m_ptr + offs, mask=mask, other=other)
    v = tl.load(v_ptr + offs, mask=mask, other=other)
    e = tl.load(e_ptr + offs, mask=mask, other=other)
    m = m + (1.0 - beta1) * (g - m)  # torch's lerp for weights below 1/2
    v = v * beta2 + (1.0 - beta2) * g * g
    p = p - step_size * m / (tl.sqrt(v) / bias2_sqrt + eps)
    e = e + ema_weight * (p - e)
    tl.store(p_ptr + offs, p, mask=mask)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    tl.store(e_ptr + offs, e, mask=mask)


@triton.jit
def adamw_ema(
    table, numel, chunk_tensor, chunk_start, chunk, coef_ptr, T,
    lr, beta1, beta2, log2_beta1, log2_beta2, eps, decay, ema_weight,
    BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    c = tl.program_id(0)
    t, start, end, whole = span(chunk_tensor, chunk_start, numel, chunk, c, BLOCK)
    p_ptr, g_ptr = address(table, 0, t, T, ALIGNED), address(table, 1, t, T, ALIGNED)
    m_ptr, v_ptr = address(table, 2, t, T, ALIGNED), address(table, 3, t, T, ALIGNED)
    e_ptr = address(table, 4, t, T, ALIGNED)
    step = tl.load(address(table, 5, t, T, False))  # already counts this step
    step_size = lr / (1.0 - tl.exp2(step * log2_beta1))  # lr / (1 − β1ᵗ)
    bias2_sqrt = tl.sqrt(1.0 - tl.exp2(step * log2_beta2))  # √(1 − β2ᵗ)
    coef = tl.load(coef_ptr)  # the clipping coefficient (1 without clipping)
    for i in range(start, whole, BLOCK):
        adamw_ema_block(
            p_ptr, g_ptr, m_ptr, v_ptr, e_ptr, offsets(i, BLOCK), None, None,
            coef, decay, beta1, beta2, step_size, bias2_sqrt, eps, ema_weight,
        )  # fmt: skip
    offs = offsets(whole, BLOCK)
    adamw_ema_block(  # the tail (may be empty)
        p_ptr, g_ptr, m_ptr, v_ptr, e_ptr, offs, offs < end, 0.0,
        coef, decay, beta1, beta2, step_size, bias2_sqrt, eps, ema_weight,
    )  # fmt: skip


def _log2(beta: float) -> float:
    return math.log2(beta) if beta > 0 else -math.inf


class TritonUpdate:
    """:func:`~diversedit.update._foreach_update`'s signature and mathematics on the Triton
    kernels. The address table is rebuilt only when a tensor moved (gradients set to ``None``
    are usually reallocated at the same addresses), the chunk table when the sizes change."""

    def __init__(self) -> None:
        self._addresses: tuple[tuple[int, ...], Tensor, bool] | None = None
        self._chunks: tuple[tuple[int, ...], Tensor, Tensor, Tensor] | None = None

    def _tables(
        self, columns: Sequence[Sequence[Tensor]]
    ) -> tuple[Tensor, bool, Tensor, Tensor, Tensor]:
        """Addresses (rows: the ``columns``), whether all but the steps' are 16-byte aligned,
        and per tensor its size, per chunk its tensor and first element, on the device."""
        device = columns[0][0].device
        ptrs = tuple(t.data_ptr() for col in columns for t in col)
        if self._addresses is None or self._addresses[0] != ptrs:
            bad = {
                f"{t.dtype}{'' if t.is_contiguous() else ' non-contiguous'} on {t.device}"
                for col in columns for t in col
                if t.dtype != torch.float32 or not t.is_contiguous() or t.device != device
            }  # fmt: skip
            if bad:
                raise ValueError(
                    f"the Triton update takes contiguous float32 tensors on {device}, got "
                    f"{sorted(bad)}"
                )
            steps = len(columns[-1])  # the last row: no vector loads from a 0-d step
            aligned = all(a % 16 == 0 for a in ptrs[:-steps])
            self._addresses = ptrs, device_table([ptrs], device)[0], aligned  # row-major
        sizes = tuple(p.numel() for p in columns[0])
        if self._chunks is None or self._chunks[0] != sizes:
            if CHUNK % BLOCK:
                raise ValueError(f"CHUNK ({CHUNK}) must be a multiple of BLOCK ({BLOCK})")
            tensor_of = [t for t, n in enumerate(sizes) for _ in range(0, n, CHUNK)]
            start_of = [s for n in sizes for s in range(0, n, CHUNK)]
            rows = [list(sizes), tensor_of, start_of]
            numel, chunk_tensor, chunk_start = (device_table([r], device)[0] for r in rows)
            self._chunks = sizes, numel, chunk_tensor, chunk_start
        return *self._addresses[1:], *self._chunks[1:]

    def __call__(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        exp_avg_sqs: list[Tensor],
        steps: list[Tensor],
        emas: list[Tensor],
        frozen: list[Tensor],
        frozen_emas: list[Tensor],
        *,
        lr: float,
        beta1: float,
        beta2: float,
        eps: float,
        weight_decay: float,
        max_norm: float,
        ema_weight: float,
    ) -> Tensor:
        table, aligned, numel, chunk_tensor, chunk_start = self._tables(
            (params, grads, exp_avgs, exp_avg_sqs, emas, steps)
        )
        grid, count = (chunk_tensor.numel(),), len(params)
        if max_norm > 0:
            partial = params[0].new_empty(grid)
            grad_squares[grid](
                table, numel, chunk_tensor, chunk_start, CHUNK, partial, count, BLOCK, aligned
            )  # fmt: skip
            norm = partial.sum().sqrt()
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)  # clip_grad_norm_'s
        else:
            norm, coef = params[0].new_zeros(()), params[0].new_ones(())
        torch._foreach_add_(steps, 1)
        adamw_ema[grid](
            table, numel, chunk_tensor, chunk_start, CHUNK, coef, count,
            lr, beta1, beta2, _log2(beta1), _log2(beta2), eps, 1.0 - lr * weight_decay,
            ema_weight, BLOCK, aligned,
        )  # fmt: skip
        if frozen:
            torch._foreach_lerp_(frozen_emas, frozen, ema_weight)
        return norm

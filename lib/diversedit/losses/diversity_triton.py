"""Triton kernels for the diversity-loss statistics: no stack, no scatter.

The compiled path (:func:`~diversedit.losses.diversity._autograd_stats`) stacks the L block
features so that the chosen pairs, which depend on device-side validity flags, can be gathered
without a host sync; on an H200 at SiT-XL/2 that stacking and the scatter of the pairs'
gradient cost more than half of the loss's time. Here the blocks are read in place through a
table of their addresses: one pass per block for the column sums (Σx, Σ|x|, Σx², non-finite
count), one pass over the chosen slots' two blocks for the row cosines, and one backward pass
per block that writes its whole gradient (column terms plus the pair terms of every slot that
names the block) in the block's own dtype.

The forward and backward are ``torch.library`` custom operators (``diversedit::diversity_stats``
and its backward), opaque to ``torch.compile``, so the compiled loss calls them without a graph
break. Same mathematics as the other paths (tested against them, in Triton's interpreter on
CPU and on a GPU). Inside the compiled SiT-XL/2 loss on an H200 they take it from 4.19 to
3.25 ms, so the trainer uses them by default on CUDA (``precision.diversity_triton: null``);
``diversity_loss(..., triton=True)`` selects them directly.
Kernels are built when this module is imported: with ``TRITON_INTERPRET=1`` set before, they
run in Triton's CPU interpreter (how the CPU tests check them).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..triton_support import device_table

BLOCK_M, BLOCK_D = 32, 128  # tile: rows × channels
ROWS = 256  # rows per program of the column sums (split so every SM has work)


@triton.jit
def pointer(table, blk, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Block ``blk``'s address as a ``DTYPE`` pointer; ``ALIGNED``: every block starts on 16
    bytes, so tiles may load as 128-bit vectors (Triton cannot know that of an address read
    from memory)."""
    ptr = tl.load(table + blk).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def load_block(table, kind, blk, offs, mask, ALIGNED: tl.constexpr):
    """Tile of block ``blk`` as float32, read in the block's dtype (``kind``: 0 float32,
    1 bfloat16, 2 float16; lanes outside ``mask`` read as 0, which the sums rely on). A branch on
    the dtype, the same for the whole program: one tile of registers, not one per dtype."""
    code = tl.load(kind + blk)
    if code == 0:
        x = tl.load(pointer(table, blk, tl.float32, ALIGNED) + offs, mask, 0.0)
    elif code == 1:
        x = tl.load(pointer(table, blk, tl.bfloat16, ALIGNED) + offs, mask, 0.0).to(tl.float32)
    else:
        x = tl.load(pointer(table, blk, tl.float16, ALIGNED) + offs, mask, 0.0).to(tl.float32)
    return x


@triton.jit
def store_block(table, kind, blk, offs, mask, value, ALIGNED: tl.constexpr):
    code = tl.load(kind + blk)
    if code == 0:
        tl.store(pointer(table, blk, tl.float32, ALIGNED) + offs, value, mask=mask)
    elif code == 1:
        tl.store(pointer(table, blk, tl.bfloat16, ALIGNED) + offs, value.to(tl.bfloat16), mask=mask)
    else:
        tl.store(pointer(table, blk, tl.float16, ALIGNED) + offs, value.to(tl.float16), mask=mask)


@triton.jit
def finite(x):
    return (x == x) & (tl.abs(x) < float("inf"))


@triton.jit
def column_sums(
    table, kind, s1, sabs, ssq, nbad, M, D, R,
    BM: tl.constexpr, BD: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    """Partial column sums of rows [split·R, split·R + R) of a block, into (B, splits, D)."""
    blk, pd, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    cols = pd * BD + tl.arange(0, BD)
    acc1 = tl.zeros([BD], tl.float32)
    acca = tl.zeros([BD], tl.float32)
    acc2 = tl.zeros([BD], tl.float32)
    accn = tl.zeros([BD], tl.float32)
    end = tl.minimum(split * R + R, M)
    for r0 in range(split * R, end, BM):
        rows = r0 + tl.arange(0, BM)
        mask = (rows[:, None] < end) & (cols[None, :] < D)
        x = load_block(table, kind, blk, rows[:, None] * D + cols[None, :], mask, ALIGNED)
        ok = finite(x)
        xm = tl.where(ok, x, 0.0)
        acc1 += tl.sum(xm, axis=0)
        acca += tl.sum(tl.abs(xm), axis=0)
        acc2 += tl.sum(xm * xm, axis=0)
        accn += tl.sum(tl.where(mask & (ok == 0), 1.0, 0.0), axis=0)
    out = (blk * tl.num_programs(2) + split) * D + cols
    cmask = cols < D
    tl.store(s1 + out, acc1, mask=cmask)
    tl.store(sabs + out, acca, mask=cmask)
    tl.store(ssq + out, acc2, mask=cmask)
    tl.store(nbad + out, accn, mask=cmask)


@triton.jit
def pair_rows(
    table, kind, a_slot, b_slot, cos, na, nb, M, D, eps,
    BM: tl.constexpr, BD: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    s, pm = tl.program_id(0), tl.program_id(1)
    a, b = tl.load(a_slot + s), tl.load(b_slot + s)
    rows = pm * BM + tl.arange(0, BM)
    dot = tl.zeros([BM], tl.float32)
    qa = tl.zeros([BM], tl.float32)
    qb = tl.zeros([BM], tl.float32)
    for d0 in range(0, D, BD):
        cols = d0 + tl.arange(0, BD)
        mask = (rows[:, None] < M) & (cols[None, :] < D)
        offs = rows[:, None] * D + cols[None, :]
        xa = load_block(table, kind, a, offs, mask, ALIGNED)
        xb = load_block(table, kind, b, offs, mask, ALIGNED)
        xa = tl.where(finite(xa), xa, 0.0)
        xb = tl.where(finite(xb), xb, 0.0)
        dot += tl.sum(xa * xb, axis=1)
        qa += tl.sum(xa * xa, axis=1)
        qb += tl.sum(xb * xb, axis=1)
    ra, rb = tl.sqrt(qa), tl.sqrt(qb)
    c = dot / (tl.maximum(ra, eps) * tl.maximum(rb, eps))
    rmask = rows < M
    tl.store(cos + s * M + rows, c, mask=rmask)
    tl.store(na + s * M + rows, ra, mask=rmask)
    tl.store(nb + s * M + rows, rb, mask=rmask)


@triton.jit
def block_grads(
    table, kind, grad_table, g_mu, g_l1, g_l2n, a_slot, b_slot, gr, cos, na, nb,
    M, D, eps, S, BM: tl.constexpr, BD: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    blk, pm, pd = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pm * BM + tl.arange(0, BM)
    cols = pd * BD + tl.arange(0, BD)
    rmask, cmask = rows < M, cols < D
    mask = rmask[:, None] & cmask[None, :]
    offs = rows[:, None] * D + cols[None, :]
    x = load_block(table, kind, blk, offs, mask, ALIGNED)
    ok = finite(x)
    xm = tl.where(ok, x, 0.0)
    cidx = blk * D + cols
    sign = tl.where(xm > 0, 1.0, tl.where(xm < 0, -1.0, 0.0))
    grad = (
        tl.load(g_mu + cidx, mask=cmask, other=0.0)[None, :] / M
        + sign * tl.load(g_l1 + cidx, mask=cmask, other=0.0)[None, :]
        + xm * tl.load(g_l2n + cidx, mask=cmask, other=0.0)[None, :]
    )
    for s in range(S):  # pair terms of the slots that name this block (a loop, not unrolled)
        a, b = tl.load(a_slot + s), tl.load(b_slot + s)
        if (a == blk) | (b == blk):
            is_a = a == blk
            other = load_block(table, kind, tl.where(is_a, b, a), offs, mask, ALIGNED)
            other = tl.where(finite(other), other, 0.0)
            g = tl.load(gr + s * M + rows, mask=rmask, other=0.0)
            c = tl.load(cos + s * M + rows, mask=rmask, other=0.0)
            ra = tl.load(na + s * M + rows, mask=rmask, other=1.0)
            rb = tl.load(nb + s * M + rows, mask=rmask, other=1.0)
            own = tl.where(is_a, ra, rb)
            n_own, n_pair = tl.maximum(own, eps), tl.maximum(tl.where(is_a, rb, ra), eps)
            radial = tl.where(own >= eps, c / (n_own * n_own), 0.0)  # clamped: constant norm
            grad += g[:, None] * (other / (n_own * n_pair)[:, None] - radial[:, None] * xm)
    store_block(grad_table, kind, blk, offs, mask, tl.where(ok, grad, 0.0), ALIGNED)


KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _table(tensors: Sequence[Tensor], device: torch.device) -> tuple[Tensor, Tensor, bool]:
    """The tensors' addresses and dtype codes on the device, and whether every address is a
    multiple of 16 bytes."""
    rows = [[t.data_ptr() for t in tensors], [KINDS[t.dtype] for t in tensors]]
    dev = device_table(rows, device)
    return dev[0], dev[1], all(a % 16 == 0 for a in rows[0])


def check_dtypes(blocks: Sequence[Tensor]) -> None:
    bad = sorted({str(b.dtype) for b in blocks if b.dtype not in KINDS})
    if bad:
        raise ValueError(f"the Triton diversity statistics take float32/16-bit blocks, got {bad}")


def _empty(shape: Sequence[int], like: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return like.new_empty(shape, dtype=dtype)


@torch.library.custom_op("diversedit::diversity_stats", mutates_args=())
def diversity_stats(
    blocks: list[Tensor], cand_a: Tensor, cand_b: Tensor, cap: int, skip: bool, eps: float,
    mean_of_abs: bool,
) -> tuple[
    Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor
]:  # fmt: skip
    """Column sums of every block and row cosines of the chosen pairs, from the Triton kernels.

    Returns raw statistics over the blocks' finite values: valid (B,: no non-finite value in the
    block), mu, l1, l2 (B, D), then for ``cap`` slots (none when ``cand_a`` is empty) the mean
    row cosine c (S,) of each slot's pair, filled (S,), the pairs a_slot, b_slot (S,) as stack
    positions, and the per-row cosines and norms (S, M) that the backward reads. The slots are
    chosen on the device (:func:`~diversedit.losses.diversity.chosen_slots`: the first ``cap``
    candidates whose blocks are valid with ``skip``, else the first ``cap``). An opaque operator
    for ``torch.compile`` (it reads the blocks through their addresses), with its backward in
    :func:`diversity_stats_backward`; the caller zeroes the statistics of invalid blocks.
    """
    from .diversity import chosen_slots

    blocks = [b.contiguous() for b in blocks]
    first = blocks[0]
    device, d = first.device, first.shape[-1]
    m = first.numel() // d
    table, kind, aligned = _table(blocks, device)
    splits = -(-m // ROWS)
    parts = [_empty((len(blocks), splits, d), first) for _ in range(4)]
    grid = (len(blocks), -(-d // BLOCK_D), splits)
    column_sums[grid](table, kind, *parts, m, d, ROWS, BM=BLOCK_M, BD=BLOCK_D, ALIGNED=aligned)
    s1, sabs, ssq, nbad = (p.sum(dim=1) for p in parts)
    valid = nbad.sum(dim=1) == 0
    slots = cap if cand_a.numel() else 0
    if slots:
        slot, filled = chosen_slots(valid, cand_a, cand_b, cap, skip)
        a_slot, b_slot = cand_a[slot], cand_b[slot]
    else:  # fresh tensors: a custom operator's outputs may not alias its inputs
        a_slot, b_slot, filled = cand_a.new_empty(0), cand_b.new_empty(0), valid.new_empty(0)
    cos, na, nb = (_empty((slots, m), first) for _ in range(3))
    if slots:
        grid = (slots, -(-m // BLOCK_M))
        pair_rows[grid](
            table, kind, a_slot, b_slot, cos, na, nb, m, d, eps,
            BM=BLOCK_M, BD=BLOCK_D, ALIGNED=aligned,
        )  # fmt: skip
    c = (cos.abs() if mean_of_abs else cos).mean(dim=1)
    return valid, s1 / m, sabs, ssq.sqrt(), c, filled, a_slot, b_slot, cos, na, nb


@diversity_stats.register_fake
def _(blocks, cand_a, cand_b, cap, skip, eps, mean_of_abs):
    first = blocks[0]
    n, d = len(blocks), first.shape[-1]
    m = first.numel() // d
    s = cap if cand_a.numel() else 0
    stats = [_empty((n, d), first) for _ in range(3)]
    slots = [_empty((s,), first), _empty((s,), first, torch.bool)]
    pairs = [_empty((s,), cand_a, torch.long) for _ in range(2)]
    return (_empty((n,), first, torch.bool), *stats, *slots, *pairs,
            *(_empty((s, m), first) for _ in range(3)))  # fmt: skip


@torch.library.custom_op("diversedit::diversity_stats_backward", mutates_args=())
def diversity_stats_backward(
    blocks: list[Tensor], g_mu: Tensor, g_l1: Tensor, g_l2n: Tensor, a_slot: Tensor,
    b_slot: Tensor, gr: Tensor, cos: Tensor, na: Tensor, nb: Tensor, eps: float,
) -> list[Tensor]:  # fmt: skip
    """Every block's gradient in one pass per block, in the block's dtype (zero where the
    block's value is not finite); ``g_l2n`` = g_l2 / l2, ``gr`` (S, M) = the rows' g_c."""
    blocks = [b.contiguous() for b in blocks]
    first = blocks[0]
    device, d = first.device, first.shape[-1]
    m = first.numel() // d
    grads = [torch.empty_like(b) for b in blocks]
    table, kind, aligned = _table(blocks, device)
    grad_table, _, grads_aligned = _table(grads, device)
    grid = (len(blocks), -(-m // BLOCK_M), -(-d // BLOCK_D))
    block_grads[grid](
        table, kind, grad_table, g_mu, g_l1, g_l2n, a_slot, b_slot, gr, cos, na, nb,
        m, d, eps, S=a_slot.shape[0], BM=BLOCK_M, BD=BLOCK_D, ALIGNED=aligned and grads_aligned,
    )  # fmt: skip
    return grads


@diversity_stats_backward.register_fake
def _(blocks, g_mu, g_l1, g_l2n, a_slot, b_slot, gr, cos, na, nb, eps):
    return [torch.empty_like(b) for b in blocks]


def _setup_context(ctx, inputs, output) -> None:
    blocks, _, _, _, _, eps, mean_of_abs = inputs
    _, _, _, l2, _, _, a_slot, b_slot, cos, na, nb = output
    ctx.save_for_backward(*blocks, a_slot, b_slot, cos, na, nb, l2)
    ctx.eps, ctx.mean_of_abs = eps, mean_of_abs


def _backward(ctx, _v, g_mu, g_l1, g_l2, g_c, *_):
    *blocks, a_slot, b_slot, cos, na, nb, l2 = ctx.saved_tensors
    m = cos.shape[1]

    def dense(g: Tensor | None, like: Tensor) -> Tensor:
        return torch.zeros_like(like) if g is None else g.float().contiguous()

    g_l2n = torch.where(l2 > 0, dense(g_l2, l2) / l2, 0.0)
    gr = dense(g_c, cos[:, 0])[:, None] / m
    if ctx.mean_of_abs:
        gr = gr * cos.sign()
    gr = gr.expand_as(cos).contiguous()
    grads = diversity_stats_backward(
        blocks, dense(g_mu, l2), dense(g_l1, l2), g_l2n, a_slot, b_slot, gr, cos, na, nb, ctx.eps
    )
    return grads, None, None, None, None, None, None


diversity_stats.register_autograd(_backward, setup_context=_setup_context)

"""The backward of a slab's head mix, with its weight gradient, in one kernel, optionally
through the softmax that precedes it.

The row-chunked backward (chunked_backward.py) holds slabs (B, H, R, K) of one batch
element. For the mix out[o] = sum_c w[g, o, c] x[c] (``mta_reference.mix_heads``) with
incoming gradient g it needs

    dx[c] = sum_o w[g, o, c] g[o]                      the adjoint, a slab
    dw[g, o, c] = sum over rows and keys of g[o] x[c]   the weight gradient

and before the pre mix g is the softmax's backward, dZ = P * (dP - rowsum(P * dP)). In
PyTorch that is a softmax-backward pass, a batched matmul for dx and another (a SIMT sgemm
on the H200) for dw, each reading or writing whole slabs. Here a program holds one row of
every head of a mixing group, reads its inputs once per key block (twice for the softmax's
rowsum) and writes dx once; the weight gradient is a per-row partial the host sums in a
fixed order.
"""
import torch
import triton
import triton.language as tl

from .forward import _next_pow2
from .slab_conv import row_kernel_zero_above
from .slab_mix import group_row, group_row_program

# key block of about this many elements (heads x keys), and the warps
MIX_BACKWARD_CONFIG = dict(elements=2048, num_warps=4)


@triton.jit
def _row_block(base, cols, end, head_ok, sj):
    """[CHP, BLOCK] block of one row of the group's heads, zero at cols >= end."""
    return tl.load(base + cols[None, :] * sj, mask=head_ok[:, None] & (cols[None, :] < end), other=0.0)


@triton.jit
def mix_backward_rows_kernel(grad, probs, x, w, out, dw,
                             sgb, sgh, sgi, sgj, spb, sph, spi, spj, sxb, sxh, sxi, sxj, sob, soh, soi, soj,
                             H, R, K, ZERO_ABOVE, DW_LO, DW_HI, DW_ROW0, DW_ROWS,
                             CH: tl.constexpr, CHP: tl.constexpr, SOFTMAX: tl.constexpr, WANT_DW: tl.constexpr,
                             BLOCK: tl.constexpr, PREC: tl.constexpr):
    """One program per (batch, group, row i) of slabs (B, H, R, K), any strides. The mix's
    incoming gradient is grad, or with SOFTMAX P * (grad - rowsum(P * grad)) with P = probs;
    it is taken as zero where col - row > ZERO_ABOVE. out (B, H, R, K) gets its adjoint
    through w (G, CH, CH), zero there too; out may be grad (a program reads a block before
    it writes it). With WANT_DW and DW_LO <= i < DW_HI, dw (B, G, DW_ROWS, CH, CH) at row
    DW_ROW0 + i gets sum over keys of gradient[o] * x[c] (other rows are left unwritten)."""
    b, g, i, hh, head_ok = group_row_program(H, R, CH, CHP)
    g_row = group_row(grad, b, g, i, hh, sgb, sgh, sgi, CH)
    p_row = group_row(probs, b, g, i, hh, spb, sph, spi, CH)
    x_row = group_row(x, b, g, i, hh, sxb, sxh, sxi, CH)
    o_row = group_row(out, b, g, i, hh, sob, soh, soi, CH)
    # w_t[c, o] = w[g, o, c]: the adjoint's matrix
    w_ok = head_ok[:, None] & head_ok[None, :]
    w_t = tl.load(w + g * CH * CH + hh[None, :] * CH + hh[:, None], mask=w_ok, other=0.0).to(grad.dtype.element_ty)
    end = tl.minimum(K, i + ZERO_ABOVE + 1)      # columns [0, end) are not masked
    cols = tl.arange(0, BLOCK)
    if SOFTMAX:
        delta = tl.zeros([CHP], dtype=grad.dtype.element_ty)
        for c0 in range(0, end, BLOCK):
            delta += tl.sum(_row_block(p_row, c0 + cols, end, head_ok, spj)
                            * _row_block(g_row, c0 + cols, end, head_ok, sgj), axis=1)
    weight_rows = (i >= DW_LO) & (i < DW_HI)
    dw_acc = tl.zeros([CHP, CHP], dtype=grad.dtype.element_ty)
    for c0 in range(0, K, BLOCK):
        grad_in = _row_block(g_row, c0 + cols, end, head_ok, sgj)
        if SOFTMAX:
            grad_in = _row_block(p_row, c0 + cols, end, head_ok, spj) * (grad_in - delta[:, None])
        if WANT_DW & weight_rows:
            x_t = tl.trans(_row_block(x_row, c0 + cols, end, head_ok, sxj))
            dw_acc += tl.dot(grad_in, x_t, input_precision=PREC)
        adjoint = tl.dot(w_t, grad_in, input_precision=PREC)
        tl.store(o_row + (c0 + cols)[None, :] * soj, adjoint, mask=head_ok[:, None] & (c0 + cols[None, :] < K))
    if WANT_DW & weight_rows:
        dw_row = (b * (H // CH) + g).to(tl.int64) * DW_ROWS + DW_ROW0 + i
        tl.store(dw + (dw_row * CH + hh[:, None]) * CH + hh[None, :], dw_acc, mask=w_ok)


def mix_backward_rows(grad: torch.Tensor, w: torch.Tensor, x=None, probs=None, zero_above=None, rows=None,
                      precision="ieee", out=None, dw_rows=None):
    """Backward of the head mix ``mta_reference.mix_heads(x, w)`` for slabs (B, H, R, K) and
    w (G, ch, ch), H = G * ch, with incoming gradient ``grad``, or, given ``probs`` (the
    softmax P the mix was applied to), the gradient before that softmax: P * (grad -
    rowsum(P * grad)). The incoming gradient is taken as zero where col - row > zero_above
    (None: nowhere), as the causal slabs are.

    Returns (dx, dw): dx (B, H, R, K) written to ``out`` (grad itself allowed: in place) or
    a new tensor, zero where the gradient is; dw (G, ch, ch) summed over the batch, the rows
    ``rows`` = (lo, hi) of the slab (all by default) and the keys, in a fixed order, or None
    without x. With dw_rows = (buffer (B, G, N, ch, ch) contiguous, row0), each of those rows
    i writes its share to row row0 + i of the buffer instead, and dw is None: the caller sums
    the buffer once (the row-chunked backward, one sum for all its chunks). precision: tl.dot's
    for fp32 slabs ("tf32" or "ieee"; fp64 is exact)."""
    B, H, R, K = grad.shape
    G, ch, _ = w.shape
    zeros = row_kernel_zero_above(zero_above)
    out = torch.empty_like(grad) if out is None else out
    lo, hi = rows or (0, R)
    summed = x is not None and dw_rows is None
    if grad.numel() == 0:
        return out, torch.zeros(G, ch, ch, device=grad.device, dtype=grad.dtype) if summed else None
    if x is None:
        partial, row0 = grad, 0
    elif dw_rows is not None:
        partial, row0 = dw_rows
        N = partial.shape[2] if partial.dim() == 5 else -1
        if not partial.is_contiguous() or tuple(partial.shape) != (B, G, N, ch, ch) or N < row0 + hi:
            raise ValueError(f"dw_rows must hold a contiguous ({B}, {G}, N, {ch}, {ch}) buffer with "
                             f"N >= {row0 + hi}, got {tuple(partial.shape)}")
    else:
        partial, row0 = torch.empty(B, G, R, ch, ch, device=grad.device, dtype=grad.dtype), 0
    chp = max(16, _next_pow2(ch))
    block = min(max(16, MIX_BACKWARD_CONFIG["elements"] // chp), max(16, _next_pow2(K)))
    mix_backward_rows_kernel[(B * G * R,)](
        grad, grad if probs is None else probs, grad if x is None else x, w.to(grad.dtype).contiguous(), out, partial,
        *grad.stride(), *(grad if probs is None else probs).stride(), *(grad if x is None else x).stride(),
        *out.stride(), H, R, K, zeros, lo, hi, row0, partial.shape[2] if x is not None else R,
        CH=ch, CHP=chp, SOFTMAX=probs is not None, WANT_DW=x is not None, BLOCK=block,
        PREC="ieee" if grad.dtype == torch.float64 else precision, num_warps=MIX_BACKWARD_CONFIG["num_warps"])
    return out, partial[:, :, lo:hi].sum((0, 2)) if summed else None

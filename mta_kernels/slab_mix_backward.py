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

from .forward import _next_pow2, acc_dtype
from .slab_conv import row_kernel_zero_above
from .slab_mix import group_row, group_row_program, load_end, row_block_elements

# key block of about this many elements (heads x keys) for fp32 and for 16-bit slabs, the warps and
# the software-pipelining stages (slab_mix.MIX_CONFIG's note)
MIX_BACKWARD_CONFIG = dict(elements=2048, elements_16bit=4096, num_warps=4, num_stages=1)


@triton.jit
def _row_block(base, cols, end, loaded, head_ok, sj, MATH: tl.constexpr):
    """[CHP, BLOCK] block of one row of the group's heads in dtype MATH, zero at cols >= end
    (loaded up to load_end)."""
    x = tl.load(base + cols[None, :] * sj, mask=head_ok[:, None] & (cols[None, :] < loaded), other=0.0)
    return tl.where(cols[None, :] < end, x.to(MATH), 0.0)


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
    DW_ROW0 + i gets sum over keys of gradient[o] * x[c] (other rows are left unwritten). The
    math runs in w's dtype (fp32 for 16-bit slabs)."""
    MATH: tl.constexpr = w.dtype.element_ty
    b, g, i, hh, head_ok = group_row_program(H, R, CH, CHP)
    g_row = group_row(grad, b, g, i, hh, sgb, sgh, sgi, CH)
    p_row = group_row(probs, b, g, i, hh, spb, sph, spi, CH)
    x_row = group_row(x, b, g, i, hh, sxb, sxh, sxi, CH)
    o_row = group_row(out, b, g, i, hh, sob, soh, soi, CH)
    # w_t[c, o] = w[g, o, c]: the adjoint's matrix
    w_ok = head_ok[:, None] & head_ok[None, :]
    w_t = tl.load(w + g * CH * CH + hh[None, :] * CH + hh[:, None], mask=w_ok, other=0.0)
    end = tl.minimum(K, i + ZERO_ABOVE + 1)      # columns [0, end) are not masked
    loaded = load_end(end, K)
    cols = tl.arange(0, BLOCK)
    if SOFTMAX:
        delta = tl.zeros([CHP], dtype=MATH)
        for c0 in range(0, end, BLOCK):
            delta += tl.sum(_row_block(p_row, c0 + cols, end, loaded, head_ok, spj, MATH)
                            * _row_block(g_row, c0 + cols, end, loaded, head_ok, sgj, MATH), axis=1)
    weight_rows = (i >= DW_LO) & (i < DW_HI)
    dw_acc = tl.zeros([CHP, CHP], dtype=MATH)
    for c0 in range(0, K, BLOCK):
        grad_in = _row_block(g_row, c0 + cols, end, loaded, head_ok, sgj, MATH)
        if SOFTMAX:
            grad_in = _row_block(p_row, c0 + cols, end, loaded, head_ok, spj, MATH) * (grad_in - delta[:, None])
        if WANT_DW & weight_rows:
            x_t = tl.trans(_row_block(x_row, c0 + cols, end, loaded, head_ok, sxj, MATH))
            dw_acc += tl.dot(grad_in, x_t, input_precision=PREC)
        adjoint = tl.dot(w_t, grad_in, input_precision=PREC)
        tl.store(o_row + (c0 + cols)[None, :] * soj, adjoint.to(out.dtype.element_ty),
                 mask=head_ok[:, None] & (c0 + cols[None, :] < K))
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
    the buffer once (the row-chunked backward, one sum for all its chunks). The slabs may be
    16-bit: the math then runs in fp32, and dw (and the buffer) are fp32. precision: tl.dot's
    for the fp32 math ("tf32" or "ieee"; fp64 is exact)."""
    B, H, R, K = grad.shape
    G, ch, _ = w.shape
    zeros = row_kernel_zero_above(zero_above)
    out = torch.empty_like(grad) if out is None else out
    lo, hi = rows or (0, R)
    summed = x is not None and dw_rows is None
    math = acc_dtype(grad)
    if grad.numel() == 0:
        return out, torch.zeros(G, ch, ch, device=grad.device, dtype=math) if summed else None
    if x is None:
        partial, row0 = grad, 0
    elif dw_rows is not None:
        partial, row0 = dw_rows
        _row_buffer(partial, B, G, ch, row0 + hi, "dw_rows")
    else:
        partial, row0 = torch.empty(B, G, R, ch, ch, device=grad.device, dtype=math), 0
    chp = max(16, _next_pow2(ch))
    block = min(max(16, row_block_elements(MIX_BACKWARD_CONFIG, grad) // chp), max(16, _next_pow2(K)))
    mix_backward_rows_kernel[(B * G * R,)](
        grad, grad if probs is None else probs, grad if x is None else x, w.to(math).contiguous(), out, partial,
        *grad.stride(), *(grad if probs is None else probs).stride(), *(grad if x is None else x).stride(),
        *out.stride(), H, R, K, zeros, lo, hi, row0, partial.shape[2] if x is not None else R,
        CH=ch, CHP=chp, SOFTMAX=probs is not None, WANT_DW=x is not None, BLOCK=block,
        PREC="ieee" if grad.dtype == torch.float64 else precision, num_warps=MIX_BACKWARD_CONFIG["num_warps"],
        num_stages=MIX_BACKWARD_CONFIG["num_stages"])
    return out, partial[:, :, lo:hi].sum((0, 2)) if summed else None


@triton.jit
def _talking_heads_probs(s_row, w_pre, row_lse, cols, end, loaded, head_ok, ssj, PREC: tl.constexpr):
    """A block of one row's scores s [CHP, BLOCK] (zero at cols >= end; loaded up to load_end)
    in w_pre's dtype, and the probabilities exp(w_pre s - lse) there (zero at cols >= end and
    for padding heads)."""
    s = _row_block(s_row, cols, end, loaded, head_ok, ssj, w_pre.dtype)
    ok = head_ok[:, None] & (cols[None, :] < end)
    p = tl.where(ok, tl.exp(tl.dot(w_pre, s, input_precision=PREC) - row_lse[:, None]), 0.0)
    return s, p


@triton.jit
def talking_heads_backward_rows_kernel(da, s, lse, w_pre, w_post, out, dw_pre, dw_post, a_out,
                                       sdb, sdh, sdi, sdj, ssb, ssh, ssi, ssj, slb, slh, sob, soh, soi, soj,
                                       sab, sah, sai, saj, H, R, K, ZERO_ABOVE, DW_ROW0, DW_ROWS,
                                       CH: tl.constexpr, CHP: tl.constexpr, WANT_DW_PRE: tl.constexpr,
                                       WANT_DW_POST: tl.constexpr, WRITE_A: tl.constexpr, BLOCK: tl.constexpr,
                                       PREC: tl.constexpr):
    """Talking heads' backward from dA to the scores, one program per (batch, group, row i) of
    slabs (B, H, R, K), any strides: with P = exp(w_pre s - lse) (the forward's log-sum-exp;
    zero where col - row > ZERO_ABOVE), A = w_post P and da = dL/dA,

        dP = w_post^T da,  dZ = P * (dP - rowsum(P * dP)),  out = dL/ds = w_pre^T dZ,

    out (zero in the causal future) may be da itself (a program reads a block before it writes
    it). With WANT_DW_PRE / WANT_DW_POST, row DW_ROW0 + i of dw_pre / dw_post (B, G, DW_ROWS,
    CH, CH) gets sum over keys of dZ[o] s[c] / da[o] P[c]. With WRITE_A, a_out (B, H, R, K)
    gets A (zero in the causal future), for dV = A^T dO. Two sweeps over the row's keys:
    rowsum(P * dP) (and A) first, then dZ."""
    b, g, i, hh, head_ok = group_row_program(H, R, CH, CHP)
    da_row = group_row(da, b, g, i, hh, sdb, sdh, sdi, CH)
    s_row = group_row(s, b, g, i, hh, ssb, ssh, ssi, CH)
    o_row = group_row(out, b, g, i, hh, sob, soh, soi, CH)
    a_row = group_row(a_out, b, g, i, hh, sab, sah, sai, CH)
    w_ok = head_ok[:, None] & head_ok[None, :]
    w_at = g * CH * CH + hh[:, None] * CH + hh[None, :]          # [o, c]
    w_at_t = g * CH * CH + hh[None, :] * CH + hh[:, None]        # [c, o]: the adjoints' matrices
    w_pre_g = tl.load(w_pre + w_at, mask=w_ok, other=0.0)
    w_pre_t = tl.load(w_pre + w_at_t, mask=w_ok, other=0.0)
    w_post_t = tl.load(w_post + w_at_t, mask=w_ok, other=0.0)
    if WRITE_A:
        w_post_g = tl.load(w_post + w_at, mask=w_ok, other=0.0)
    heads = (g * CH + hh).to(tl.int64)
    row_lse = tl.load(lse + b.to(tl.int64) * slb + heads * slh + i, mask=head_ok, other=0.0)
    end = tl.minimum(K, i + ZERO_ABOVE + 1)      # columns [0, end) are not masked
    loaded = load_end(end, K)
    cols = tl.arange(0, BLOCK)
    delta = tl.zeros([CHP], dtype=w_pre_g.dtype)
    dw_post_acc = tl.zeros([CHP, CHP], dtype=w_pre_g.dtype)
    for c0 in range(0, end, BLOCK):
        _, p = _talking_heads_probs(s_row, w_pre_g, row_lse, c0 + cols, end, loaded, head_ok, ssj, PREC)
        da_blk = _row_block(da_row, c0 + cols, end, loaded, head_ok, sdj, w_pre_g.dtype)
        delta += tl.sum(p * tl.dot(w_post_t, da_blk, input_precision=PREC), axis=1)
        if WANT_DW_POST:
            dw_post_acc += tl.dot(da_blk, tl.trans(p), input_precision=PREC)
        if WRITE_A:
            a = tl.dot(w_post_g, p, input_precision=PREC)
            tl.store(a_row + (c0 + cols)[None, :] * saj, a.to(a_out.dtype.element_ty),
                     mask=head_ok[:, None] & (c0 + cols[None, :] < K))
    dw_pre_acc = tl.zeros([CHP, CHP], dtype=w_pre_g.dtype)
    for c0 in range(0, end, BLOCK):
        s_blk, p = _talking_heads_probs(s_row, w_pre_g, row_lse, c0 + cols, end, loaded, head_ok, ssj, PREC)
        da_blk = _row_block(da_row, c0 + cols, end, loaded, head_ok, sdj, w_pre_g.dtype)
        dz = p * (tl.dot(w_post_t, da_blk, input_precision=PREC) - delta[:, None])
        if WANT_DW_PRE:
            dw_pre_acc += tl.dot(dz, tl.trans(s_blk), input_precision=PREC)
        ds = tl.dot(w_pre_t, dz, input_precision=PREC)
        tl.store(o_row + (c0 + cols)[None, :] * soj, ds.to(out.dtype.element_ty),
                 mask=head_ok[:, None] & (c0 + cols[None, :] < K))
    # the causal future past the last block holding a key of the row: zeros
    for c0 in range(tl.cdiv(end, BLOCK) * BLOCK, K, BLOCK):
        tl.store(o_row + (c0 + cols)[None, :] * soj, tl.zeros([CHP, BLOCK], dtype=out.dtype.element_ty),
                 mask=head_ok[:, None] & (c0 + cols[None, :] < K))
        if WRITE_A:
            tl.store(a_row + (c0 + cols)[None, :] * saj, tl.zeros([CHP, BLOCK], dtype=a_out.dtype.element_ty),
                     mask=head_ok[:, None] & (c0 + cols[None, :] < K))
    dw_row = (b * (H // CH) + g).to(tl.int64) * DW_ROWS + DW_ROW0 + i
    if WANT_DW_PRE:
        tl.store(dw_pre + (dw_row * CH + hh[:, None]) * CH + hh[None, :], dw_pre_acc, mask=w_ok)
    if WANT_DW_POST:
        tl.store(dw_post + (dw_row * CH + hh[:, None]) * CH + hh[None, :], dw_post_acc, mask=w_ok)


# talking_heads_backward_rows' key block (heads x keys elements) and warps. H200, one chunk of
# 1024 rows by 3072 keys of L=4096, 16 heads, bf16 scores (scripts/tune.py thbackward,
# notes/tune_thbackward_h200_4fae9fb.log and _efb9e19.log): bf16 dA 0.275 ms at 1024 / 1 warp,
# 0.301 at 1024 / 2, 0.329 at 2048 / 2, 0.424 at 2048 / 4, 0.441 at 1024 / 4, 0.426-0.435 at 512 / 1
# and 512 / 2, 0.532 at 4096 / 4, 0.64 at 256 / 1, 0.92 at 4096 / 8; fp32 dA 0.42-0.58. With the
# loads vectorized (notes/tune_rows16_h200_c9f2df8.log, rows 2048..4096 of L=4096): 0.485 ms against
# 0.595 at 1024 / 1 warp / 3 stages (1 or 2 stages 0.62 / 0.55, 512 0.547, 2048 0.650, 2 warps 0.638).
TALKING_HEADS_BACKWARD_CONFIG = dict(elements=1024, num_warps=1, num_stages=3)


def _row_buffer(buffer, B, G, ch, rows_needed, name):
    """Checks a per-row weight-gradient buffer (B, G, N, ch, ch), contiguous, N >= rows_needed."""
    N = buffer.shape[2] if buffer.dim() == 5 else -1
    if not buffer.is_contiguous() or tuple(buffer.shape) != (B, G, N, ch, ch) or N < rows_needed:
        raise ValueError(f"{name} must hold a contiguous ({B}, {G}, N, {ch}, {ch}) buffer with "
                         f"N >= {rows_needed}, got {tuple(buffer.shape)}")
    return buffer


def talking_heads_backward_rows(da: torch.Tensor, s: torch.Tensor, lse: torch.Tensor, w_pre: torch.Tensor,
                                w_post: torch.Tensor, zero_above=None, precision="ieee", out=None,
                                dw_pre_rows=None, dw_post_rows=None, row0=0, a_out=None) -> torch.Tensor:
    """Talking heads' backward on slabs (B, H, R, K): the gradient of the scores s (the pre
    mix's input) from da, the gradient of A = mix_heads(softmax(mix_heads(s, w_pre)), w_post),
    with the softmax's rows given by the forward's log-sum-exp ``lse`` (B, H, R) (unit stride
    along R), entries where col - row > zero_above masked (None: none). w_pre, w_post (G, ch,
    ch); s and da may be 16-bit (the math runs in w_pre's dtype). Written to ``out`` (da itself
    allowed: in place) or a new tensor of w_pre's dtype. dw_pre_rows / dw_post_rows: buffers
    (B, G, N, ch, ch) whose rows row0 + i (i < R) get each slab row's share of the weight
    gradients (None: not computed); the caller sums them. ``a_out`` (B, H, R, K), of any dtype
    and strides, gets A on the way (zero in the causal future), for dV = A^T dO without a
    recomputation of its own. precision: tl.dot's for fp32 math ("tf32" or "ieee"; fp64 is
    exact). Returns out."""
    B, H, R, K = da.shape
    G, ch, _ = w_pre.shape
    if s.shape != da.shape or w_post.shape != w_pre.shape:
        raise ValueError(f"s must have da's shape {tuple(da.shape)} and w_post w_pre's {tuple(w_pre.shape)}, "
                         f"got {tuple(s.shape)} and {tuple(w_post.shape)}")
    if lse.shape != (B, H, R) or (R > 1 and lse.stride(2) != 1):
        raise ValueError(f"lse must be ({B}, {H}, {R}) with unit stride along its last dim, got "
                         f"{tuple(lse.shape)}, strides {lse.stride()}")
    if a_out is not None and a_out.shape != da.shape:
        raise ValueError(f"a_out must have da's shape {tuple(da.shape)}, got {tuple(a_out.shape)}")
    out = torch.empty(da.shape, device=da.device, dtype=w_pre.dtype) if out is None else out
    if da.numel() == 0:
        return out
    buffers = [None if x is None else _row_buffer(x, B, G, ch, row0 + R, name)
               for x, name in ((dw_pre_rows, "dw_pre_rows"), (dw_post_rows, "dw_post_rows"))]
    dw_rows = next((x for x in buffers if x is not None), None)
    if all(x is not None for x in buffers) and buffers[0].shape != buffers[1].shape:
        raise ValueError(f"dw_pre_rows and dw_post_rows must have one shape, got {tuple(buffers[0].shape)} "
                         f"and {tuple(buffers[1].shape)}")
    cd = w_pre.dtype
    chp = max(16, _next_pow2(ch))
    config = TALKING_HEADS_BACKWARD_CONFIG
    block = min(max(16, config["elements"] // chp), max(16, _next_pow2(K)))
    talking_heads_backward_rows_kernel[(B * G * R,)](
        da, s, lse, w_pre.contiguous(), w_post.to(cd).contiguous(), out,
        da if buffers[0] is None else buffers[0], da if buffers[1] is None else buffers[1],
        da if a_out is None else a_out, *da.stride(), *s.stride(), *lse.stride()[:2], *out.stride(),
        *(da if a_out is None else a_out).stride(), H, R, K, row_kernel_zero_above(zero_above),
        row0, 0 if dw_rows is None else dw_rows.shape[2],
        CH=ch, CHP=chp, WANT_DW_PRE=buffers[0] is not None, WANT_DW_POST=buffers[1] is not None,
        WRITE_A=a_out is not None, BLOCK=block,
        PREC="ieee" if cd == torch.float64 else precision, num_warps=config["num_warps"],
        num_stages=config["num_stages"])
    return out

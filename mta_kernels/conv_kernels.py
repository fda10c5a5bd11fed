"""The key-query convolution on materialized slabs of scores, and its two gradients.

Used by the row-chunked backward (chunked_backward.py), which holds (B, H, R, L) slabs of
the forward's intermediates. PyTorch's depthwise conv kernels spend most of that backward's
time (its weight gradient alone took 60% of it on the H200); these are plain stencils:
each program owns a [BR, BC] tile and reads the input at the CQ * CK offsets of the kernel.

With pL the kernel's left padding, for x (R, L) of one (batch, head):

    conv:         out[i, j] = sum_{a,t} w[a, t] x[i + a - (CQ-1), j + t - pL]
    input grad:   out[i, j] = sum_{a,t} w[a, t] g[i - a + (CQ-1), j - t + pL]     (TRANSPOSE)
    weight grad:  dw[a, t]  = sum_{i,j} g[i, j] x[i + a - (CQ-1), j + t - pL]

Reads outside [0, R) x [0, L) are zero, as in mta_reference.key_query_conv.

Causal slabs are zero above a diagonal: x[i, j] = 0 whenever j - i > ZERO_ABOVE. A tile
whose every tap reads only there is skipped (zeros written): REACH is how far above the
diagonal a tap can read, so about half the tiles of a causal slab cost nothing.
"""
import triton
import triton.language as tl


@triton.jit
def _tile(i_bh, H, sb, sh, si, sj):
    """Offset of (batch, head) i_bh in a (B, H, R, L) tensor with strides (sb, sh, si, sj)."""
    return (i_bh // H) * sb + (i_bh % H) * sh


@triton.jit
def _shifted(base, rows, cols, si, sj, R, LC):
    """[BR, BC] block of a (R, LC) plane at the given (possibly out-of-range) rows and cols."""
    ok = (rows[:, None] >= 0) & (rows[:, None] < R) & (cols[None, :] >= 0) & (cols[None, :] < LC)
    return tl.load(base + rows[:, None].to(tl.int64) * si + cols[None, :] * sj, mask=ok, other=0.0)


@triton.jit
def _above_diagonal(ZERO_ABOVE, REACH, BR: tl.constexpr, BC: tl.constexpr):
    """Whether this program's tile (program_id 1 and 2) reads only where the input is zero."""
    first_col = tl.program_id(2) * BC
    last_row = tl.program_id(1) * BR + BR - 1
    return first_col - last_row > ZERO_ABOVE + REACH


@triton.jit
def kq_conv_kernel(x, w, out, sxb, sxh, sxi, sxj, H, R, LC, ZERO_ABOVE, REACH,
                   CQ: tl.constexpr, CK: tl.constexpr, PL: tl.constexpr, TRANSPOSE: tl.constexpr,
                   BR: tl.constexpr, BC: tl.constexpr):
    """out (B, H, R, LC) contiguous: the conv of x (B, H, R, LC) (any strides) with
    w (H, CQ, CK), or with TRANSPOSE its adjoint (the input gradient). Accumulates in
    out's dtype."""
    i_bh = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BR + tl.arange(0, BR)
    cols = tl.program_id(2) * BC + tl.arange(0, BC)
    base = x + _tile(i_bh, H, sxb, sxh, sxi, sxj)
    w_head = w + (i_bh % H) * (CQ * CK)
    acc = tl.zeros([BR, BC], dtype=out.dtype.element_ty)
    if not _above_diagonal(ZERO_ABOVE, REACH, BR, BC):
        for a in range(CQ):
            for t in range(CK):
                if TRANSPOSE:
                    src_r, src_c = rows + (CQ - 1 - a), cols + (PL - t)
                else:
                    src_r, src_c = rows + (a - (CQ - 1)), cols + (t - PL)
                acc += tl.load(w_head + a * CK + t) * _shifted(base, src_r, src_c, sxi, sxj, R, LC)
    ok = (rows[:, None] < R) & (cols[None, :] < LC)
    tl.store(out + (i_bh * R + rows[:, None]) * LC + cols[None, :], acc, mask=ok)


@triton.jit
def kq_conv_weight_grad_kernel(g, x, partial, sgb, sgh, sgi, sgj, sxb, sxh, sxi, sxj, H, R, LC, ZERO_ABOVE,
                               CQ: tl.constexpr, CK: tl.constexpr, PL: tl.constexpr,
                               BR: tl.constexpr, BC: tl.constexpr):
    """partial (B * H, n_row_tiles * n_col_tiles, CQ * CK), zero-filled: this tile's share of
    dw[a, t] = sum g[i, j] x[i + a - (CQ-1), j + t - PL]; the host sums it in a fixed order.
    ZERO_ABOVE describes g (tiles where g is zero are skipped)."""
    if _above_diagonal(ZERO_ABOVE, 0, BR, BC):
        return
    i_bh = tl.program_id(0).to(tl.int64)
    i_tile = tl.program_id(1) * tl.num_programs(2) + tl.program_id(2)
    rows = tl.program_id(1) * BR + tl.arange(0, BR)
    cols = tl.program_id(2) * BC + tl.arange(0, BC)
    b_g = _shifted(g + _tile(i_bh, H, sgb, sgh, sgi, sgj), rows, cols, sgi, sgj, R, LC)
    base = x + _tile(i_bh, H, sxb, sxh, sxi, sxj)
    dst = partial + (i_bh * (tl.num_programs(1) * tl.num_programs(2)) + i_tile) * (CQ * CK)
    for a in range(CQ):
        for t in range(CK):
            b_x = _shifted(base, rows + (a - (CQ - 1)), cols + (t - PL), sxi, sxj, R, LC)
            tl.store(dst + a * CK + t, tl.sum(tl.sum(b_g * b_x, axis=1), axis=0))

"""Triton row kernels over slabs: a program per (batch, mixing group, row) of (B, H, R, K) slabs.

A slab holds query rows of the (B, H, L, L) MTA tensors, materialized for a chunk of rows.
A row kernel reads one row of every head of a mixing group, key block by key block, so that
a head mix is one [heads, heads] x [heads, keys] tl.dot per block. The causal future of a
slab of rows lo.. lies where col - row > ZERO_ABOVE (= lo); row kernels read only up to
load_end there and mask the rest with tl.where, so whatever the future holds is never used.
"""
import triton
import triton.language as tl


@triton.jit
def group_row_program(H, R, CH: tl.constexpr, CHP: tl.constexpr):
    """(b, g, i, hh, head_ok) of this program where a program holds row i of the CH heads of
    group g in batch element b of (B, H, R, K) slabs (the grid is B * H / CH * R programs):
    hh = arange(CHP), the heads g * CH + hh, head_ok where hh < CH (CHP: CH padded)."""
    n = tl.program_id(0)
    G = H // CH
    bg, i = n // R, n % R
    hh = tl.arange(0, CHP)
    return bg // G, bg % G, i, hh, hh < CH


@triton.jit
def group_row(ptr, b, g, i, hh, sb, sh, si, CH: tl.constexpr):
    """[CHP, 1] pointers to row i of heads g * CH + hh of batch element b in a (B, H, R, K)
    tensor with strides (sb, sh, si, .)."""
    heads = (g * CH + hh)[:, None].to(tl.int64)
    return ptr + b.to(tl.int64) * sb + heads * sh + i.to(tl.int64) * si


@triton.jit
def load_end(end, K):
    """The columns [0, load_end) a row kernel loads where it uses columns [0, end) of a row of K:
    end rounded up to a multiple of 16, at most K. The kernel masks the columns in between
    with tl.where after the load; a load mask ending at ``end`` itself changes within a
    16-column run, so each element became a load of its own (2-byte loads for 16-bit slabs)."""
    return tl.minimum(K, tl.cdiv(end, 16) * 16)


@triton.jit
def mix_rows_kernel(x, w, out, sxb, sxh, sxi, sxj, sob, soh, soi, soj, H, R, K, ZERO_ABOVE,
                    CH: tl.constexpr, CHP: tl.constexpr, BLOCK: tl.constexpr, PREC: tl.constexpr):
    """out (B, H, R, K) = the head mix of x (B, H, R, K) with w (G, CH, CH): out[o] = sum_c
    w[g, o, c] x[c] within group g, x taken as zero where col - row > ZERO_ABOVE; any strides,
    out in its own dtype. One program per (batch, group, row); CHP: CH rounded up to a power
    of two >= 16."""
    b, g, i, hh, head_ok = group_row_program(H, R, CH, CHP)
    src = group_row(x, b, g, i, hh, sxb, sxh, sxi, CH)
    dst = group_row(out, b, g, i, hh, sob, soh, soi, CH)
    w_ok = head_ok[:, None] & head_ok[None, :]
    w_g = tl.load(w + g * CH * CH + hh[:, None] * CH + hh[None, :], mask=w_ok, other=0.0).to(x.dtype.element_ty)
    end = tl.minimum(K, i + ZERO_ABOVE + 1)      # columns [end, K) are zero
    loaded = load_end(end, K)
    cols = tl.arange(0, BLOCK)
    for c0 in range(0, K, BLOCK):
        c = c0 + cols
        block = tl.load(src + c[None, :] * sxj, mask=head_ok[:, None] & (c[None, :] < loaded), other=0.0)
        mixed = tl.where(c[None, :] < end, tl.dot(w_g, block, input_precision=PREC), 0.0)
        tl.store(dst + c[None, :] * soj, mixed.to(out.dtype.element_ty), mask=head_ok[:, None] & (c[None, :] < K))


@triton.jit
def _masked_block(row, cols, end, loaded, sj, scale, MATH: tl.constexpr):
    """[BLOCK] columns cols of a row in MATH times scale, -inf at cols >= end (loaded up to load_end)."""
    v = tl.load(row + cols * sj, mask=cols < loaded, other=0.0).to(MATH) * scale
    return tl.where(cols < end, v, float("-inf"))


@triton.jit
def softmax_rows_kernel(x, lse, sb, sh, si, sj, H, R, K, ZERO_ABOVE, scale,
                        MATH: tl.constexpr, WRITE_LSE: tl.constexpr, BLOCK: tl.constexpr):
    """x (B, H, R, K), any strides, overwritten row by row with softmax(scale * x) over its
    last dim, where entries with col - row > ZERO_ABOVE count as -inf (and are written as
    zero); with WRITE_LSE, lse (B, H, R) contiguous gets each row's log-sum-exp. The math runs
    in MATH (fp32 for 16-bit x; lse's dtype). One program per row; every row must keep column
    0 (ZERO_ABOVE >= 0)."""
    n = tl.program_id(0)
    bh, i = n // R, n % R
    row = x + (bh // H).to(tl.int64) * sb + (bh % H).to(tl.int64) * sh + i.to(tl.int64) * si
    end = tl.minimum(K, i + ZERO_ABOVE + 1)      # columns [0, end) are not masked
    loaded = load_end(end, K)
    cols = tl.arange(0, BLOCK)
    # online max and sum over the unmasked columns
    v = _masked_block(row, cols, end, loaded, sj, scale, MATH)
    row_max = tl.max(v, axis=0)
    row_sum = tl.sum(tl.exp(v - row_max), axis=0)
    for c0 in range(BLOCK, end, BLOCK):
        v = _masked_block(row, c0 + cols, end, loaded, sj, scale, MATH)
        new_max = tl.maximum(row_max, tl.max(v, axis=0))
        row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(v - new_max), axis=0)
        row_max = new_max
    inv_sum = 1.0 / row_sum
    for c0 in range(0, K, BLOCK):
        v = _masked_block(row, c0 + cols, end, loaded, sj, scale, MATH)
        tl.store(row + (c0 + cols) * sj, (tl.exp(v - row_max) * inv_sum).to(x.dtype.element_ty), mask=c0 + cols < K)
    if WRITE_LSE:
        tl.store(lse + n, row_max + tl.log(row_sum))


LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _exp(x, BASE2: tl.constexpr):
    """exp2(x) with BASE2 (x already in base-2 units), else exp(x)."""
    if BASE2:
        return tl.exp2(x)
    return tl.exp(x)


@triton.jit
def _split16(w, dtype: tl.constexpr):
    """(hi, lo): w (fp32) as the sum of two values of 16-bit dtype, hi = w rounded and lo the
    rest rounded (16 mantissa bits in bf16 together, more than TF32's 10), for two 16-bit dots
    with fp32 sums in place of one on fp32 operands."""
    hi = w.to(dtype)
    return hi, (w - hi.to(w.dtype)).to(dtype)


@triton.jit
def _mixed_block(src, w_g, w_lo, cols, end, loaded, head_ok, sj, PREC: tl.constexpr, MIX16: tl.constexpr):
    """[CHP, BLOCK] mixed logits sum_c w_g[o, c] x[c, cols] of one row in fp32 (fp64 for fp64),
    -inf at cols >= end (loaded up to load_end). With MIX16, x is 16-bit and w_g, w_lo are the
    16-bit high and low parts of the weight: two 16-bit dots with fp32 sums, x as it is."""
    x = tl.load(src + cols[None, :] * sj, mask=head_ok[:, None] & (cols[None, :] < loaded), other=0.0)
    if MIX16:
        m = tl.dot(w_lo, x, tl.dot(w_g, x))
    else:
        m = tl.dot(w_g, x.to(w_g.dtype), input_precision=PREC)
    return tl.where(cols[None, :] < end, m, float("-inf"))


@triton.jit
def mix_softmax_rows_kernel(x, w, w_post, out, lse, sxb, sxh, sxi, sxj, sob, soh, soi, soj, slb, slh,
                            H, R, K, ZERO_ABOVE, CH: tl.constexpr, CHP: tl.constexpr, WRITE_LSE: tl.constexpr,
                            READ_LSE: tl.constexpr, POST_MIX: tl.constexpr, WRITE_FUTURE: tl.constexpr,
                            BLOCK: tl.constexpr, PREC: tl.constexpr, MIX16: tl.constexpr, POST16: tl.constexpr,
                            EXP2: tl.constexpr, LONGEST_FIRST: tl.constexpr):
    """out (B, H, R, K) = softmax over keys of the head mix of x (B, H, R, K) with w (G, CH, CH)
    (out[o] = sum_c w[g, o, c] x[c] within group g), entries with col - row > ZERO_ABOVE taken
    as -inf and written as zero; out may be x (each program reads a block of its rows before
    it writes it). With POST_MIX, out is that softmax mixed again with w_post (G, CH, CH), in
    out's dtype. With WRITE_LSE, lse (B, H, R) with strides (slb, slh, 1) gets each row's
    log-sum-exp (of the first mix's logits); with READ_LSE it holds them already (from the
    forward), and one sweep over the keys normalises with them. Without WRITE_FUTURE, the
    key blocks past the row's last key are left unwritten (for slabs.matmul.causal_pv, which
    masks them). The math runs in w's dtype (fp32 for 16-bit x); with MIX16 (POST16) the pre
    (post) mix is two dots in x's 16-bit dtype on w's high and low parts, with EXP2 the logits are
    in base 2 (the lse written and read stays natural). One program per (batch, group, row),
    with LONGEST_FIRST the last rows first; CHP: CH rounded up to a power of two >= 16."""
    b, g, i, hh, head_ok = group_row_program(H, R, CH, CHP)
    if LONGEST_FIRST:
        i = R - 1 - i
    heads = g * CH + hh
    src = group_row(x, b, g, i, hh, sxb, sxh, sxi, CH)
    dst = group_row(out, b, g, i, hh, sob, soh, soi, CH)
    w_ok = head_ok[:, None] & head_ok[None, :]
    w_g = tl.load(w + g * CH * CH + hh[:, None] * CH + hh[None, :], mask=w_ok, other=0.0)
    if EXP2:
        w_g = w_g * LOG2E       # logits in base 2: exp2 below, no multiply per element
    w_lo = w_g
    if MIX16:
        w_g, w_lo = _split16(w_g, x.dtype.element_ty)
    if POST_MIX:
        # zero columns for the padding heads, whose softmax is not zero
        w_post_g = tl.load(w_post + g * CH * CH + hh[:, None] * CH + hh[None, :], mask=w_ok, other=0.0)
        w_post_lo = w_post_g
        if POST16:
            w_post_g, w_post_lo = _split16(w_post_g, x.dtype.element_ty)
    end = tl.minimum(K, i + ZERO_ABOVE + 1)      # columns [0, end) are not masked
    loaded = load_end(end, K)
    cols = tl.arange(0, BLOCK)
    lse_at = lse + b.to(tl.int64) * slb + heads.to(tl.int64) * slh + i
    if READ_LSE:
        row_max = tl.load(lse_at, mask=head_ok, other=0.0)
        if EXP2:
            row_max = row_max * LOG2E
        inv_sum = tl.full([CHP], 1.0, dtype=row_max.dtype)
    else:
        # online max and sum per head over the unmasked columns (padding heads mix to zeros)
        m = _mixed_block(src, w_g, w_lo, cols, end, loaded, head_ok, sxj, PREC, MIX16)
        row_max = tl.max(m, axis=1)
        row_sum = tl.sum(_exp(m - row_max[:, None], EXP2), axis=1)
        for c0 in range(BLOCK, end, BLOCK):
            m = _mixed_block(src, w_g, w_lo, c0 + cols, end, loaded, head_ok, sxj, PREC, MIX16)
            new_max = tl.maximum(row_max, tl.max(m, axis=1))
            row_sum = row_sum * _exp(row_max - new_max, EXP2) + tl.sum(_exp(m - new_max[:, None], EXP2), axis=1)
            row_max = new_max
        inv_sum = 1.0 / row_sum
    for c0 in range(0, K if WRITE_FUTURE else end, BLOCK):
        m = _mixed_block(src, w_g, w_lo, c0 + cols, end, loaded, head_ok, sxj, PREC, MIX16)
        p = _exp(m - row_max[:, None], EXP2) * inv_sum[:, None]
        if POST_MIX:
            if POST16:
                p16 = p.to(x.dtype.element_ty)
                p = tl.dot(w_post_lo, p16, tl.dot(w_post_g, p16))
            else:
                p = tl.dot(w_post_g, p, input_precision=PREC)
        tl.store(dst + (c0 + cols)[None, :] * soj, p.to(out.dtype.element_ty),
                 mask=head_ok[:, None] & (c0 + cols[None, :] < K))
    if WRITE_LSE:
        if EXP2:
            tl.store(lse_at, (row_max + tl.log2(row_sum)) * LN2, mask=head_ok)
        else:
            tl.store(lse_at, row_max + tl.log(row_sum), mask=head_ok)


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
    rowsum(P * dP) and rowsum(P) first, then dZ (and A) with P renormalised."""
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
    # sweep 1: rowsum(P * dP) and rowsum(P), with which sweep 2 renormalises P: exp(z - lse)
    # carries the fp32 rounding of the forward's lse (relative error ~ |lse| eps), the ratio not
    delta = tl.zeros([CHP], dtype=w_pre_g.dtype)
    row_sum = tl.zeros([CHP], dtype=w_pre_g.dtype)
    for c0 in range(0, end, BLOCK):
        _, p = _talking_heads_probs(s_row, w_pre_g, row_lse, c0 + cols, end, loaded, head_ok, ssj, PREC)
        da_blk = _row_block(da_row, c0 + cols, end, loaded, head_ok, sdj, w_pre_g.dtype)
        delta += tl.sum(p * tl.dot(w_post_t, da_blk, input_precision=PREC), axis=1)
        row_sum += tl.sum(p, axis=1)
    inv_sum = tl.where(row_sum > 0, 1.0 / row_sum, 0.0)
    delta = delta * inv_sum
    dw_pre_acc = tl.zeros([CHP, CHP], dtype=w_pre_g.dtype)
    dw_post_acc = tl.zeros([CHP, CHP], dtype=w_pre_g.dtype)
    for c0 in range(0, end, BLOCK):
        s_blk, p = _talking_heads_probs(s_row, w_pre_g, row_lse, c0 + cols, end, loaded, head_ok, ssj, PREC)
        p = p * inv_sum[:, None]
        da_blk = _row_block(da_row, c0 + cols, end, loaded, head_ok, sdj, w_pre_g.dtype)
        dz = p * (tl.dot(w_post_t, da_blk, input_precision=PREC) - delta[:, None])
        if WANT_DW_PRE:
            dw_pre_acc += tl.dot(dz, tl.trans(s_blk), input_precision=PREC)
        if WANT_DW_POST:
            dw_post_acc += tl.dot(da_blk, tl.trans(p), input_precision=PREC)
        if WRITE_A:
            a = tl.dot(w_post_g, p, input_precision=PREC)
            tl.store(a_row + (c0 + cols)[None, :] * saj, a.to(a_out.dtype.element_ty),
                     mask=head_ok[:, None] & (c0 + cols[None, :] < K))
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

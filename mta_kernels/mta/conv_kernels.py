"""The key-query convolution on materialized slabs of scores, and its two gradients, on
tensor cores.

Used by the row-chunked paths (mta/forward.py, mta/backward.py), which hold (B, H, R, L) slabs of
the forward's intermediates. With pL the kernel's left padding, for x (R, L) of one
(batch, head):

    conv:         out[i, j] = sum_{a,t} w[a, t] x[i + a - (CQ-1), j + t - pL]
    input grad:   out[i, j] = sum_{a,t} w[a, t] g[i - a + (CQ-1), j - t + pL]     (TRANSPOSE)
    weight grad:  dw[a, t]  = sum_{i,j} g[i, j] x[i + a - (CQ-1), j + t - pL]

Reads outside [0, R) x [0, L) are zero, as in mta_reference.key_query_conv.

For each query offset a, the key direction is a product with a Toeplitz matrix of w[a]: a
program owns a [BR, BC] output tile and reads the row-shifted input at its own BC columns
and at HALO columns on either side (HALO >= how far a tap reaches), one tl.dot per offset
instead of CQ * CK multiply-adds per score. The weight gradient is the transposed
product M = G^T X_a (M[j, u] pairs gradient column j with input column u), summed over
the tiles of a row and then along its diagonals u - j = t - pL (one gather and one sum).

kq_conv_kernel runs a program per output tile; kq_conv_strip_kernel (16-bit slabs) a program
per strip of column tiles, building its Toeplitz matrices once and loading the tiles clear of
the causal diagonal straight into the dots (by TMA where it can).

Causal slabs are zero above a diagonal: x[i, j] is read as zero whenever j - i > ZERO_ABOVE
(a slab of rows lo.. has ZERO_ABOVE = lo), and a tile whose every tap reads only there is
skipped: REACH is how far above the diagonal a tap can read.
"""
import triton
import triton.language as tl


@triton.jit
def _tile(i_bh, H, sb, sh, si, sj):
    """Offset of (batch, head) i_bh in a (B, H, R, L) tensor with strides (sb, sh, si, sj)."""
    return (i_bh // H) * sb + (i_bh % H) * sh


@triton.jit
def _shifted(base, rows, cols, si, sj, R, LC, ZERO_ABOVE, COL_LO=0):
    """Block of a (R, LC) plane at the given (possibly out-of-range) rows and cols, zero
    outside the plane, left of column COL_LO and where col - row > ZERO_ABOVE."""
    # The causal zeros are selected after the load, not masked in it: a mask that changes
    # along a row keeps Triton from vectorizing the load (4-byte loads instead of 16-byte).
    ok = (rows[:, None] >= 0) & (rows[:, None] < R) & (cols[None, :] >= COL_LO) & (cols[None, :] < LC)
    x = tl.load(base + rows[:, None].to(tl.int64) * si + cols[None, :] * sj, mask=ok, other=0.0)
    return tl.where(cols[None, :] - rows[:, None] > ZERO_ABOVE, 0.0, x)


@triton.jit
def _toeplitz(w_a, first, SIGN: tl.constexpr, CK: tl.constexpr, KU: tl.constexpr, BC: tl.constexpr):
    """[KU, BC] matrix T[u, m] = w_a[first + SIGN * (u - m)], zero where that tap index
    leaves [0, CK): input column u of a chunk times T gives output column m."""
    u = tl.arange(0, KU)
    m = tl.arange(0, BC)
    t = first + SIGN * (u[:, None] - m[None, :])
    return tl.load(w_a + t, mask=(t >= 0) & (t < CK), other=0.0)


@triton.jit
def _above_diagonal(ZERO_ABOVE, REACH, BR: tl.constexpr, BC: tl.constexpr):
    """Whether this program's tile (program_id 1 and 2) reads only where the input is zero."""
    first_col = tl.program_id(2) * BC
    last_row = tl.program_id(1) * BR + BR - 1
    return first_col - last_row > ZERO_ABOVE + REACH


@triton.jit
def _source_rows(rows, a, CQ: tl.constexpr, TRANSPOSE: tl.constexpr):
    """The input rows that query offset a reads for output rows `rows` (conv or its adjoint)."""
    if TRANSPOSE:
        return rows + (CQ - 1 - a)
    return rows + (a - (CQ - 1))


@triton.jit
def kq_conv_kernel(x, w, out, sxb, sxh, sxi, sxj, H, R, LC, ZERO_ABOVE, REACH, BAND_LIMIT, X_COL0,
                   CQ: tl.constexpr, CK: tl.constexpr, PL: tl.constexpr, TRANSPOSE: tl.constexpr,
                   MASK_OUT: tl.constexpr, BAND_ONLY: tl.constexpr, HALO: tl.constexpr, KW: tl.constexpr,
                   BR: tl.constexpr, BC: tl.constexpr, PREC: tl.constexpr, UNROLL: tl.constexpr,
                   ACC: tl.constexpr):
    """out (B, H, R, LC) contiguous: the conv of x (B, H, R, LC) (any strides) with
    w (H, CQ, CK) of x's dtype, or with TRANSPOSE its adjoint (the input gradient), summed in
    ACC (fp32, or fp64) and stored in out's dtype; with MASK_OUT, out is
    zero where col - row > ZERO_ABOVE. With BAND_ONLY only the tiles holding an entry with
    col - row > BAND_LIMIT are written (the others are left as they are), and x may hold
    only the columns [X_COL0, LC) (its column 0 is column X_COL0; those left of it read as
    zero; 0 otherwise). HALO >= max(PL, CK - 1 - PL), a power of two >= 16; KW >= BC + 2 * HALO,
    a power of two. UNROLL: the unroll factor of the loop over query offsets (1: none)."""
    if BAND_ONLY:
        if tl.program_id(2) * BC + BC - 1 - tl.program_id(1) * BR <= BAND_LIMIT:
            return
    i_bh = tl.program_id(0).to(tl.int64)
    c0 = tl.program_id(2) * BC
    rows = tl.program_id(1) * BR + tl.arange(0, BR)
    cols = c0 + tl.arange(0, BC)
    base = x + _tile(i_bh, H, sxb, sxh, sxi, sxj) - X_COL0 * sxj
    w_head = w + (i_bh % H) * (CQ * CK)
    SIGN: tl.constexpr = -1 if TRANSPOSE else 1
    acc = tl.zeros([BR, BC], dtype=ACC)
    if not _above_diagonal(ZERO_ABOVE, REACH, BR, BC):
        window = c0 - HALO + tl.arange(0, KW)
        for a in tl.range(CQ, loop_unroll_factor=UNROLL):
            # the input at the offset's rows and the KW columns from c0 - HALO on (the tile's and
            # HALO on either side, padded to a power of two); the tap of input column
            # c0 - HALO + u for output column c0 + m is PL + SIGN * (u - HALO - m)
            x_a = _shifted(base, _source_rows(rows, a, CQ, TRANSPOSE), window, sxi, sxj, R, LC, ZERO_ABOVE, X_COL0)
            acc += tl.dot(x_a, _toeplitz(w_head + a * CK, PL - SIGN * HALO, SIGN, CK, KW, BC), input_precision=PREC)
    if MASK_OUT:
        acc = tl.where(cols[None, :] - rows[:, None] > ZERO_ABOVE, 0.0, acc)
    ok = (rows[:, None] < R) & (cols[None, :] < LC)
    tl.store(out + (i_bh * R + rows[:, None]) * LC + cols[None, :], acc.to(out.dtype.element_ty), mask=ok)


@triton.jit
def _grouped_toeplitz(w_head, g, CQ: tl.constexpr, CK: tl.constexpr, FIRST: tl.constexpr, SIGN: tl.constexpr,
                      GROUP: tl.constexpr, KW: tl.constexpr, BC: tl.constexpr):
    """[GROUP * KW, BC]: the Toeplitz matrices (_toeplitz) of query offsets g * GROUP .. g * GROUP +
    GROUP - 1 stacked, zero for offsets from CQ on: row a_local * KW + u pairs with the input of
    offset g * GROUP + a_local at window column u."""
    k = tl.arange(0, GROUP * KW)
    m = tl.arange(0, BC)
    a = g * GROUP + k // KW
    t = FIRST + SIGN * ((k % KW)[:, None] - m[None, :])
    ok = (a < CQ)[:, None] & (t >= 0) & (t < CK)
    return tl.load(w_head + a[:, None] * CK + t, mask=ok, other=0.0)


@triton.jit
def _grouped_input(base, rows, window_start, g, si, sj, R, LC, ZERO_ABOVE, X_COL0, CQ: tl.constexpr,
                   TRANSPOSE: tl.constexpr, GROUP: tl.constexpr, KW: tl.constexpr, CAUSAL: tl.constexpr):
    """[BR, GROUP * KW]: the input of query offsets g * GROUP .. (each at its rows, _source_rows,
    and the KW window columns from window_start on) side by side, zero outside the plane, left of
    X_COL0, for offsets from CQ on and, with CAUSAL, where col - row > ZERO_ABOVE."""
    k = tl.arange(0, GROUP * KW)
    a = g * GROUP + k // KW
    if TRANSPOSE:
        src = rows[:, None] + (CQ - 1 - a)[None, :]
    else:
        src = rows[:, None] + (a - (CQ - 1))[None, :]
    cols = window_start + k % KW
    ok = (src >= 0) & (src < R) & (a < CQ)[None, :] & (cols >= X_COL0)[None, :] & (cols < LC)[None, :]
    x_g = tl.load(base + src.to(tl.int64) * si + cols[None, :] * sj, mask=ok, other=0.0)
    if CAUSAL:
        x_g = tl.where(cols[None, :] - src > ZERO_ABOVE, 0.0, x_g)
    return x_g


@triton.jit
def kq_conv_strip_kernel(x, x_desc, w, out, sxb, sxh, sxi, sxj, H, R, LC, ZERO_ABOVE, REACH, BAND_LIMIT, X_COL0,
                         n_col_groups,
                         CQ: tl.constexpr, CK: tl.constexpr, PL: tl.constexpr, TRANSPOSE: tl.constexpr,
                         MASK_OUT: tl.constexpr, BAND_ONLY: tl.constexpr, HALO: tl.constexpr, KW: tl.constexpr,
                         BR: tl.constexpr, BC: tl.constexpr, TILES: tl.constexpr, GROUP: tl.constexpr,
                         PREC: tl.constexpr, ACC: tl.constexpr, CLEAN_STAGES: tl.constexpr):
    """kq_conv_kernel's result (its arguments, x_desc and n_col_groups besides), a program per
    strip of [BR rows, TILES * BC columns] instead of per tile, grid (B * H, row tiles,
    n_col_groups): the Toeplitz matrices of its head are built once per program, not once per
    tile (their gathers had been as many L1 wavefronts as the input's loads), GROUP query
    offsets stacked into each (one dot per group). Tiles whose every tap reads only causal
    zeros are stored as zeros; tiles clear of the causal diagonal load their input straight
    into the dots (no causal select, so the dots read it from shared memory), with GROUP 1 as
    TMA boxes through x_desc (a descriptor of x loading [1, 1, BR, KW] boxes, zero outside x)
    unless it is None, in a loop pipelined over CLEAN_STAGES."""
    i_bh = tl.program_id(0).to(tl.int64)
    r0 = tl.program_id(1) * BR
    first = tl.program_id(2) * TILES
    end = tl.minimum(first + TILES, tl.cdiv(LC, BC))
    # tiles [c_lo, c_hi) are computed: the causal ones read left of ZERO_ABOVE + REACH, the band's
    # hold an entry with col - row > BAND_LIMIT; the others up to `end` are zero (or, for the
    # band, left as they are)
    c_hi = tl.minimum(end, (r0 + BR - 1 + ZERO_ABOVE + REACH) // BC + 1)
    c_lo = first
    if BAND_ONLY:
        c_lo = tl.maximum(first, (tl.maximum(BAND_LIMIT + r0 - BC + 2, 0) + BC - 1) // BC)
    rows = r0 + tl.arange(0, BR)
    base = x + _tile(i_bh, H, sxb, sxh, sxi, sxj) - X_COL0 * sxj
    dst = out + (i_bh * R + rows[:, None]) * LC
    SIGN: tl.constexpr = -1 if TRANSPOSE else 1
    N_GROUPS: tl.constexpr = (CQ + GROUP - 1) // GROUP
    if c_lo < c_hi:
        w_head = w + (i_bh % H) * (CQ * CK)
        toeplitz = ()
        for g in tl.static_range(N_GROUPS):
            toeplitz = toeplitz + (_grouped_toeplitz(w_head, g, CQ, CK, PL - SIGN * HALO, SIGN, GROUP, KW, BC),)
        # tiles [c_lo, c_mid) read no entry beyond the causal diagonal (their window's last column
        # minus the first row any offset reads is at most ZERO_ABOVE)
        top = r0 if TRANSPOSE else r0 - (CQ - 1)
        clean = ZERO_ABOVE + top - (KW - 1 - HALO)
        c_mid = tl.minimum(tl.maximum(tl.where(clean >= 0, clean // BC + 1, 0), c_lo), c_hi)
        for i_c in tl.range(c_lo, c_mid, num_stages=CLEAN_STAGES):
            acc = tl.zeros([BR, BC], dtype=ACC)
            if x_desc is not None:
                # (GROUP 1) each offset's [BR, KW] box by TMA, zero outside x (x_desc's columns are
                # x's own, from X_COL0 on)
                b, h = (i_bh // H).to(tl.int32), (i_bh % H).to(tl.int32)
                for a in tl.static_range(CQ):
                    top_a = r0 + (CQ - 1 - a) if TRANSPOSE else r0 + (a - (CQ - 1))
                    x_a = x_desc.load([b, h, top_a, i_c * BC - HALO - X_COL0]).reshape(BR, KW)
                    acc += tl.dot(x_a, toeplitz[a], input_precision=PREC)
            else:
                for g in tl.static_range(N_GROUPS):
                    x_g = _grouped_input(base, rows, i_c * BC - HALO, g, sxi, sxj, R, LC, ZERO_ABOVE, X_COL0, CQ,
                                         TRANSPOSE, GROUP, KW, False)
                    acc += tl.dot(x_g, toeplitz[g], input_precision=PREC)
            cols = i_c * BC + tl.arange(0, BC)
            tl.store(dst + cols[None, :], acc.to(out.dtype.element_ty), mask=(rows[:, None] < R) & (cols[None, :] < LC))
        for i_c in range(c_mid, c_hi):
            acc = tl.zeros([BR, BC], dtype=ACC)
            for g in tl.static_range(N_GROUPS):
                x_g = _grouped_input(base, rows, i_c * BC - HALO, g, sxi, sxj, R, LC, ZERO_ABOVE, X_COL0, CQ,
                                     TRANSPOSE, GROUP, KW, True)
                acc += tl.dot(x_g, toeplitz[g], input_precision=PREC)
            cols = i_c * BC + tl.arange(0, BC)
            if MASK_OUT:
                acc = tl.where(cols[None, :] - rows[:, None] > ZERO_ABOVE, 0.0, acc)
            tl.store(dst + cols[None, :], acc.to(out.dtype.element_ty), mask=(rows[:, None] < R) & (cols[None, :] < LC))
    for i_c in range(tl.maximum(c_lo, c_hi), end):
        cols = i_c * BC + tl.arange(0, BC)
        zeros = tl.zeros([BR, BC], dtype=out.dtype.element_ty)
        tl.store(dst + cols[None, :], zeros, mask=(rows[:, None] < R) & (cols[None, :] < LC))


@triton.jit
def _weight_grad_program(partial, n_col_groups, CQ: tl.constexpr, CK: tl.constexpr, BR: tl.constexpr,
                         TILES: tl.constexpr):
    """The weight-gradient program's (batch * head, query offset a, first row, first column
    tile, its row of partial)."""
    i_bh = tl.program_id(0).to(tl.int64)
    a = tl.program_id(1)
    r0 = (tl.program_id(2) // n_col_groups) * BR
    first_tile = (tl.program_id(2) % n_col_groups) * TILES
    dst = partial + ((i_bh * CQ + a) * tl.num_programs(2) + tl.program_id(2)) * CK
    return i_bh, a, r0, first_tile, dst


@triton.jit
def _weight_grad_tile_geometry(g, x, i_bh, a, r0, sgb, sgh, sgi, sgj, sxb, sxh, sxi, sxj, H, G_LO, G_HI,
                               CQ: tl.constexpr, HALO: tl.constexpr, BR: tl.constexpr):
    """For the program's rows r0.. and offset a: the gradient rows it counts (-1 where outside
    [G_LO, G_HI), read as zero), the input rows offset a reads, the window's column offsets
    from a tile's first column (HALO on either side of 2 * HALO), and g's and x's (batch,
    head) bases."""
    rows = r0 + tl.arange(0, BR)
    g_rows = tl.where((rows >= G_LO) & (rows < G_HI), rows, -1)   # -1 reads as zero
    src = rows + (a - (CQ - 1))
    window = tl.arange(0, 4 * HALO) - HALO
    g_base = g + _tile(i_bh, H, sgb, sgh, sgi, sgj)
    x_base = x + _tile(i_bh, H, sxb, sxh, sxi, sxj)
    return g_rows, src, window, g_base, x_base


@triton.jit
def kq_conv_weight_grad_kernel(g, x, partial, sgb, sgh, sgi, sgj, sxb, sxh, sxi, sxj, H, R, LC,
                               ZERO_ABOVE, G_LO, G_HI, n_col_groups,
                               CQ: tl.constexpr, CK: tl.constexpr, CKP: tl.constexpr, PL: tl.constexpr,
                               HALO: tl.constexpr, BR: tl.constexpr, TILES: tl.constexpr,
                               PREC: tl.constexpr, UNROLL: tl.constexpr):
    """partial (B * H, CQ, n_row_tiles * n_col_groups, CK), zero-filled: program
    (i_bh, a, row tile * n_col_groups + group) writes the share of dw[a, t] =
    sum g[i, j] x[i + a - (CQ-1), j + t - PL] of its rows and TILES column tiles; the host
    sums it in a fixed order. Only rows G_LO <= i < G_HI of g count, and g and x are read as
    zero where j - i > ZERO_ABOVE (tiles where g is zero are skipped). Column tiles are BC = 2 * HALO wide,
    so that a tile's input window, HALO columns on either side, is 4 * HALO (a power of two)
    wide. CKP: CK rounded up to a power of two. UNROLL: the unroll factor of the loop over
    column tiles (1: none)."""
    BC: tl.constexpr = 2 * HALO
    KW: tl.constexpr = 2 * BC
    i_bh, a, r0, first_tile, dst = _weight_grad_program(partial, n_col_groups, CQ, CK, BR, TILES)
    if (r0 + BR <= G_LO) | (r0 >= G_HI):
        return
    g_rows, src, window, g_base, x_base = _weight_grad_tile_geometry(
        g, x, i_bh, a, r0, sgb, sgh, sgi, sgj, sxb, sxh, sxi, sxj, H, G_LO, G_HI, CQ, HALO, BR)
    # M[j, u] = sum_i g[i, c0 + j] x[src_i, c0 - HALO + u], summed over this program's column
    # tiles (the same relative geometry in every tile)
    m = tl.zeros([BC, KW], dtype=partial.dtype.element_ty)
    end_tile = tl.minimum(tl.minimum(tl.cdiv(LC, BC), (r0 + BR - 1 + ZERO_ABOVE) // BC + 1), first_tile + TILES)
    if first_tile >= end_tile:
        return
    for i_c in tl.range(first_tile, end_tile, loop_unroll_factor=UNROLL):
        c0 = i_c * BC
        g_tile = _shifted(g_base, g_rows, c0 + tl.arange(0, BC), sgi, sgj, R, LC, ZERO_ABOVE)
        x_tile = _shifted(x_base, src, c0 + window, sxi, sxj, R, LC, ZERO_ABOVE)
        m += tl.dot(tl.trans(g_tile), x_tile, input_precision=PREC)
    _store_diagonal_sums(m, dst, CK, CKP, PL, HALO, BC, KW)


@triton.jit
def _store_diagonal_sums(m, dst, CK: tl.constexpr, CKP: tl.constexpr, PL: tl.constexpr, HALO: tl.constexpr,
                         BC: tl.constexpr, KW: tl.constexpr):
    """dst[t] = sum_j m[j, j + t - PL + HALO] for t < CK: m [BC, KW] pairs gradient column c0 + j
    with input column c0 - HALO + u, and tap t pairs j with u = j + t - PL + HALO (inside the
    window for t < CK since HALO covers the taps; the padding taps t >= CK are clamped and not
    stored)."""
    t = tl.arange(0, CKP)
    u = tl.minimum(tl.arange(0, BC)[:, None] + t[None, :] + (HALO - PL), KW - 1)
    tl.store(dst + t, tl.sum(tl.gather(m, u, axis=1), axis=0), mask=t < CK)


@triton.jit
def kq_conv_weight_grad_strip_kernel(g, g_desc, x, x_desc, partial, sgb, sgh, sgi, sgj, sxb, sxh, sxi, sxj, H, R, LC,
                                     ZERO_ABOVE, G_LO, G_HI, n_col_groups,
                                     CQ: tl.constexpr, CK: tl.constexpr, CKP: tl.constexpr, PL: tl.constexpr,
                                     HALO: tl.constexpr, BR: tl.constexpr, TILES: tl.constexpr, PREC: tl.constexpr):
    """kq_conv_weight_grad_kernel's partial sums (its arguments, the descriptors besides) for
    16-bit slabs, the product taken transposed, M^T = X_a^T G ([KW, BC]: the window's KW
    columns on the tensor cores' M side, 64 for the paper's convs), and the column tiles clear
    of the causal diagonal loaded straight into the product (no causal select), as TMA boxes
    through g_desc (g's rows G_LO..G_HI - 1 only, [1, 1, BR, BC] boxes) and x_desc ([1, 1, BR,
    KW]) unless they are None."""
    BC: tl.constexpr = 2 * HALO
    KW: tl.constexpr = 2 * BC
    i_bh, a, r0, first_tile, dst = _weight_grad_program(partial, n_col_groups, CQ, CK, BR, TILES)
    if (r0 + BR <= G_LO) | (r0 >= G_HI):
        return
    g_rows, src, window, g_base, x_base = _weight_grad_tile_geometry(
        g, x, i_bh, a, r0, sgb, sgh, sgi, sgj, sxb, sxh, sxi, sxj, H, G_LO, G_HI, CQ, HALO, BR)
    mt = tl.zeros([KW, BC], dtype=partial.dtype.element_ty)
    end_tile = tl.minimum(tl.minimum(tl.cdiv(LC, BC), (r0 + BR - 1 + ZERO_ABOVE) // BC + 1), first_tile + TILES)
    if first_tile >= end_tile:
        return
    # tiles [first_tile, mid) are clear: the window's last column minus the first source row is at
    # most ZERO_ABOVE (and then so is the gradient tile's)
    clear = ZERO_ABOVE + r0 + a - (CQ - 1) - (KW - 1 - HALO)
    mid = tl.minimum(tl.maximum(tl.where(clear >= 0, clear // BC + 1, 0), first_tile), end_tile)
    b, h = (i_bh // H).to(tl.int32), (i_bh % H).to(tl.int32)
    for i_c in range(first_tile, mid):
        c0 = i_c * BC
        if x_desc is not None:
            g_tile = g_desc.load([b, h, r0 - G_LO, c0]).reshape(BR, BC)
            x_tile = x_desc.load([b, h, r0 + a - (CQ - 1), c0 - HALO]).reshape(BR, KW)
        else:
            cols = c0 + tl.arange(0, BC)
            g_ok = (g_rows >= 0)[:, None] & (cols < LC)[None, :]
            g_tile = tl.load(g_base + g_rows[:, None].to(tl.int64) * sgi + cols[None, :] * sgj, mask=g_ok, other=0.0)
            x_cols = c0 + window
            x_ok = ((src >= 0) & (src < R))[:, None] & ((x_cols >= 0) & (x_cols < LC))[None, :]
            x_tile = tl.load(x_base + src[:, None].to(tl.int64) * sxi + x_cols[None, :] * sxj, mask=x_ok, other=0.0)
        mt += tl.dot(tl.trans(x_tile), g_tile, input_precision=PREC)
    for i_c in range(mid, end_tile):
        c0 = i_c * BC
        g_tile = _shifted(g_base, g_rows, c0 + tl.arange(0, BC), sgi, sgj, R, LC, ZERO_ABOVE)
        x_tile = _shifted(x_base, src, c0 + window, sxi, sxj, R, LC, ZERO_ABOVE)
        mt += tl.dot(tl.trans(x_tile), g_tile, input_precision=PREC)
    _store_diagonal_sums(tl.trans(mt), dst, CK, CKP, PL, HALO, BC, KW)

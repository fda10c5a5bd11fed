"""Backward of head mixing without convolutions ("talking heads"), heads in registers.

Same tiling as mix_kernels.py: a program holds [NHP, BM, BN] tiles of all heads of a block.
With S = scale q k^T, M = pre_mix(S), P = softmax(M), A = post_mix(P), O = A v:

    dA = dO v^T          dP = post_mix^T(dA)        Delta = rowsum(P * dP)
    dZ = P * (dP - Delta)                           dS = pre_mix^T(dZ)
    dq = scale dS k      dk = scale dS^T q          dv = A^T dO
    d post_mix[o, c] = sum dA[o] P[c]               d pre_mix[o, c] = sum dZ[o] S[c]

Delta needs the whole row of dP (O is not P v here), so the row kernel walks the keys twice:
once for Delta, once for dq and the weight-gradient partials. The column kernel recomputes
the tiles key block by key block, launched once for dk and once for dv (two [16, BN, D]
fp32 accumulators would not fit in registers), so no atomics are needed and the results are
deterministic; dk and dv come out per query head and the host sums the GQA groups.

A program holds all heads of a block, so short grids (B * H / NH small) leave SMs idle and
wait on the longest causal rows. Then the keys of each row block (rows of each key block)
are split into program_id(2) contiguous ranges: each split writes its own partial Delta,
dq, dk, dv and weight gradients, which the host sums in a fixed order. The row kernel runs
as two launches (DELTA: partial Delta; then dq and weight partials from the summed Delta):
one program doing both sweeps spilled more (832 B against 0 and 484 on sm_90a).
"""
import triton
import triton.language as tl

from .mix_kernels import _head_block, _load_block_weight, _load_heads, _mix, _row_stats, _split_range


@triton.jit
def _mix_t(w, x, NHP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    """out[c] = sum_o w[o, c] x[o]: the adjoint of _mix."""
    return _mix(tl.trans(w), x, NHP, BM, BN, PREC)


@triton.jit
def _outer_heads(x, y, NHP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    """[NHP, NHP] with [o, c] = sum over the tile of x[o] * y[c]."""
    x2 = tl.reshape(x, [NHP, BM * BN])
    y2 = tl.reshape(y, [NHP, BM * BN])
    return tl.dot(x2, tl.trans(y2), input_precision=PREC)


@triton.jit
def _head_products(a_base, a_heads, sah, sal, sad, rows, b_base, b_heads, sbh, sbl, sbd, cols,
                   head_ok, L, D, NHP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                   DC: tl.constexpr, NC: tl.constexpr, PREC: tl.constexpr):
    """[NHP, BM, BN] with [h, i, j] = sum_d a[h, rows_i, d] b[h, cols_j, d], read DC dims
    at a time (NC chunks) so that the dot operands stay small in shared memory."""
    dims = tl.arange(0, DC)
    b_a = _load_heads(a_base, a_heads, sah, rows, dims, sal, sad, head_ok, L, D)
    b_b = _load_heads(b_base, b_heads, sbh, cols, dims, sbl, sbd, head_ok, L, D)
    acc = tl.dot(b_a, tl.permute(b_b, (0, 2, 1)), input_precision=PREC)
    for c in tl.static_range(1, NC):
        dims = c * DC + tl.arange(0, DC)
        b_a = _load_heads(a_base, a_heads, sah, rows, dims, sal, sad, head_ok, L, D)
        b_b = _load_heads(b_base, b_heads, sbh, cols, dims, sbl, sbd, head_ok, L, D)
        acc += tl.dot(b_a, tl.permute(b_b, (0, 2, 1)), input_precision=PREC)
    return acc


@triton.jit
def _tile_grads(ptrs, strides, heads, kv_heads, rows, cols, heads_ok, b_lse, w_pre, w_post, scale, L, D,
                CAUSAL: tl.constexpr, PRE_MIX: tl.constexpr, POST_MIX: tl.constexpr,
                NHP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, DC: tl.constexpr, NC: tl.constexpr,
                MIX_PREC: tl.constexpr, DOT_PREC: tl.constexpr, WANT_DP: tl.constexpr = True):
    """Recompute one [NHP, BM, BN] tile and return (S, P, A, dA, dP): the scaled scores, the
    probabilities, the mixed probabilities, dO v^T and the adjoint of the post mix
    (dA and dP are zeros unless WANT_DP). ptrs = (q, k, v, dout) at this batch, strides =
    their (head, row, dim) strides."""
    q, k, v, dout = ptrs
    sqh, sql, sqd, skh, skl, skd, svh, svl, svd, sdh, sdl, sdd = strides
    b_s = _head_products(q, heads, sqh, sql, sqd, rows, k, kv_heads, skh, skl, skd, cols, heads_ok, L, D,
                         NHP, BM, BN, DC, NC, DOT_PREC) * scale
    b_m = b_s
    if PRE_MIX:
        b_m = _mix(w_pre, b_s, NHP, BM, BN, MIX_PREC)
    keep = heads_ok[:, None, None] & (rows[None, :, None] < L) & (cols[None, None, :] < L)
    if CAUSAL:
        keep = keep & (cols[None, None, :] <= rows[None, :, None])
    b_p = tl.where(keep, tl.exp(b_m - b_lse[:, :, None]), 0.0)
    b_a = b_p
    if POST_MIX:
        b_a = _mix(w_post, b_p, NHP, BM, BN, MIX_PREC)
    b_da = tl.zeros_like(b_s)
    b_dp = b_da
    if WANT_DP:
        b_da = _head_products(dout, heads, sdh, sdl, sdd, rows, v, kv_heads, svh, svl, svd, cols, heads_ok,
                              L, D, NHP, BM, BN, DC, NC, DOT_PREC)
        b_dp = b_da
        if POST_MIX:
            b_dp = _mix_t(w_post, b_da, NHP, BM, BN, MIX_PREC)
    return b_s, b_p, b_a, b_da, b_dp


@triton.jit
def _block_inputs(q, k, v, dout, w_pre_mix, w_post_mix,
                  sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sdb, sdh, sdl, sdd,
                  HKV_REP, n_head_blocks, NH: tl.constexpr, NHP: tl.constexpr):
    """This program's head block (as _head_block), the (q, k, v, dO) pointers at its batch
    and their strides as _tile_grads takes them, and the block's two mixing weights:
    (i_bh, i_b, hh, head_ok, heads, kv_heads, ptrs, strides, w_pre, w_post)."""
    i_bh, i_b, i_hb, hh, head_ok, heads, kv_heads = _head_block(n_head_blocks, HKV_REP, NH, NHP)
    ptrs = (q + i_b * sqb, k + i_b * skb, v + i_b * svb, dout + i_b * sdb)
    strides = (sqh, sql, sqd, skh, skl, skd, svh, svl, svd, sdh, sdl, sdd)
    w_pre = _load_block_weight(w_pre_mix, i_hb, hh, head_ok, NH)
    w_post = _load_block_weight(w_post_mix, i_hb, hh, head_ok, NH)
    return i_bh, i_b, hh, head_ok, heads, kv_heads, ptrs, strides, w_pre, w_post


@triton.jit
def mta_mix_bwd_row_kernel(
    q, k, v, dout, lse, delta, dq, dw_pre, dw_post, w_pre_mix, w_post_mix,
    sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sdb, sdh, sdl, sdd,
    H, HKV_REP, L, D, scale, n_head_blocks,
    DELTA: tl.constexpr, CAUSAL: tl.constexpr, PRE_MIX: tl.constexpr, POST_MIX: tl.constexpr,
    GRAD_W_PRE: tl.constexpr, GRAD_W_POST: tl.constexpr,
    NH: tl.constexpr, NHP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr,
    DC: tl.constexpr, MIX_PREC: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """For BM rows of a head block and the keys of split program_id(2). DELTA: write the
    split's partial delta (n_splits, B, H, L) fp32. Otherwise read the summed delta
    (B, H, L) and write the split's partial dq (n_splits, B, H, L, D) fp32 and, where
    GRAD_W_PRE / GRAD_W_POST ask for them, this program's partial weight gradients
    dw_pre / dw_post (n_programs, NH, NH) fp32."""
    i_m = tl.num_programs(0) - 1 - tl.program_id(0)   # longest causal rows first
    i_bh, i_b, hh, head_ok, heads, kv_heads, ptrs, strides, w_pre, w_post = _block_inputs(
        q, k, v, dout, w_pre_mix, w_post_mix, sqb, sqh, sql, sqd, skb, skh, skl, skd,
        svb, svh, svl, svd, sdb, sdh, sdl, sdd, HKV_REP, n_head_blocks, NH, NHP)
    prog = (tl.program_id(2) * tl.num_programs(1) + i_bh) * tl.num_programs(0) + i_m
    split = tl.program_id(2).to(tl.int64) * tl.num_programs(1) * NH * L   # B * H * L per split
    rows = i_m * BM + tl.arange(0, BM)
    dims = tl.arange(0, DP)
    NC: tl.constexpr = DP // DC
    stat_ptrs, stat_ok = _row_stats(H, L, i_b, heads, rows, head_ok)                        # [NHP, BM]
    b_lse = tl.load(lse + stat_ptrs, mask=stat_ok, other=0.0)

    hi = L
    if CAUSAL:
        hi = tl.minimum(L, (i_m + 1) * BM)
    k_lo, k_hi = _split_range(0, hi, BN)
    acc_t = dq.dtype.element_ty   # fp32, or fp64 for fp64 inputs
    if DELTA:
        b_delta = tl.zeros([NHP, BM], dtype=acc_t)
        for t in range(0, (k_hi - k_lo + BN - 1) // BN):
            cols = k_lo + t * BN + tl.arange(0, BN)
            _, b_p, _, _, b_dp = _tile_grads(ptrs, strides, heads, kv_heads, rows, cols, head_ok, b_lse,
                                             w_pre, w_post, scale, L, D, CAUSAL, PRE_MIX, POST_MIX,
                                             NHP, BM, BN, DC, NC, MIX_PREC, DOT_PREC)
            b_delta += tl.sum(b_p * b_dp, axis=2)
        tl.store(delta + split + stat_ptrs, b_delta, mask=stat_ok)
        return
    b_delta = tl.load(delta + stat_ptrs, mask=stat_ok, other=0.0)

    b_dq = tl.zeros([NHP, BM, DP], dtype=acc_t)
    b_dw_pre = tl.zeros([NHP, NHP], dtype=acc_t)
    b_dw_post = tl.zeros([NHP, NHP], dtype=acc_t)
    for t in range(0, (k_hi - k_lo + BN - 1) // BN):
        cols = k_lo + t * BN + tl.arange(0, BN)
        b_s, b_p, _, b_da, b_dp = _tile_grads(ptrs, strides, heads, kv_heads, rows, cols, head_ok, b_lse,
                                              w_pre, w_post, scale, L, D, CAUSAL, PRE_MIX, POST_MIX,
                                              NHP, BM, BN, DC, NC, MIX_PREC, DOT_PREC)
        b_dz = b_p * (b_dp - b_delta[:, :, None])
        if GRAD_W_POST:
            b_dw_post += _outer_heads(b_da, b_p, NHP, BM, BN, MIX_PREC)
        b_ds = b_dz
        if PRE_MIX:
            if GRAD_W_PRE:
                b_dw_pre += _outer_heads(b_dz, b_s, NHP, BM, BN, MIX_PREC)
            b_ds = _mix_t(w_pre, b_dz, NHP, BM, BN, MIX_PREC)
        b_k = _load_heads(k + i_b * skb, kv_heads, skh, cols, dims, skl, skd, head_ok, L, D)
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=DOT_PREC)

    o_ptrs = (dq + split * D + (i_b * H + heads[:, None, None]) * L * D + rows[None, :, None].to(tl.int64) * D
              + dims[None, None, :])
    o_mask = head_ok[:, None, None] & (rows[None, :, None] < L) & (dims[None, None, :] < D)
    tl.store(o_ptrs, b_dq * scale, mask=o_mask)
    w_offs = prog * (NH * NH) + hh[:, None] * NH + hh[None, :]
    w_mask = head_ok[:, None] & head_ok[None, :]
    if GRAD_W_PRE:
        tl.store(dw_pre + w_offs, b_dw_pre, mask=w_mask)
    if GRAD_W_POST:
        tl.store(dw_post + w_offs, b_dw_post, mask=w_mask)


@triton.jit
def mta_mix_bwd_col_kernel(
    q, k, v, dout, lse, delta, dkv, w_pre_mix, w_post_mix,
    sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sdb, sdh, sdl, sdd,
    H, HKV_REP, L, D, scale, n_head_blocks,
    GRAD_K: tl.constexpr, CAUSAL: tl.constexpr, PRE_MIX: tl.constexpr, POST_MIX: tl.constexpr,
    NH: tl.constexpr, NHP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr,
    DC: tl.constexpr, MIX_PREC: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """For BN keys of a head block and the rows of split program_id(2): dk (GRAD_K) or dv,
    (n_splits, B, H, L, D) fp32 per *query* head (the host sums the splits and the query
    heads that share a kv head). One gradient per launch keeps a single [NHP, BN, DP]
    accumulator in registers."""
    i_n = tl.program_id(0)
    i_bh, i_b, hh, head_ok, heads, kv_heads, ptrs, strides, w_pre, w_post = _block_inputs(
        q, k, v, dout, w_pre_mix, w_post_mix, sqb, sqh, sql, sqd, skb, skh, skl, skd,
        svb, svh, svl, svd, sdb, sdh, sdl, sdd, HKV_REP, n_head_blocks, NH, NHP)
    cols = i_n * BN + tl.arange(0, BN)
    dims = tl.arange(0, DP)
    NC: tl.constexpr = DP // DC
    b_acc = tl.zeros([NHP, BN, DP], dtype=dkv.dtype.element_ty)
    lo = 0
    if CAUSAL:
        lo = (i_n * BN // BM) * BM
    r_lo, r_hi = _split_range(lo, L, BM)
    for t in range(0, (r_hi - r_lo + BM - 1) // BM):
        rows = r_lo + t * BM + tl.arange(0, BM)
        stat_ptrs, stat_ok = _row_stats(H, L, i_b, heads, rows, head_ok)
        b_lse = tl.load(lse + stat_ptrs, mask=stat_ok, other=0.0)
        _, b_p, b_a, _, b_dp = _tile_grads(ptrs, strides, heads, kv_heads, rows, cols, head_ok, b_lse,
                                           w_pre, w_post, scale, L, D, CAUSAL, PRE_MIX, POST_MIX,
                                           NHP, BM, BN, DC, NC, MIX_PREC, DOT_PREC, GRAD_K)
        if GRAD_K:
            b_delta = tl.load(delta + stat_ptrs, mask=stat_ok, other=0.0)
            b_ds = b_p * (b_dp - b_delta[:, :, None])
            if PRE_MIX:
                b_ds = _mix_t(w_pre, b_ds, NHP, BM, BN, MIX_PREC)
            b_q = _load_heads(q + i_b * sqb, heads, sqh, rows, dims, sql, sqd, head_ok, L, D)
            b_acc += tl.dot(tl.permute(b_ds, (0, 2, 1)).to(b_q.dtype), b_q, input_precision=DOT_PREC)
        else:
            b_do = _load_heads(dout + i_b * sdb, heads, sdh, rows, dims, sdl, sdd, head_ok, L, D)
            b_acc += tl.dot(tl.permute(b_a, (0, 2, 1)).to(b_do.dtype), b_do, input_precision=DOT_PREC)

    offs = ((i_b * H + heads[:, None, None]) * L * D + cols[None, :, None].to(tl.int64) * D
            + dims[None, None, :])
    mask = head_ok[:, None, None] & (cols[None, :, None] < L) & (dims[None, None, :] < D)
    if GRAD_K:
        b_acc = b_acc * scale
    split = tl.program_id(2).to(tl.int64) * tl.num_programs(1) * NH * L * D   # B * H * L * D per split
    tl.store(dkv + split + offs, b_acc, mask=mask)

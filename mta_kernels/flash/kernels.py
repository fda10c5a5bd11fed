"""Triton kernels of plain attention (no MTA part): a flash-attention forward and backward.

A forward program owns BM query rows of one head and streams the keys in BN tiles with an
online softmax (running max and sum per row): O(L) statistics, no score matrix in memory.
The backward recomputes P from the forward's log-sum-exp, held in fp64 for fp32 inputs (an
fp32 lse = max + log(sum) rounds at an ulp of the row's largest logit, which at logits of a
few tens scales every P of the row by the same error): one kernel for dk and dv (a
program per key block of a kv head, summing its query heads in order, so GQA stays
deterministic) and one for dq.
"""
import triton
import triton.language as tl


@triton.jit
def load_rows(base, rows, dims, stride_l, stride_d, L, D):
    """[R, DP] block of a (L, D) matrix at the given rows; zero outside [0, L) x [0, D)."""
    ptrs = base + rows[:, None].to(tl.int64) * stride_l + dims[None, :].to(tl.int64) * stride_d
    mask = (rows[:, None] >= 0) & (rows[:, None] < L) & (dims[None, :] < D)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _flash_tile(b_q, k_base, v_base, skl, skd, svl, svd, pos, dims, j0, b_m, b_l, b_acc,
                scale, LK, D, CAUSAL_MASK: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    """Online-softmax update of (max, sum, acc) with the key tile at j0, for query rows at
    positions ``pos``. Natural exp, as the backward recomputes P: exp2 with log2(e) in the scale
    would send the lse through ln(2) and back, an ulp of the logit off the forward's P."""
    cols = j0 + tl.arange(0, BN)
    b_k = load_rows(k_base, cols, dims, skl, skd, LK, D)                   # [BN, DP]
    b_v = load_rows(v_base, cols, dims, svl, svd, LK, D)                   # [BN, DP]
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * scale         # [BM, BN]
    keep = cols[None, :] < LK
    if CAUSAL_MASK:
        keep = keep & (cols[None, :] <= pos[:, None])
    b_s = tl.where(keep, b_s, float("-inf"))
    m_new = tl.maximum(b_m, tl.max(b_s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # rows with nothing seen yet
    b_p = tl.exp(b_s - m_safe[:, None])
    alpha = tl.exp(b_m - m_safe)
    b_l = b_l * alpha + tl.sum(b_p, axis=1)
    b_acc = b_acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PREC)
    return m_new, b_l, b_acc


@triton.jit
def _query_block(q, k, v, sqb, sqh, sql, sqd, skb, skh, svb, svh, H, HKV_REP, L, D,
                 BM: tl.constexpr, DP: tl.constexpr):
    """This program's BM query rows of one head (program_id 0: batch * H + head, 1: row blocks
    from the last, so that a causal grid starts its longest rows first, over every head):
    (i_bh, i_b, i_h, i_m, rows, dims, b_q [BM, DP], k_base, v_base) with k, v at the head's
    kv head."""
    i_m = tl.num_programs(1) - 1 - tl.program_id(1)
    i_bh = tl.program_id(0).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    i_kv = i_h // HKV_REP
    rows = i_m * BM + tl.arange(0, BM)
    dims = tl.arange(0, DP)
    b_q = load_rows(q + i_b * sqb + i_h * sqh, rows, dims, sql, sqd, L, D)
    return i_bh, i_b, i_h, i_m, rows, dims, b_q, k + i_b * skb + i_kv * skh, v + i_b * svb + i_kv * svh


@triton.jit
def flash_fwd_kernel(
    q, k, v, out, lse,
    sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sob, soh, sol, sod,
    H, HKV_REP, LQ, LK, Q_OFFSET, D, scale,
    CAUSAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr,
    PREC: tl.constexpr,
):
    """q: (B, H, LQ, D), row r at position Q_OFFSET + r; k, v: (B, H // HKV_REP, LK, D);
    out: (B, H, LQ, D) in out's dtype; lse: (B, H, LQ) contiguous, fp32 for 16-bit inputs and
    fp64 otherwise (flash.lse_dtype), the natural-log log-sum-exp of each row's scaled logits.
    Grid (B * H, row blocks)."""
    i_bh, i_b, i_h, i_m, rows, dims, b_q, k_base, v_base = _query_block(
        q, k, v, sqb, sqh, sql, sqd, skb, skh, svb, svh, H, HKV_REP, LQ, D, BM, DP)
    pos = Q_OFFSET + rows
    acc_t = tl.float64 if q.dtype.element_ty == tl.float64 else tl.float32
    b_m = tl.full([BM], float("-inf"), dtype=acc_t)
    b_l = tl.zeros([BM], dtype=acc_t)
    b_acc = tl.zeros([BM, DP], dtype=acc_t)
    if CAUSAL:
        # key tiles wholly at or before the block's first position need no mask
        first = Q_OFFSET + i_m * BM
        clear = tl.minimum(LK, (first + 1) // BN * BN)
        for j0 in range(0, clear, BN):
            b_m, b_l, b_acc = _flash_tile(b_q, k_base, v_base, skl, skd, svl, svd, pos, dims, j0,
                                          b_m, b_l, b_acc, scale, LK, D, False, BN, PREC)
        for j0 in range(clear, tl.minimum(LK, first + BM), BN):
            b_m, b_l, b_acc = _flash_tile(b_q, k_base, v_base, skl, skd, svl, svd, pos, dims, j0,
                                          b_m, b_l, b_acc, scale, LK, D, True, BN, PREC)
    else:
        for j0 in range(0, LK, BN):
            b_m, b_l, b_acc = _flash_tile(b_q, k_base, v_base, skl, skd, svl, svd, pos, dims, j0,
                                          b_m, b_l, b_acc, scale, LK, D, False, BN, PREC)
    b_acc = b_acc / b_l[:, None]
    o_ptrs = out + i_b * sob + i_h * soh + rows[:, None].to(tl.int64) * sol + dims[None, :] * sod
    tl.store(o_ptrs, b_acc.to(out.dtype.element_ty), mask=(rows[:, None] < LQ) & (dims[None, :] < D))
    lse_t = lse.dtype.element_ty
    row_lse = b_m.to(lse_t) + tl.log(b_l.to(lse_t))
    tl.store(lse + i_bh * LQ + rows, row_lse, mask=rows < LQ)


@triton.jit
def flash_bwd_preprocess_kernel(out, dout, delta, sob, soh, sol, sod, sdb, sdh, sdl, sdd, H, L, D,
                                BM: tl.constexpr, DP: tl.constexpr):
    """delta (B, H, L) fp32 = rowsum(dO * O). Valid only without MTA parts, where O = P V."""
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    rows = i_m * BM + tl.arange(0, BM)
    dims = tl.arange(0, DP)
    b_o = load_rows(out + i_b * sob + i_h * soh, rows, dims, sol, sod, L, D).to(delta.dtype.element_ty)
    b_do = load_rows(dout + i_b * sdb + i_h * sdh, rows, dims, sdl, sdd, L, D).to(delta.dtype.element_ty)
    tl.store(delta + i_bh * L + rows, tl.sum(b_o * b_do, axis=1), mask=rows < L)


@triton.jit
def _probs(b_s, b_lse):
    """exp(S - lse) in S's dtype, the difference taken in the lse's (fp64 for fp32 inputs)."""
    return tl.exp((b_s.to(b_lse.dtype) - b_lse).to(b_s.dtype))


@triton.jit
def _flash_bwd_tile(b_q, b_k, b_v, b_do, b_lse, b_delta, rows, cols, scale, L,
                    CAUSAL: tl.constexpr, PREC: tl.constexpr):
    """Recompute P [BM, BN] from the saved lse and return (P, dS = P * (dO v^T - delta))."""
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * scale
    keep = (rows[:, None] < L) & (cols[None, :] < L)
    if CAUSAL:
        keep = keep & (cols[None, :] <= rows[:, None])
    b_p = tl.where(keep, _probs(b_s, b_lse[:, None]), 0.0)
    b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PREC)
    return b_p, b_p * (b_dp - b_delta[:, None])


@triton.jit
def flash_bwd_dkdv_kernel(
    q, k, v, dout, lse, delta, dk, dv,
    sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sdb, sdh, sdl, sdd,
    H, HKV, L, D, scale,
    CAUSAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr, PREC: tl.constexpr,
):
    """dk, dv (B, HKV, L, D) in their own dtype (accumulated in delta's, fp32 or fp64) for BN
    keys of one kv head, summed over the query heads that share it (a fixed order, so the
    result is deterministic)."""
    i_n = tl.program_id(1)     # causal: the first key blocks have the most rows; they start first
    i_bkv = tl.program_id(0).to(tl.int64)
    i_b = i_bkv // HKV
    i_kv = i_bkv % HKV
    rep = H // HKV
    cols = i_n * BN + tl.arange(0, BN)
    dims = tl.arange(0, DP)
    b_k = load_rows(k + i_b * skb + i_kv * skh, cols, dims, skl, skd, L, D)      # [BN, DP]
    b_v = load_rows(v + i_b * svb + i_kv * svh, cols, dims, svl, svd, L, D)      # [BN, DP]
    acc_t = delta.dtype.element_ty   # fp32, or fp64 for fp64 inputs
    b_dk = tl.zeros([BN, DP], dtype=acc_t)
    b_dv = tl.zeros([BN, DP], dtype=acc_t)
    lo = 0
    if CAUSAL:
        lo = (i_n * BN // BM) * BM
    for i_h in range(i_kv * rep, i_kv * rep + rep):
        q_base = q + i_b * sqb + i_h * sqh
        do_base = dout + i_b * sdb + i_h * sdh
        stat = (i_b * H + i_h) * L
        for i0 in range(lo, L, BM):
            rows = i0 + tl.arange(0, BM)
            b_q = load_rows(q_base, rows, dims, sql, sqd, L, D)                  # [BM, DP]
            b_do = load_rows(do_base, rows, dims, sdl, sdd, L, D)                # [BM, DP]
            b_lse = tl.load(lse + stat + rows, mask=rows < L, other=0.0)
            b_delta = tl.load(delta + stat + rows, mask=rows < L, other=0.0)
            # transposed tile [BN, BM]: the key rows stay the dots' M dimension
            b_st = tl.dot(b_k, tl.trans(b_q), input_precision=PREC) * scale
            keep = (cols[:, None] < L) & (rows[None, :] < L)
            if CAUSAL:
                keep = keep & (cols[:, None] <= rows[None, :])
            b_pt = tl.where(keep, _probs(b_st, b_lse[None, :]), 0.0)
            b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PREC)
            b_dst = b_pt * (b_dpt - b_delta[None, :])
            b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=PREC)
            b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=PREC)
    mask = (cols[:, None] < L) & (dims[None, :] < D)
    offs = (i_bkv * L + cols[:, None].to(tl.int64)) * D + dims[None, :]
    tl.store(dk + offs, (b_dk * scale).to(dk.dtype.element_ty), mask=mask)
    tl.store(dv + offs, b_dv.to(dv.dtype.element_ty), mask=mask)


@triton.jit
def flash_bwd_dq_kernel(
    q, k, v, dout, lse, delta, dq,
    sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sdb, sdh, sdl, sdd,
    H, HKV_REP, L, D, scale,
    CAUSAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr, PREC: tl.constexpr,
):
    """dq (B, H, L, D) in its own dtype (accumulated in delta's) for BM rows of one query head."""
    i_bh, i_b, i_h, i_m, rows, dims, b_q, k_base, v_base = _query_block(
        q, k, v, sqb, sqh, sql, sqd, skb, skh, svb, svh, H, HKV_REP, L, D, BM, DP)
    b_do = load_rows(dout + i_b * sdb + i_h * sdh, rows, dims, sdl, sdd, L, D)
    b_lse = tl.load(lse + i_bh * L + rows, mask=rows < L, other=0.0)
    b_delta = tl.load(delta + i_bh * L + rows, mask=rows < L, other=0.0)
    b_dq = tl.zeros([BM, DP], dtype=delta.dtype.element_ty)
    hi = L
    if CAUSAL:
        hi = tl.minimum(L, (i_m + 1) * BM)
    for j0 in range(0, hi, BN):
        cols = j0 + tl.arange(0, BN)
        b_k = load_rows(k_base, cols, dims, skl, skd, L, D)
        b_v = load_rows(v_base, cols, dims, svl, svd, L, D)
        _, b_ds = _flash_bwd_tile(b_q, b_k, b_v, b_do, b_lse, b_delta, rows, cols, scale, L, CAUSAL, PREC)
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PREC)
    offs = (i_bh * L + rows[:, None].to(tl.int64)) * D + dims[None, :]
    tl.store(dq + offs, (b_dq * scale).to(dq.dtype.element_ty), mask=(rows[:, None] < L) & (dims[None, :] < D))

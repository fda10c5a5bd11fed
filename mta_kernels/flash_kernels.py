"""Plain causal / non-causal flash attention: the path for calls with no MTA part.

One program owns BM query rows of one head and streams the keys in BN tiles with an online
softmax (running max m and sum l per row), so only O(L) statistics are kept.
"""
import triton
import triton.language as tl

from .forward_kernels import _load_rows

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _flash_tile(b_q, k_base, v_base, skl, skd, svl, svd, rows, dims, j0, b_m, b_l, b_acc,
                qk_scale, L, D, CAUSAL_MASK: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    """Online-softmax update of (max, sum, acc) with the key tile at j0 (logits in log2 units)."""
    cols = j0 + tl.arange(0, BN)
    b_k = _load_rows(k_base, cols, dims, skl, skd, L, D)                   # [BN, DP]
    b_v = _load_rows(v_base, cols, dims, svl, svd, L, D)                   # [BN, DP]
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * qk_scale     # [BM, BN]
    keep = cols[None, :] < L
    if CAUSAL_MASK:
        keep = keep & (cols[None, :] <= rows[:, None])
    b_s = tl.where(keep, b_s, float("-inf"))
    m_new = tl.maximum(b_m, tl.max(b_s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # rows with nothing seen yet
    b_p = tl.exp2(b_s - m_safe[:, None])
    alpha = tl.exp2(b_m - m_safe)
    b_l = b_l * alpha + tl.sum(b_p, axis=1)
    b_acc = b_acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PREC)
    return m_new, b_l, b_acc


@triton.jit
def flash_fwd_kernel(
    q, k, v, out, lse,
    sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sob, soh, sol, sod,
    H, HKV_REP, L, D, scale,
    CAUSAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr,
    PREC: tl.constexpr,
):
    """q: (B, H, L, D); k, v: (B, H // HKV_REP, L, D); out: (B, H, L, D) in q's dtype;
    lse: (B, H, L) fp32, natural-log log-sum-exp of each row's scaled logits."""
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    i_kv = i_h // HKV_REP
    rows = i_m * BM + tl.arange(0, BM)
    dims = tl.arange(0, DP)
    b_q = _load_rows(q + i_b * sqb + i_h * sqh, rows, dims, sql, sqd, L, D)   # [BM, DP]
    k_base = k + i_b * skb + i_kv * skh
    v_base = v + i_b * svb + i_kv * svh
    qk_scale = scale * LOG2E

    b_m = tl.full([BM], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BM], dtype=tl.float32)
    b_acc = tl.zeros([BM, DP], dtype=tl.float32)
    if CAUSAL:
        # Key tiles left of the diagonal block need no mask; BM is a multiple of BN.
        diag = i_m * BM
        for j0 in range(0, diag, BN):
            b_m, b_l, b_acc = _flash_tile(b_q, k_base, v_base, skl, skd, svl, svd, rows, dims, j0,
                                          b_m, b_l, b_acc, qk_scale, L, D, False, BN, PREC)
        for j0 in range(diag, tl.minimum(L, diag + BM), BN):
            b_m, b_l, b_acc = _flash_tile(b_q, k_base, v_base, skl, skd, svl, svd, rows, dims, j0,
                                          b_m, b_l, b_acc, qk_scale, L, D, True, BN, PREC)
    else:
        for j0 in range(0, L, BN):
            b_m, b_l, b_acc = _flash_tile(b_q, k_base, v_base, skl, skd, svl, svd, rows, dims, j0,
                                          b_m, b_l, b_acc, qk_scale, L, D, False, BN, PREC)
    b_acc = b_acc / b_l[:, None]
    o_ptrs = out + i_b * sob + i_h * soh + rows[:, None].to(tl.int64) * sol + dims[None, :] * sod
    tl.store(o_ptrs, b_acc.to(out.dtype.element_ty), mask=(rows[:, None] < L) & (dims[None, :] < D))
    tl.store(lse + (i_b * H + i_h) * L + rows, (b_m + tl.log2(b_l)) / LOG2E, mask=rows < L)

"""Triton kernels of the pre-softmax conv of a slab as one matmul of inner width cq * D
(docs/design.md, "The algebra the kernels use").

With w (H, cq, ck) the pre conv's weights and pL its left key padding,

    C[i, j] = scale * sum_a < q[i - (cq-1-a)], K~_a[j] >,    K~_a[j] = sum_t w[a, t] k[j + t - pL]

(q rows above 0 and k rows outside [0, L) zero) is the conv of the scores s0 = scale q k^T
wherever the conv window reads no causal-future score, that is for j - i <= Z - (cq-1) -
(ck-1-pL) in a slab whose scores are zero for j - i > Z; the slab conv kernel makes the tiles
nearer the diagonal (mta/conv.py, band=True). conv_keys_kernel makes K~ (B, H, L, cq, D) in
q's 16-bit dtype, O(L) memory; pre_conv_matmul_kernel is one tensor-core GEMM on q and K~.
"""
import triton
import triton.language as tl


@triton.jit
def conv_keys_kernel(k, w, out, skb, skh, skl, skd, H, HKV, L, D,
                     CQ: tl.constexpr, CQP: tl.constexpr, CK: tl.constexpr, PL: tl.constexpr,
                     BL: tl.constexpr, DP: tl.constexpr, ACC: tl.constexpr):
    """out (B, H, L, CQ, D) contiguous: out[b, h, j, a] = sum_t w[h, a, t] k[b, h * HKV // H, j + t - PL],
    k (B, HKV, L, D) any strides, zero outside [0, L); summed in ACC (fp32, or fp64), stored in
    out's dtype. One program per (batch * head, block of BL rows): each shifted block of k is
    read once and feeds all CQ offsets ([CQP, BL, DP] sums, CQP = CQ rounded up to a power of 2)."""
    i_bh = tl.program_id(0).to(tl.int64)
    h = i_bh % H
    rows = tl.program_id(1) * BL + tl.arange(0, BL)
    d = tl.arange(0, DP)
    a = tl.arange(0, CQP)
    base = k + (i_bh // H) * skb + (h // (H // HKV)) * skh
    acc = tl.zeros([CQP, BL, DP], dtype=ACC)
    for t in tl.static_range(CK):
        src = rows + (t - PL)
        ok = ((src >= 0) & (src < L))[:, None] & (d < D)[None, :]
        x = tl.load(base + src[:, None].to(tl.int64) * skl + d[None, :] * skd, mask=ok, other=0.0).to(ACC)
        w_t = tl.load(w + (h * CQ + a) * CK + t, mask=a < CQ, other=0.0).to(ACC)
        acc += w_t[:, None, None] * x[None, :, :]
    dst = out + ((i_bh * L + rows[None, :, None]) * CQ + a[:, None, None]) * D + d[None, None, :]
    ok = (a < CQ)[:, None, None] & (rows < L)[None, :, None] & (d < D)[None, None, :]
    tl.store(dst, acc.to(out.dtype.element_ty), mask=ok)


@triton.jit
def pre_conv_matmul_kernel(q, kt, out, scale, sqb, sqh, sqi, sqd, H, R, K, L, D, LO, ZERO_ABOVE,
                           CQ: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                           PREC: tl.constexpr, ACC: tl.constexpr):
    """out (B, H, R, K) contiguous: out[b, h, r, j] = scale * sum_{a, d} q[b, h, LO + r - (CQ-1-a), d]
    * kt[b, h, j, a, d], q (B, H, L, D) any strides, zero above row 0, kt (B, H, L, CQ, D)
    contiguous; scale a one-element tensor of dtype ACC, in which the sums run (fp32, or fp64),
    stored in out's dtype. Tiles
    whose every entry has j - r > ZERO_ABOVE are written as zero. One program per
    (batch * head, row tile, column tile)."""
    i_bh = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1) * BM + tl.arange(0, BM)
    j = tl.program_id(2) * BN + tl.arange(0, BN)
    acc = tl.zeros([BM, BN], dtype=ACC)
    if tl.program_id(2) * BN - (tl.program_id(1) * BM + BM - 1) <= ZERO_ABOVE:
        q_base = q + (i_bh // H) * sqb + (i_bh % H) * sqh
        k_base = kt + i_bh * L * CQ * D
        n_d = tl.cdiv(D, BD)
        for s in range(CQ * n_d):
            a = s // n_d
            d = (s % n_d) * BD + tl.arange(0, BD)
            src = LO + r - (CQ - 1 - a)
            q_a = tl.load(q_base + src[:, None].to(tl.int64) * sqi + d[None, :] * sqd,
                          mask=((src >= 0) & (src < L))[:, None] & (d < D)[None, :], other=0.0)
            k_a = tl.load(k_base + (j[:, None].to(tl.int64) * CQ + a) * D + d[None, :],
                          mask=(j < K)[:, None] & (d < D)[None, :], other=0.0)
            acc += tl.dot(q_a, tl.trans(k_a), input_precision=PREC)
        acc = acc * tl.load(scale)
    tl.store(out + (i_bh * R + r[:, None]) * K + j[None, :], acc.to(out.dtype.element_ty), mask=(r < R)[:, None] & (j < K)[None, :])


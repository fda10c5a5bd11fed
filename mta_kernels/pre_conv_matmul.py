"""The pre-softmax conv of a slab as one matmul of inner width cq * D (design doc, "Pre-softmax
conv as one matmul"), for the row-chunked forward.

With w (H, cq, ck) the pre conv's weights and pL its left key padding,

    C[i, j] = scale * sum_a < q[i - (cq-1-a)], K~_a[j] >,    K~_a[j] = sum_t w[a, t] k[j + t - pL]

(q rows above 0 and k rows outside [0, L) zero) is the conv of the scores s0 = scale q k^T
wherever the conv window reads no causal-future score, that is for j - i <= Z - (cq-1) -
(ck-1-pL) in a slab whose scores are zero for j - i > Z. The slab conv kernel recomputes the
tiles nearer the diagonal from s0 (slab_conv.key_query_conv with band=True). Unlike the slab
conv, which reads s0 from memory once per query offset, this is one tensor-core GEMM on
16-bit q and K~ (K~ rounded to q's dtype, as the design doc's precision note allows); K~ is
made once per batch element: (B, H, L, cq, D), O(L) memory.
"""
import torch
import triton
import triton.language as tl

from mta_reference.validate import left_pad

from .forward import _next_pow2, acc_dtype, cdiv, tl_acc_dtype
from .slab_conv import _NO_ZEROS

# GEMM tile [BM, BN], inner block BD (at most), warps and stages. H200, the last 1034-row chunk
# of L=4096, 16 heads, D=128, bf16 inputs and output (scripts/tune.py preconvmatmul,
# notes/tune_preconvmatmul_h200_34481c8.log): 128x256x64 with 8 warps and 3 stages 0.252 ms,
# 128x128x64 0.279 (2 stages 0.297, 4 stages 0.322), 256x128x64 0.288, 64x128x64 / 4 warps 0.312,
# 128x128x128 / 2 stages 0.411; the band tiles 0.045 more; the slab conv kernel 0.468.
MATMUL_CONFIG = dict(BM=128, BN=256, BD=64, num_warps=8, num_stages=3)
# K~'s program: [cq rounded up, rows, D rounded up] sums of at most this many elements, and
# its warps. Same run, at L=4096: 8192 elements with 4 warps 0.114 ms, 4096 / 4 0.122,
# 8192 / 8 0.141, 16384 / 8 0.155.
KEYS_CONFIG = dict(elements=8192, num_warps=4)


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


def conv_keys(k: torch.Tensor, w: torch.Tensor, pad_key: str, heads: int, dtype) -> torch.Tensor:
    """K~ of the module docstring: k (B, Hkv, L, D) (Hkv dividing ``heads``), w (heads, cq, ck).
    Returns (B, heads, L, cq, D) in ``dtype``."""
    B, Hkv, L, D = k.shape
    _, cq, ck = w.shape
    out = torch.empty(B, heads, L, cq, D, device=k.device, dtype=dtype)
    if out.numel() == 0:
        return out
    cqp, dp = _next_pow2(cq), max(16, _next_pow2(D))
    BL = max(2, min(16, KEYS_CONFIG["elements"] // (cqp * dp)))
    conv_keys_kernel[(B * heads, cdiv(L, BL))](
        k, w.contiguous(), out, *k.stride(), heads, Hkv, L, D, CQ=cq, CQP=cqp, CK=ck, PL=left_pad(ck, pad_key),
        BL=BL, DP=dp, ACC=tl.float64 if dtype == torch.float64 else tl.float32, num_warps=KEYS_CONFIG["num_warps"])
    return out


def pre_conv_matmul(q: torch.Tensor, kt: torch.Tensor, lo: int, hi: int, keys: int, scale: float,
                    zero_above=None, precision="ieee", dtype=torch.float32) -> torch.Tensor:
    """C of the module docstring on rows [lo, hi) and keys [0, keys): q (B, H, L, D) unscaled,
    kt = conv_keys(...) (B, H, L, cq, D) in q's dtype. Exact (up to K~'s rounding) where
    j - i <= zero_above - (cq-1) - (ck-1-pL); tiles entirely above the diagonal j - i =
    zero_above are zero (None: no such structure). Returns (B, H, hi - lo, keys) in ``dtype``
    (summed in fp32, or fp64 for fp64)."""
    B, H, L, D = q.shape
    cq = kt.shape[3]
    R = hi - lo
    out = torch.empty(B, H, R, keys, device=q.device, dtype=dtype)
    if out.numel() == 0:
        return out
    cfg = MATMUL_CONFIG
    BM = min(cfg["BM"], max(16, _next_pow2(R)))
    BN = min(cfg["BN"], max(16, _next_pow2(keys)))
    BD = min(cfg["BD"], max(16, _next_pow2(D)))
    pre_conv_matmul_kernel[(B * H, cdiv(R, BM), cdiv(keys, BN))](
        q, kt, out, torch.full((1,), scale, device=q.device, dtype=acc_dtype(q)), *q.stride(), H, R, keys, L, D, lo,
        _NO_ZEROS if zero_above is None else zero_above,
        CQ=cq, BM=BM, BN=BN, BD=BD, PREC="ieee" if q.dtype == torch.float64 else precision,
        ACC=tl_acc_dtype(q),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out

"""Head mixing without convolutions ("talking heads"), all heads of a group in registers.

A program owns BM query rows of a block of NH heads (padded to NHP >= 16, the smallest
tl.dot size) as [NHP, BM, BN] tiles: QK^T is one batched dot over the heads, mixing is one
dot of the [NHP, NHP] block weight with the tiles reshaped to [NHP, BM*BN], and P @ V is
another batched dot. Nothing goes through scratch memory and no barrier is needed.

Pass 1 (IS_STATS) computes the row log-sum-exp of the mixed logits per head; pass 2
normalises with it, applies the post-softmax mixing and multiplies by V.

A program holds all heads of a block, so short grids (B * H / NH small) would leave SMs idle
and wait on the longest causal rows. Then the keys of each row block are split into
program_id(2) contiguous ranges, as in flash decoding: each split writes the log-sum-exp of
its own keys and its own output rows (normalised by its own sum in one pass, unnormalised
partial sums in pass 2), which the host combines in a fixed order.
"""
import triton
import triton.language as tl


@triton.jit
def _load_heads(base, heads, stride_h, rows, dims, stride_l, stride_d, head_ok, L, D):
    """[NHP, R, DP] block of a (heads, L, D) tensor; zero for masked heads and out of range."""
    ptrs = (base + heads[:, None, None].to(tl.int64) * stride_h
            + rows[None, :, None].to(tl.int64) * stride_l + dims[None, None, :].to(tl.int64) * stride_d)
    mask = head_ok[:, None, None] & (rows[None, :, None] < L) & (dims[None, None, :] < D)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _split_range(start, end, STEP: tl.constexpr):
    """This program's share [lo, hi) of [start, end), in whole STEP-sized tiles: split
    program_id(2) of num_programs(2) contiguous ranges (empty for splits past the end)."""
    per = tl.cdiv(tl.cdiv(end - start, STEP), tl.num_programs(2)) * STEP
    lo = start + tl.program_id(2) * per
    return lo, tl.minimum(end, lo + per)


@triton.jit
def _mix(w, x, NHP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    """out[o] = sum_c w[o, c] x[c] for x [NHP, BM, BN] fp32 and w [NHP, NHP] fp32."""
    y = tl.dot(w, tl.reshape(x, [NHP, BM * BN]), input_precision=PREC)
    return tl.reshape(y, [NHP, BM, BN])


@triton.jit
def _load_block_weight(w_ptr, i_hb, hh, head_ok, NH: tl.constexpr):
    """[NHP, NHP] block of a (H // NH, NH, NH) mixing weight, zero-padded."""
    ptrs = w_ptr + i_hb * (NH * NH) + hh[:, None] * NH + hh[None, :]
    return tl.load(ptrs, mask=head_ok[:, None] & head_ok[None, :], other=0.0)


@triton.jit
def _head_block(n_head_blocks, HKV_REP, NH: tl.constexpr, NHP: tl.constexpr):
    """This program's batch and block of heads, from program_id(1):
    (i_bh, i_b, i_hb, hh [NHP], head_ok [NHP], heads [NHP], kv_heads [NHP])."""
    i_bh = tl.program_id(1).to(tl.int64)
    hh = tl.arange(0, NHP)
    i_hb = i_bh % n_head_blocks
    heads = i_hb * NH + hh
    return i_bh, i_bh // n_head_blocks, i_hb, hh, hh < NH, heads, heads // HKV_REP


@triton.jit
def _row_stats(H, L, i_b, heads, rows, head_ok):
    """Offsets [NHP, R] of (heads, rows) in a (B, H, L) statistics tensor, and their mask."""
    return (i_b * H + heads[:, None]) * L + rows[None, :], head_ok[:, None] & (rows[None, :] < L)


@triton.jit
def mta_mix_fwd_kernel(
    q, k, v, out, lse, lse_split, w_pre_mix, w_post_mix,
    sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sos, sob, soh, sol, sod,
    H, HKV_REP, L, D, scale, n_head_blocks,
    IS_STATS: tl.constexpr, ONE_PASS: tl.constexpr, CAUSAL: tl.constexpr,
    PRE_MIX: tl.constexpr, POST_MIX: tl.constexpr,
    NH: tl.constexpr, NHP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr,
    MIX_PREC: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """q: (B, H, L, D); k, v: (B, H // HKV_REP, L, D); out: (n_splits, B, H, L, D) (split
    stride sos; with one split the output itself). lse_split: (n_splits, B, H, L) fp32, each
    split's log-sum-exp of the mixed logits over its keys (written in pass 1 or the one
    pass); lse: (B, H, L), all keys combined (read in pass 2). w_pre_mix / w_post_mix:
    (H // NH, NH, NH) fp32. ONE_PASS (no post_mix): out and lse in a single pass with an
    online softmax per head, as in flash attention: only post-softmax mixing needs the
    normalised P up front."""
    i_m = tl.num_programs(0) - 1 - tl.program_id(0)   # longest causal rows first
    i_bh, i_b, i_hb, hh, head_ok, heads, kv_heads = _head_block(n_head_blocks, HKV_REP, NH, NHP)
    rows = i_m * BM + tl.arange(0, BM)
    dims = tl.arange(0, DP)

    b_q = _load_heads(q + i_b * sqb, heads, sqh, rows, dims, sql, sqd, head_ok, L, D)   # [NHP, BM, DP]
    k_base = k + i_b * skb
    v_base = v + i_b * svb
    if PRE_MIX:
        w_pre = _load_block_weight(w_pre_mix, i_hb, hh, head_ok, NH)
    if POST_MIX:
        w_post = _load_block_weight(w_post_mix, i_hb, hh, head_ok, NH)
    stat, stat_ok = _row_stats(H, L, i_b, heads, rows, head_ok)                           # [NHP, BM]
    stat_ptrs = lse + stat
    split_stat_ptrs = lse_split + tl.program_id(2).to(tl.int64) * tl.num_programs(1) * NH * L + stat   # B*H*L per split

    if IS_STATS or ONE_PASS:
        b_m = tl.full([NHP, BM], float("-inf"), dtype=lse.dtype.element_ty)
        b_l = tl.zeros([NHP, BM], dtype=lse.dtype.element_ty)
    if not IS_STATS:
        b_acc = tl.zeros([NHP, BM, DP], dtype=lse.dtype.element_ty)
    if not (IS_STATS or ONE_PASS):
        b_lse = tl.load(stat_ptrs, mask=stat_ok, other=0.0)

    hi = L
    if CAUSAL:
        hi = tl.minimum(L, (i_m + 1) * BM)
    k_lo, k_hi = _split_range(0, hi, BN)
    for j0 in range(k_lo, k_hi, BN):
        cols = j0 + tl.arange(0, BN)
        b_k = _load_heads(k_base, kv_heads, skh, cols, dims, skl, skd, head_ok, L, D)     # [NHP, BN, DP]
        b_s = tl.dot(b_q, tl.permute(b_k, (0, 2, 1)), input_precision=DOT_PREC) * scale  # [NHP, BM, BN]
        if PRE_MIX:
            b_s = _mix(w_pre, b_s, NHP, BM, BN, MIX_PREC)
        keep = cols[None, None, :] < L
        if CAUSAL:
            keep = keep & (cols[None, None, :] <= rows[None, :, None])
        if IS_STATS or ONE_PASS:
            b_z = tl.where(keep, b_s, float("-inf"))
            m_new = tl.maximum(b_m, tl.max(b_z, axis=2))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(b_m - m_safe)
            b_e = tl.exp(b_z - m_safe[:, :, None])
            b_l = b_l * alpha + tl.sum(b_e, axis=2)
            b_m = m_new
            if ONE_PASS:
                b_v = _load_heads(v_base, kv_heads, svh, cols, dims, svl, svd, head_ok, L, D)  # [NHP, BN, DP]
                b_acc = b_acc * alpha[:, :, None] + tl.dot(b_e.to(b_v.dtype), b_v, input_precision=DOT_PREC)
        else:
            b_p = tl.where(keep, tl.exp(b_s - b_lse[:, :, None]), 0.0)
            if POST_MIX:
                b_p = _mix(w_post, b_p, NHP, BM, BN, MIX_PREC)
            b_v = _load_heads(v_base, kv_heads, svh, cols, dims, svl, svd, head_ok, L, D)  # [NHP, BN, DP]
            b_acc += tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PREC)

    if IS_STATS or ONE_PASS:
        tl.store(split_stat_ptrs, b_m + tl.log(b_l), mask=stat_ok)
    if ONE_PASS:
        b_acc = b_acc / tl.where(b_l == 0.0, 1.0, b_l)[:, :, None]
    if not IS_STATS:
        o_ptrs = (out + tl.program_id(2).to(tl.int64) * sos + i_b * sob + heads[:, None, None].to(tl.int64) * soh
                  + rows[None, :, None].to(tl.int64) * sol + dims[None, None, :] * sod)
        o_mask = head_ok[:, None, None] & (rows[None, :, None] < L) & (dims[None, None, :] < D)
        tl.store(o_ptrs, b_acc.to(out.dtype.element_ty), mask=o_mask)

"""Triton kernels of the fused decode step: a few query rows at the end of long sequences.

The window's scores S = q k^T (B, H, W, LK) come from one batched matmul (k read once); its W
rows are the block's LQ rows and the convs' row halo above them. Two kernels take S through
the rest of MTA with the keys split across programs: a program owns one batch element, one
block of NH heads (whole mixing groups) and a range of key tiles, and holds a tile of every
head of its block as one [NHP, rows, BN] tensor. The convs are direct: one load of the input
at each tap's row and key offset times that tap's weight per head (tl.dot cannot shift, and
these tiles have too few rows for a Toeplitz dot to pay); the head mixes are one tl.dot over
the heads.

decode_logits_kernel writes M, the pre-softmax logits (after the pre conv and the pre mix) of
the rows the post conv reads (window rows CQ-1 .. W-1), and each split's running max and sum
of them per (head, row). decode_weights_kernel combines the splits into each row's
log-sum-exp (in a fixed order) and writes A, the block's post-softmax, post-conv, post-mix
weights over every key (zero past a sequence's end). A V is one more batched matmul.
"""
import triton
import triton.language as tl


@triton.jit
def _row_stats_combine(stats, b, heads, rows, NS, B, H, RP: tl.constexpr, ok):
    """[NHP, RP] log-sum-exp of rows (0 where a row has no key) from every split's running max
    and sum in stats (NS, 2, B, H, RP), combined in split order."""
    at = (b * H + heads[:, None]).to(tl.int64) * RP + rows[None, :]
    m_all = tl.full(at.shape, float("-inf"), dtype=tl.float32)
    for i in range(NS):
        m_all = tl.maximum(m_all, tl.load(stats + i * 2 * B * H * RP + at, mask=ok, other=float("-inf")))
    m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
    l_all = tl.zeros(at.shape, dtype=tl.float32)
    for i in range(NS):
        m_i = tl.load(stats + i * 2 * B * H * RP + at, mask=ok, other=float("-inf"))
        l_i = tl.load(stats + (i * 2 + 1) * B * H * RP + at, mask=ok, other=0.0)
        l_all += l_i * tl.exp(m_i - m_safe)
    return tl.where(l_all > 0, m_safe + tl.log(tl.where(l_all > 0, l_all, 1.0)), 0.0)


@triton.jit
def _mix(x, mix, hb, hh, NH: tl.constexpr, NHP: tl.constexpr, PREC: tl.constexpr):
    """x [NHP, R, C] mixed over its heads by the block's (NH, NH) weight of mix (H // NH, NH, NH)."""
    wm = tl.load(mix + (hb * NH + hh[:, None]) * NH + hh[None, :], mask=(hh < NH)[:, None] & (hh < NH)[None, :],
                 other=0.0)
    y = tl.dot(wm, tl.reshape(x, [NHP, x.shape[1] * x.shape[2]]), input_precision=PREC)
    return tl.reshape(y, x.shape)


@triton.jit
def _exists(rows_ok, pos, keys, n_keys, CAUSAL: tl.constexpr):
    """[NHP, R, BN]: rows_ok ([NHP, R, 1]) where the key keys[j] exists (in [0, n_keys)) and, if
    causal, is not after the row's position pos [R]."""
    ok = rows_ok & ((keys >= 0) & (keys < n_keys))[None, None, :]
    if CAUSAL:
        ok = ok & (keys[None, None, :] <= pos[None, :, None])
    return ok


@triton.jit
def decode_logits_kernel(s, lens, pre_conv, pre_mix, m_out, stats, W, LK, H, scale, n_blocks,
                         HAS_LENS: tl.constexpr, CAUSAL: tl.constexpr, PRE_CONV: tl.constexpr,
                         PRE_MIX: tl.constexpr, CQ: tl.constexpr, CK: tl.constexpr, PL: tl.constexpr,
                         NR: tl.constexpr, RP: tl.constexpr, NH: tl.constexpr, NHP: tl.constexpr,
                         BN: tl.constexpr, PREC: tl.constexpr):
    """m_out (B, H, NR, LK) fp32: the logits M of window rows CQ-1 .. W-1 (NR of them) on the keys
    of this split's tiles; stats (NS, 2, B, H, RP) fp32: the split's running max (0) and sum (1)
    of exp(M) per row over valid keys. s (B, H, W, LK) fp32 unscaled scores, window row w at
    position n_keys - W + w (n_keys = lens[b] or LK); pre_conv (H, CQ, CK), pre_mix
    (H // NH, NH, NH) block-diagonal fp32. Grid (NS, B * n_blocks)."""
    i_s, pid = tl.program_id(0), tl.program_id(1)
    NS = tl.num_programs(0)
    b, hb = pid // n_blocks, pid % n_blocks
    n_keys = tl.load(lens + b) if HAS_LENS else LK
    pos0 = n_keys - W
    n_tiles = tl.cdiv(n_keys, BN)
    hh = tl.arange(0, NHP)
    heads = hb * NH + hh
    r = tl.arange(0, RP)
    o = tl.arange(0, BN)
    hok = (hh < NH)[:, None, None]
    pos = pos0 + (CQ - 1) + r                  # the position of M's row r
    m_run = tl.full([NHP, RP], float("-inf"), dtype=tl.float32)
    l_run = tl.zeros([NHP, RP], dtype=tl.float32)
    s_heads = s + (b * H + heads).to(tl.int64)[:, None, None] * W * LK
    for t in range(i_s * n_tiles // NS, (i_s + 1) * n_tiles // NS):
        cols = t * BN + o
        c = tl.zeros([NHP, RP, BN], dtype=tl.float32)
        for a in tl.static_range(CQ):
            src = r + a                          # window row of S read by tap a of row r
            src_pos = pos0 + src
            row_ok = hok & ((r < NR) & (src_pos >= 0))[None, :, None]
            for u in tl.static_range(CK):
                key = cols + (u - PL)
                ok = _exists(row_ok, src_pos, key, n_keys, CAUSAL)
                x = tl.load(s_heads + src[None, :, None] * LK + key[None, None, :], mask=ok, other=0.0)
                if PRE_CONV:
                    wt = tl.load(pre_conv + (heads * CQ + a) * CK + u, mask=hh < NH, other=0.0)
                    c += wt[:, None, None] * x
                else:
                    c += x
        c = c * scale
        if PRE_MIX:
            c = _mix(c, pre_mix, hb, hh, NH, NHP, PREC)
        live = hok & (r < NR)[None, :, None]
        tl.store(m_out + ((b * H + heads).to(tl.int64)[:, None, None] * NR + r[None, :, None]) * LK
                 + cols[None, None, :], c, mask=live & (cols < n_keys)[None, None, :])
        valid = _exists(live & (pos >= 0)[None, :, None], pos, cols, n_keys, CAUSAL)
        z = tl.where(valid, c, float("-inf"))
        m_new = tl.maximum(m_run, tl.max(z, axis=2))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_run = l_run * tl.exp(m_run - m_safe) + tl.sum(tl.exp(z - m_safe[:, :, None]), axis=2)
        m_run = m_new
    B = tl.num_programs(1) // n_blocks
    at = (((i_s * 2) * B + b) * H + heads[:, None]).to(tl.int64) * RP + r[None, :]
    ok = (hh < NH)[:, None]
    tl.store(stats + at, m_run, mask=ok)
    tl.store(stats + at + B * H * RP, l_run, mask=ok)


@triton.jit
def decode_weights_kernel(m_in, lens, stats, lse_scratch, post_conv, post_mix, a_out, W, LK, H, n_blocks, NS,
                          HAS_LENS: tl.constexpr, CAUSAL: tl.constexpr, POST_CONV: tl.constexpr,
                          POST_MIX: tl.constexpr,
                          CQ0: tl.constexpr, CQ2: tl.constexpr, CK2: tl.constexpr, PL2: tl.constexpr,
                          NR: tl.constexpr, RP: tl.constexpr, LQ: tl.constexpr, LQP: tl.constexpr,
                          NH: tl.constexpr, NHP: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    """a_out (B, H, LQ, LK) in its dtype: A of the window's last LQ rows on every key of this
    split's tiles of all LK (zero past n_keys; tiles wholly past it are only zeroed). m_in, stats: what decode_logits_kernel wrote
    (NS splits); CQ0: the pre conv's rows (window row of M's row 0 is CQ0-1); post_conv (H, CQ2,
    CK2) (CQ2 = CK2 = 1 without one), post_mix (H // NH, NH, NH); lse_scratch: NHP * RP fp32 per
    program. Grid (NS2, B * n_blocks)."""
    i_s, pid = tl.program_id(0), tl.program_id(1)
    NS2 = tl.num_programs(0)
    b, hb = pid // n_blocks, pid % n_blocks
    B = tl.num_programs(1) // n_blocks
    n_keys = tl.load(lens + b) if HAS_LENS else LK
    pos0 = n_keys - W + (CQ0 - 1)              # the position of M's row 0
    hh = tl.arange(0, NHP)
    heads = hb * NH + hh
    r = tl.arange(0, RP)
    # the rows' log-sum-exp goes through scratch: the post conv reads it at shifted rows
    lse = _row_stats_combine(stats, b, heads, r, NS, B, H, RP, (hh < NH)[:, None])
    scratch = lse_scratch + (i_s * tl.num_programs(1) + pid).to(tl.int64) * (NHP * RP)
    tl.store(scratch + hh[:, None] * RP + r[None, :], lse)
    tl.debug_barrier()
    q = tl.arange(0, LQP)
    o = tl.arange(0, BN)
    hok = (hh < NH)[:, None, None]
    out_pos = pos0 + (CQ2 - 1) + q                # M's row CQ2-1+q is output row q
    m_heads = m_in + (b * H + heads).to(tl.int64)[:, None, None] * NR * LK
    n_tiles = tl.cdiv(LK, BN)
    t_lo, t_hi = i_s * n_tiles // NS2, (i_s + 1) * n_tiles // NS2
    t_end = tl.minimum(t_hi, tl.maximum(t_lo, tl.cdiv(n_keys, BN)))     # tiles past it hold no key
    out_row = (b * H + heads).to(tl.int64)[:, None, None] * LQ + q[None, :, None]
    for t in range(t_end, t_hi):
        cols = t * BN + o
        tl.store(a_out + out_row * LK + cols[None, None, :], tl.zeros([NHP, LQP, BN], dtype=a_out.dtype.element_ty),
                 mask=hok & (q < LQ)[None, :, None] & (cols < LK)[None, None, :])
    for t in range(t_lo, t_end):
        cols = t * BN + o
        acc = tl.zeros([NHP, LQP, BN], dtype=tl.float32)
        for a in tl.static_range(CQ2):
            src = q + a                          # M's row read by tap a of output row q
            src_pos = pos0 + src
            row_ok = hok & ((q < LQ) & (src_pos >= 0))[None, :, None]
            lse_a = tl.load(scratch + hh[:, None, None] * RP + src[None, :, None], mask=row_ok, other=0.0)
            for u in tl.static_range(CK2):
                key = cols + (u - PL2)
                ok = _exists(row_ok, src_pos, key, n_keys, CAUSAL)
                x = tl.load(m_heads + src[None, :, None] * LK + key[None, None, :], mask=ok, other=0.0)
                p = tl.where(ok, tl.exp(x - lse_a), 0.0)
                if POST_CONV:
                    wt = tl.load(post_conv + (heads * CQ2 + a) * CK2 + u, mask=hh < NH, other=0.0)
                    acc += wt[:, None, None] * p
                else:
                    acc += p
        acc = tl.where(_exists(hok & (q < LQ)[None, :, None], out_pos, cols, n_keys, CAUSAL), acc, 0.0)
        if POST_MIX:
            acc = _mix(acc, post_mix, hb, hh, NH, NHP, PREC)
        tl.store(a_out + out_row * LK + cols[None, None, :], acc.to(a_out.dtype.element_ty),
                 mask=hok & (q < LQ)[None, :, None] & (cols < LK)[None, None, :])

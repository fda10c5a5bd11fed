"""Triton kernels of the fused decode step: a few query rows at the end of long sequences.

The rows' scores S = q k^T (B, H, W, Lk) come from one batched matmul (k read once); these
kernels take S through the rest of MTA for the block's last LQ rows, with the keys split
across programs: a program owns one batch element, one block of NH heads (whole mixing
groups) and a range of key tiles. A tile of BN keys is processed in a window of PW = BN + 2 PH
columns (PH: how far the post conv reaches), whose C and P come from S on SW >= PW + 2 SH
columns (SH: how far the pre conv reaches). Per head, each conv is one dot per query offset
with a Toeplitz matrix of the weights; row shifts are row offsets of the loads. Frames of
every head go through a per-program scratch buffer for the head mixes.

decode_stats_kernel writes each split's running max and sum of the masked pre-softmax logits
per (head, row); decode_probs_kernel combines them into each row's log-sum-exp (in a fixed
order) and writes A, the post-softmax, post-conv, post-mix weights of the output rows. A V is
one more batched matmul on the host.
"""
import triton
import triton.language as tl


@triton.jit
def _scores(s_base, rows, cols, W, LK, n_keys, pos0, scale, CAUSAL: tl.constexpr):
    """[len(rows), len(cols)] block of one head's S (rows of the window, cols absolute keys)
    times scale, zero where the row does not exist (outside the window or at a negative
    position), the key outside [0, n_keys), or (causal) the key after the row's position."""
    pos = pos0 + rows
    ok = ((rows >= 0) & (rows < W) & (pos >= 0))[:, None] & ((cols >= 0) & (cols < n_keys))[None, :]
    if CAUSAL:
        ok = ok & (cols[None, :] <= pos[:, None])
    x = tl.load(s_base + rows[:, None].to(tl.int64) * LK + cols[None, :], mask=ok, other=0.0)
    return x * scale


@triton.jit
def _toeplitz(w_a, first, CK: tl.constexpr, KU: tl.constexpr, BC: tl.constexpr):
    """[KU, BC] matrix T[u, m] = w_a[first + u - m], zero where that tap leaves [0, CK): window
    column u of the input times T gives output column m."""
    u = tl.arange(0, KU)
    m = tl.arange(0, BC)
    t = first + u[:, None] - m[None, :]
    return tl.load(w_a + t, mask=(t >= 0) & (t < CK), other=0.0)


@triton.jit
def _logit_frames(s, pre_conv, pre_mix, frames, b, hb, j0, W, LK, n_keys, pos0, scale, H,
                  CAUSAL: tl.constexpr, PRE_CONV: tl.constexpr, PRE_MIX: tl.constexpr,
                  CQ: tl.constexpr, CK: tl.constexpr, PL: tl.constexpr,
                  NH: tl.constexpr, NHP: tl.constexpr, WP: tl.constexpr, PW: tl.constexpr, PH: tl.constexpr,
                  SH: tl.constexpr, SW: tl.constexpr, PREC: tl.constexpr):
    """The pre-softmax logits M of the program's NH heads on the window columns j0 - PH + [0, PW)
    and rows [0, WP), as [NHP, WP * PW] (padding heads zero): each head's C (the pre conv of S)
    goes to its frame of ``frames`` ([NHP, WP, PW] scratch), then the pre mix over the frames."""
    w = tl.arange(0, WP)
    f = tl.arange(0, PW)
    col0 = j0 - PH
    for h in range(NH):
        head = hb * NH + h
        s_base = s + ((b * H + head) * W).to(tl.int64) * LK
        if PRE_CONV:
            c = tl.zeros([WP, PW], dtype=tl.float32)
            for a in tl.static_range(CQ):
                x = _scores(s_base, w + a - (CQ - 1), col0 - SH + tl.arange(0, SW), W, LK, n_keys, pos0, scale, CAUSAL)
                c += tl.dot(x, _toeplitz(pre_conv + (head * CQ + a) * CK, PL - SH, CK, SW, PW), input_precision=PREC)
        else:
            c = _scores(s_base, w, col0 + f, W, LK, n_keys, pos0, scale, CAUSAL)
        tl.store(frames + (h * WP + w[:, None]) * PW + f[None, :], c)
    tl.debug_barrier()
    hh = tl.arange(0, NHP)
    e = tl.arange(0, WP * PW)
    x = tl.load(frames + hh[:, None] * (WP * PW) + e[None, :], mask=(hh < NH)[:, None], other=0.0)
    if PRE_MIX:
        wm = tl.load(pre_mix + (hb * NH + hh[:, None]) * NH + hh[None, :],
                     mask=(hh < NH)[:, None] & (hh < NH)[None, :], other=0.0)
        x = tl.dot(wm, x, input_precision=PREC)
    tl.debug_barrier()      # every thread has read the frames
    return x


@triton.jit
def _valid(hh, w, cols, W, n_keys, pos0, NH: tl.constexpr, CAUSAL: tl.constexpr):
    """[NHP, WP, len(cols)]: where a logit exists (real head, row and key, not in the future)."""
    pos = pos0 + w
    ok = (hh < NH)[:, None, None] & ((w < W) & (pos >= 0))[None, :, None] & \
        ((cols >= 0) & (cols < n_keys))[None, None, :]
    if CAUSAL:
        ok = ok & (cols[None, None, :] <= pos[None, :, None])
    return ok


@triton.jit
def decode_stats_kernel(s, lens, pre_conv, pre_mix, stats, scratch, W, LK, H, scale, n_blocks,
                        HAS_LENS: tl.constexpr, CAUSAL: tl.constexpr, PRE_CONV: tl.constexpr, PRE_MIX: tl.constexpr,
                        CQ: tl.constexpr, CK: tl.constexpr, PL: tl.constexpr,
                        NH: tl.constexpr, NHP: tl.constexpr, WP: tl.constexpr, BN: tl.constexpr, PW: tl.constexpr,
                        PH: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PREC: tl.constexpr):
    """stats (NS, 2, B, H, WP) fp32: each split's running max (0) and sum (1) of the masked
    pre-softmax logits of every row, over the keys of its tiles. s (B, H, W, LK) fp32 unscaled
    scores of the window's W rows (row w at position n_keys - W + w; n_keys = lens[b] or LK);
    pre_conv (H, CQ, CK), pre_mix (H // NH, NH, NH) block-diagonal fp32. Grid (NS, B * n_blocks)."""
    i_s, pid = tl.program_id(0), tl.program_id(1)
    NS = tl.num_programs(0)
    b, hb = pid // n_blocks, pid % n_blocks
    n_keys = tl.load(lens + b) if HAS_LENS else LK
    pos0 = n_keys - W
    n_tiles = tl.cdiv(n_keys, BN)
    frames = scratch + (i_s * tl.num_programs(1) + pid).to(tl.int64) * (NHP * WP * PW)
    hh = tl.arange(0, NHP)
    w = tl.arange(0, WP)
    f = tl.arange(0, PW)
    m_run = tl.full([NHP, WP], float("-inf"), dtype=tl.float32)
    l_run = tl.zeros([NHP, WP], dtype=tl.float32)
    for t in range(i_s * n_tiles // NS, (i_s + 1) * n_tiles // NS):
        j0 = t * BN
        x = _logit_frames(s, pre_conv, pre_mix, frames, b, hb, j0, W, LK, n_keys, pos0, scale, H, CAUSAL,
                          PRE_CONV, PRE_MIX, CQ, CK, PL, NH, NHP, WP, PW, PH, SH, SW, PREC)
        cols = j0 - PH + f
        central = (f >= PH) & (f < PH + BN)     # each key counts in one tile only
        ok = _valid(hh, w, cols, W, n_keys, pos0, NH, CAUSAL) & central[None, None, :]
        z = tl.where(ok, tl.reshape(x, [NHP, WP, PW]), float("-inf"))
        m_new = tl.maximum(m_run, tl.max(z, axis=2))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_run = l_run * tl.exp(m_run - m_safe) + tl.sum(tl.exp(z - m_safe[:, :, None]), axis=2)
        m_run = m_new
    B = tl.num_programs(1) // n_blocks
    at = (((i_s * 2) * B + b) * H + hb * NH + hh[:, None]).to(tl.int64) * WP + w[None, :]
    ok = (hh < NH)[:, None]
    tl.store(stats + at, m_run, mask=ok)
    tl.store(stats + at + B * H * WP, l_run, mask=ok)


@triton.jit
def decode_probs_kernel(s, lens, pre_conv, pre_mix, post_conv, post_mix, stats, scratch, a_out, W, LK, H, scale,
                        n_blocks, LQ,
                        HAS_LENS: tl.constexpr, CAUSAL: tl.constexpr, PRE_CONV: tl.constexpr, PRE_MIX: tl.constexpr,
                        POST_CONV: tl.constexpr, POST_MIX: tl.constexpr,
                        CQ: tl.constexpr, CK: tl.constexpr, PL: tl.constexpr,
                        CQ2: tl.constexpr, CK2: tl.constexpr, PL2: tl.constexpr,
                        NH: tl.constexpr, NHP: tl.constexpr, WP: tl.constexpr, BN: tl.constexpr, PW: tl.constexpr,
                        PH: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PREC: tl.constexpr):
    """a_out (B, H, LQ, LK) fp32, zero-filled: A of the window's last LQ rows on the keys of this
    split's tiles. Arguments as decode_stats_kernel's; stats: what it wrote; post_conv (H, CQ2,
    CK2), post_mix (H // NH, NH, NH). Without a post conv PH is 0 and PW == BN."""
    i_s, pid = tl.program_id(0), tl.program_id(1)
    NS = tl.num_programs(0)
    b, hb = pid // n_blocks, pid % n_blocks
    B = tl.num_programs(1) // n_blocks
    n_keys = tl.load(lens + b) if HAS_LENS else LK
    pos0 = n_keys - W
    n_tiles = tl.cdiv(n_keys, BN)
    frames = scratch + (i_s * tl.num_programs(1) + pid).to(tl.int64) * (2 * NHP * WP * PW)
    a_frames = frames + NHP * WP * PW
    hh = tl.arange(0, NHP)
    w = tl.arange(0, WP)
    f = tl.arange(0, PW)
    o = tl.arange(0, BN)
    # each row's log-sum-exp from every split's statistics, in split order
    at = ((b * H + hb * NH + hh[:, None]).to(tl.int64) * WP + w[None, :])
    ok = (hh < NH)[:, None]
    m_all = tl.full([NHP, WP], float("-inf"), dtype=tl.float32)
    for i in range(NS):
        m_all = tl.maximum(m_all, tl.load(stats + i * 2 * B * H * WP + at, mask=ok, other=float("-inf")))
    m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
    l_all = tl.zeros([NHP, WP], dtype=tl.float32)
    for i in range(NS):
        m_i = tl.load(stats + i * 2 * B * H * WP + at, mask=ok, other=float("-inf"))
        l_i = tl.load(stats + (i * 2 + 1) * B * H * WP + at, mask=ok, other=0.0)
        l_all += l_i * tl.exp(m_i - m_safe)
    lse = m_safe + tl.log(tl.where(l_all > 0, l_all, 1.0))
    for t in range(i_s * n_tiles // NS, (i_s + 1) * n_tiles // NS):
        j0 = t * BN
        x = _logit_frames(s, pre_conv, pre_mix, frames, b, hb, j0, W, LK, n_keys, pos0, scale, H, CAUSAL,
                          PRE_CONV, PRE_MIX, CQ, CK, PL, NH, NHP, WP, PW, PH, SH, SW, PREC)
        cols = j0 - PH + f
        valid = _valid(hh, w, cols, W, n_keys, pos0, NH, CAUSAL) & (l_all > 0)[:, :, None]
        p = tl.where(valid, tl.exp(tl.reshape(x, [NHP, WP, PW]) - lse[:, :, None]), 0.0)
        if POST_CONV:
            tl.store(frames + hh[:, None, None] * (WP * PW) + w[None, :, None] * PW + f[None, None, :], p)
            tl.debug_barrier()
            for h in range(NH):
                head = hb * NH + h
                a1 = tl.zeros([WP, BN], dtype=tl.float32)
                for a in tl.static_range(CQ2):
                    src = w + a - (CQ2 - 1)
                    p_a = tl.load(frames + (h * WP + src[:, None]) * PW + f[None, :],
                                  mask=(src >= 0)[:, None], other=0.0)
                    a1 += tl.dot(p_a, _toeplitz(post_conv + (head * CQ2 + a) * CK2, PL2 - PH, CK2, PW, BN),
                                 input_precision=PREC)
                keep = (j0 + o)[None, :] < n_keys
                if CAUSAL:
                    keep = keep & ((j0 + o)[None, :] <= (pos0 + w)[:, None])
                a1 = tl.where(keep, a1, 0.0)
                tl.store(a_frames + (h * WP + w[:, None]) * BN + o[None, :], a1)
            tl.debug_barrier()
            e = tl.arange(0, WP * BN)
            x = tl.load(a_frames + hh[:, None] * (WP * BN) + e[None, :], mask=(hh < NH)[:, None], other=0.0)
            tl.debug_barrier()
        else:
            x = tl.reshape(p, [NHP, WP * BN])
        if POST_MIX:
            wm = tl.load(post_mix + (hb * NH + hh[:, None]) * NH + hh[None, :],
                         mask=(hh < NH)[:, None] & (hh < NH)[None, :], other=0.0)
            x = tl.dot(wm, x, input_precision=PREC)
        a = tl.reshape(x, [NHP, WP, BN])
        r = w - (W - LQ)                         # the output rows: the window's last LQ
        dst = a_out + (((b * H + hb * NH + hh[:, None, None]).to(tl.int64) * LQ + r[None, :, None]) * LK
                       + (j0 + o)[None, None, :])
        keep = (hh < NH)[:, None, None] & ((r >= 0) & (r < LQ))[None, :, None] & ((j0 + o) < n_keys)[None, None, :]
        tl.store(dst, a, mask=keep)

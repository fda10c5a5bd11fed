"""Triton kernels of the fused MTA forward.

One program owns a block of output rows for a block of NH heads (NH = lcm of the two mixing
group sizes, or 1), so that head mixing sees every head of its group on the same tile. It
walks the key axis in tiles. Every tile lives in a *frame*: RF rows by W columns starting at
(s_r0, s_c0). The frame carries the halos the convolutions need, so the outputs of a frame
are a smaller window of it:

    S frame   rows s_r0 + f,               cols s_c0 + u                    (all valid)
    C/M/P     rows s_r0 + f,               cols s_c0 + PL_PRE + m           valid f >= HQ, m < W-(CK_PRE-1)
    A1/A      rows s_r0 + f,               cols s_c0 + PL_PRE + PL_POST + m valid f >= HQ+HP, m < W_OUT

with HQ = CQ_PRE-1, HP = CQ_POST-1 (0 when the part is absent). The key direction of a conv
is one tl.dot with a Toeplitz matrix T[u, m] = w[a, u-m]; the query direction reads the
tile back from a per-program scratch buffer at a row offset (Triton cannot shift registers).
Scratch per program: one (NH, RF, W) fp32 slot, mixed in place, and one (RF, W) slot per conv.
No (L x L) tensor exists: memory is O(L) (statistics, an fp32 output accumulator, scratch
proportional to the number of programs).

Pass 1 (mta_fwd_stats_kernel) computes the row log-sum-exp of the masked logits per head;
pass 2 (mta_fwd_out_kernel) recomputes the logits, normalises them with that LSE, applies the
post-softmax parts and multiplies by V. Post-softmax mixing needs the *normalised* P of every
head in the group, which is why the LSE comes first.
"""
import triton
import triton.language as tl


@triton.jit
def _load_rows(base, rows, dims, stride_l, stride_d, L, D):
    """[R, DP] block of a (L, D) matrix at the given rows; zero outside [0, L) x [0, D)."""
    ptrs = base + rows[:, None].to(tl.int64) * stride_l + dims[None, :].to(tl.int64) * stride_d
    mask = (rows[:, None] >= 0) & (rows[:, None] < L) & (dims[None, :] < D)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _toeplitz(w_head, a, CK: tl.constexpr, W: tl.constexpr):
    """[W, W] matrix T[u, m] = w[a, u - m] for 0 <= u - m < CK: a key-direction conv as a dot."""
    u = tl.arange(0, W)
    tap = u[:, None] - u[None, :]
    return tl.load(w_head + a * CK + tap, mask=(tap >= 0) & (tap < CK), other=0.0)


@triton.jit
def _conv_frame(x, slot, w_head, CQ: tl.constexpr, CK: tl.constexpr,
                RF: tl.constexpr, W: tl.constexpr, PREC: tl.constexpr):
    """Key-query conv of one head's [RF, W] frame x; returns out[f, m] =
    sum_{a,t} w[a,t] x[f + a - (CQ-1), m + t] (frame rows above 0 read as zero).
    The row shift goes through the scratch ``slot`` of RF*W floats; the key direction is
    a dot with a Toeplitz matrix of the weights."""
    f = tl.arange(0, RF)
    m = tl.arange(0, W)
    out = tl.zeros([RF, W], dtype=slot.dtype.element_ty)
    tl.debug_barrier()  # earlier readers of slot are done
    tl.store(slot + f[:, None] * W + m[None, :], x)
    tl.debug_barrier()
    for a in range(CQ):
        src = f - (CQ - 1 - a)
        xa = tl.load(slot + src[:, None] * W + m[None, :], mask=src[:, None] >= 0, other=0.0)
        out += tl.dot(xa, _toeplitz(w_head, a, CK, W), input_precision=PREC)
    return out


@triton.jit
def _mix_frames(frames, w_block, NH: tl.constexpr, NHP: tl.constexpr,
                E: tl.constexpr, CHUNK: tl.constexpr, PREC: tl.constexpr):
    """frames[o, :] <- sum_c w_block[o, c] * frames[c, :] in place over NH frames of E floats,
    as dots of [NHP, NHP] x [NHP, CHUNK] (NHP >= 16 for tl.dot), one chunk of every frame
    at a time (read whole before it is written)."""
    o = tl.arange(0, NHP)
    mo = o < NH
    wt = tl.load(w_block + o[:, None] * NH + o[None, :], mask=mo[:, None] & mo[None, :], other=0.0)
    tl.debug_barrier()  # every head's frame is written
    for e0 in range(0, E, CHUNK):
        e = e0 + tl.arange(0, CHUNK)
        x = tl.load(frames + o[:, None] * E + e[None, :], mask=mo[:, None], other=0.0)
        y = tl.dot(wt, x, input_precision=PREC)
        tl.debug_barrier()  # every thread has read this chunk
        tl.store(frames + o[:, None] * E + e[None, :], y, mask=mo[:, None])
    tl.debug_barrier()


@triton.jit
def _pre_logits(q_base, k_base, sql, sqd, skl, skd, w_pre_head, slot_pre, rows, cols_s, L, D, scale,
                CAUSAL: tl.constexpr, PRE_CONV: tl.constexpr, CQ_PRE: tl.constexpr,
                CK_PRE: tl.constexpr, RF: tl.constexpr, W: tl.constexpr, DP: tl.constexpr,
                QK_PREC: tl.constexpr, CONV_PREC: tl.constexpr):
    """One head's pre-softmax logits on the frame, before head mixing: the scores S, and
    with pre_conv their conv after zeroing the future (the C frame)."""
    dims = tl.arange(0, DP)
    q = _load_rows(q_base, rows, dims, sql, sqd, L, D)      # [RF, DP]
    k = _load_rows(k_base, cols_s, dims, skl, skd, L, D)    # [W, DP]
    s = tl.dot(q, tl.trans(k), input_precision=QK_PREC) * scale   # [RF, W]
    if PRE_CONV:
        if CAUSAL:
            s = tl.where(cols_s[None, :] > rows[:, None], 0.0, s)
        s = _conv_frame(s, slot_pre, w_pre_head, CQ_PRE, CK_PRE, RF, W, CONV_PREC)
    return s


@triton.jit
def mta_fwd_kernel(
    q, k, v, lse, m_run, l_run, o_acc, scratch,
    w_pre_conv, w_pre_mix, w_post_conv, w_post_mix,
    sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd,
    H, HKV_REP, L, D, scale, rows_per_prog, n_head_blocks, n_splits,
    IS_STATS: tl.constexpr, CAUSAL: tl.constexpr,
    PRE_CONV: tl.constexpr, PRE_MIX: tl.constexpr, POST_CONV: tl.constexpr, POST_MIX: tl.constexpr,
    CQ_PRE: tl.constexpr, CK_PRE: tl.constexpr, PL_PRE: tl.constexpr,
    CQ_POST: tl.constexpr, CK_POST: tl.constexpr, PL_POST: tl.constexpr,
    NH: tl.constexpr, NHP: tl.constexpr, RF: tl.constexpr, W: tl.constexpr,
    DP: tl.constexpr, DV: tl.constexpr, MIX_CHUNK: tl.constexpr,
    QK_PREC: tl.constexpr, CONV_PREC: tl.constexpr, PV_PREC: tl.constexpr,
):
    """Both passes of the forward for one (row block, batch, head block) program.

    q: (B, H, L, D); k, v: (B, H // HKV_REP, L, D), any strides.
    The key tiles a row block sees are split into n_splits contiguous ranges, one per
    program_id(2), so that short grids still fill the GPU; each split has its own statistics
    and output slabs, which the host combines.
    lse: (B, H, L) fp32; m_run, l_run: (n_splits, B, H, L) fp32. IS_STATS: accumulate the
    running max m_run and sum l_run of the masked logits over this split's keys (the host
    forms lse). Otherwise read lse and add this block's output rows into o_acc
    (n_splits, B, H, L, D) fp32, contiguous (written once when NH == 1, accumulated per key
    tile otherwise).
    w_pre_conv / w_post_conv: (H, CQ, CK) fp32; w_pre_mix / w_post_mix: (H // NH, NH, NH)
    fp32 block-diagonal mixing per head block. scratch: per program (NH + 2) * RF * W fp32.
    """
    i_r = (tl.num_programs(0) - 1 - tl.program_id(0)).to(tl.int64)   # longest causal rows first
    i_bh = tl.program_id(1).to(tl.int64)
    i_split = tl.program_id(2)
    i_b = i_bh // n_head_blocks
    i_hb = i_bh % n_head_blocks
    h0 = i_hb * NH
    prog = (i_split * tl.num_programs(1) + i_bh) * tl.num_programs(0) + i_r
    split_rows = i_split.to(tl.int64) * (tl.num_programs(1) // n_head_blocks) * H * L   # B * H * L per split
    m_run += split_rows
    l_run += split_rows
    o_acc += split_rows * D

    HQ: tl.constexpr = CQ_PRE - 1
    HP: tl.constexpr = 0 if IS_STATS else CQ_POST - 1
    W_C: tl.constexpr = W - (CK_PRE - 1)                    # valid C/P columns of a frame
    W_OUT: tl.constexpr = W_C if IS_STATS else W_C - (CK_POST - 1)
    PL_OUT: tl.constexpr = PL_PRE if IS_STATS else PL_PRE + PL_POST

    FRAME: tl.constexpr = RF * W
    slots = scratch + prog * ((NH + 2) * FRAME)
    slot_x = slots                     # NH frames: mixed in place
    slot_pre = slots + NH * FRAME      # one frame: row shifts of the pre conv
    slot_post = slot_pre + FRAME       # one frame: row shifts of the post conv

    f = tl.arange(0, RF)
    m = tl.arange(0, W)
    r0 = i_r * rows_per_prog                   # first output row
    rows = r0 - HQ - HP + f                    # absolute rows of the frame
    out_row = (f >= HQ + HP) & (f < HQ + HP + rows_per_prog) & (rows < L)

    # With one head per program and no post mix the output stays in registers; otherwise
    # each head's rows accumulate in o_acc (zero-filled by the host).
    dims = tl.arange(0, DP)
    acc = tl.zeros([RF, DP], dtype=o_acc.dtype.element_ty)

    # one past the last key column any output row can see
    col_end = L
    if CAUSAL:
        col_end = tl.minimum(L, r0 + rows_per_prog)

    n_tiles = tl.cdiv(col_end, W_OUT)
    for j0 in range((i_split * n_tiles // n_splits) * W_OUT, ((i_split + 1) * n_tiles // n_splits) * W_OUT, W_OUT):
        cols_s = j0 - PL_OUT + m              # absolute key columns of the S frame
        cols_c = cols_s + PL_PRE               # ... of the C / M / P frame
        cols_o = j0 + m                        # ... of the A1 / A frame
        tl.debug_barrier()                     # the previous tile's scratch readers are done
        if PRE_MIX:
            for c in range(NH):
                h = h0 + c
                x = _pre_logits(q + i_b * sqb + h * sqh, k + i_b * skb + (h // HKV_REP) * skh,
                                sql, sqd, skl, skd, w_pre_conv + h * (CQ_PRE * CK_PRE), slot_pre,
                                rows, cols_s, L, D, scale, CAUSAL, PRE_CONV, CQ_PRE, CK_PRE,
                                RF, W, DP, QK_PREC, CONV_PREC)
                tl.store(slot_x + c * FRAME + f[:, None] * W + m[None, :], x)
            _mix_frames(slot_x, w_pre_mix + i_hb * (NH * NH), NH, NHP, FRAME, MIX_CHUNK, CONV_PREC)
        for c in range(NH):
            h = h0 + c
            if PRE_MIX:
                logits = tl.load(slot_x + c * FRAME + f[:, None] * W + m[None, :])
            else:
                logits = _pre_logits(q + i_b * sqb + h * sqh, k + i_b * skb + (h // HKV_REP) * skh,
                                     sql, sqd, skl, skd, w_pre_conv + h * (CQ_PRE * CK_PRE), slot_pre,
                                     rows, cols_s, L, D, scale, CAUSAL, PRE_CONV, CQ_PRE, CK_PRE,
                                     RF, W, DP, QK_PREC, CONV_PREC)
            keep = (cols_c[None, :] >= 0) & (cols_c[None, :] < L) & (m[None, :] < W_C)
            keep = keep & (rows[:, None] >= 0) & (rows[:, None] < L) & (f[:, None] >= HQ)
            if CAUSAL:
                keep = keep & (cols_c[None, :] <= rows[:, None])
            stat = i_b * H * L + h * L + rows
            if IS_STATS:
                z = tl.where(keep & (m[None, :] < W_OUT), logits, float("-inf"))
                m_old = tl.load(m_run + stat, mask=out_row, other=float("-inf"))
                l_old = tl.load(l_run + stat, mask=out_row, other=0.0)
                m_new = tl.maximum(m_old, tl.max(z, axis=1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                l_new = l_old * tl.exp(m_old - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), axis=1)
                tl.store(m_run + stat, m_new, mask=out_row)
                tl.store(l_run + stat, l_new, mask=out_row)
            else:
                row_lse = tl.load(lse + stat, mask=(rows >= 0) & (rows < L), other=0.0)
                p = tl.where(keep, tl.exp(logits - row_lse[:, None]), 0.0)
                if POST_CONV:
                    p = _conv_frame(p, slot_post, w_post_conv + h * (CQ_POST * CK_POST),
                                    CQ_POST, CK_POST, RF, W, CONV_PREC)
                    if CAUSAL:
                        p = tl.where(cols_o[None, :] > rows[:, None], 0.0, p)
                p = tl.where((m[None, :] < W_OUT) & (cols_o[None, :] < L), p, 0.0)
                if POST_MIX:
                    if PRE_MIX:
                        tl.debug_barrier()  # every thread has read this head's logits from the frame
                    tl.store(slot_x + c * FRAME + f[:, None] * W + m[None, :], p)
                elif NH == 1:
                    # one head and no post mix: the output stays in registers
                    b_v = _load_rows(v + i_b * svb + (h // HKV_REP) * svh, cols_o, dims, svl, svd, L, D)
                    acc += tl.dot(p.to(b_v.dtype), b_v, input_precision=PV_PREC)
                else:
                    _accumulate_pv(p, v + i_b * svb + (h // HKV_REP) * svh, svl, svd,
                                   o_acc + (i_b * H + h) * L * D, rows, out_row, cols_o, L, D,
                                   DP, DV, PV_PREC)
        if not IS_STATS:
            if POST_MIX:
                _mix_frames(slot_x, w_post_mix + i_hb * (NH * NH), NH, NHP, FRAME, MIX_CHUNK, CONV_PREC)
                for o in range(NH):
                    h = h0 + o
                    a = tl.load(slot_x + o * FRAME + f[:, None] * W + m[None, :])
                    _accumulate_pv(a, v + i_b * svb + (h // HKV_REP) * svh, svl, svd,
                                   o_acc + (i_b * H + h) * L * D, rows, out_row, cols_o, L, D,
                                   DP, DV, PV_PREC)

    if (not IS_STATS) and NH == 1 and (not POST_MIX):
        ptrs = o_acc + (i_b * H + h0) * L * D + rows[:, None].to(tl.int64) * D + dims[None, :]
        tl.store(ptrs, acc, mask=out_row[:, None] & (dims[None, :] < D))


@triton.jit
def _accumulate_pv(a, v_base, svl, svd, acc_base, rows, out_row, cols, L, D,
                   DP: tl.constexpr, DV: tl.constexpr, PREC: tl.constexpr):
    """acc[rows, :] += a @ v[cols, :] for the output rows of the frame; a is [RF, W] fp32,
    acc a contiguous (L, D) fp32 matrix; the head dim is walked in chunks of DV."""
    a = a.to(v_base.dtype.element_ty)
    for d0 in range(0, DP, DV):
        dims = d0 + tl.arange(0, DV)
        vb = _load_rows(v_base, cols, dims, svl, svd, L, D)                         # [W, DV]
        ptrs = acc_base + rows[:, None].to(tl.int64) * D + dims[None, :]
        mask = out_row[:, None] & (dims[None, :] < D)
        acc = tl.load(ptrs, mask=mask, other=0.0)
        acc += tl.dot(a, vb, input_precision=PREC)
        tl.store(ptrs, acc, mask=mask)

"""Triton kernels of causal talking heads' two matmuls, skipping the tiles in every row's
future, with tiles moved by the Hopper copy engine (TMA tensor descriptors).

    causal_scores:  S[h, i, j] = sum_d x[h, i, d] y[h / rep, j, d]   tiles with a key <= i + zero_above
    causal_pv:      out[h, i, :] = sum_{j <= i + zero_above} a[h, i, j] y[h / rep, j, :]

h runs over the flattened (batch, head) pairs, so kv head h // rep of the flattened kv
heads is the right one for GQA. Descriptors store a tile from shared memory in one bulk copy
and load operands asynchronously, as cuBLAS does, which pointer loads and stores from the
MMA layout could not match.
"""
import triton
import triton.language as tl


@triton.jit
def causal_scores_kernel(x_desc, y_desc, s_desc, X_ROW0, R, K, ZERO_ABOVE, REP, N_BLOCKS, N_GROUPS,
                         BM: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr, TILES: tl.constexpr,
                         PREC: tl.constexpr, UPCAST: tl.constexpr):
    """s (H, R, K) = x[:, X_ROW0:X_ROW0 + R] y^T per head (x (H, L, D), y (Hkv, K', D), head h
    reading kv head h // REP), in s's dtype with fp32 sums (fp64 for fp64); the tiles whose first
    key is past the block's last row's last key (i + ZERO_ABOVE) are not written. A program
    makes up to TILES consecutive key tiles of one row block, its x tile loaded once. Grid
    (cdiv(R, BM) * N_GROUPS, H), N_GROUPS = cdiv(N_BLOCKS, TILES), N_BLOCKS = cdiv(K, BN)."""
    pid, h = tl.program_id(0), tl.program_id(1)
    m, group = pid // N_GROUPS, pid % N_GROUPS
    n_end = tl.minimum(N_BLOCKS, (m * BM + BM - 1 + ZERO_ABOVE) // BN + 1)   # tiles [0, n_end) reach the past
    n_lo = group * TILES
    if n_lo < n_end:
        xs = x_desc.load([h, X_ROW0 + m * BM, 0]).reshape(BM, DP)
        if UPCAST:
            xs = xs.to(tl.float32)
        for n in range(n_lo, tl.minimum(n_end, n_lo + TILES)):
            ys = y_desc.load([h // REP, n * BN, 0]).reshape(BN, DP)
            if UPCAST:
                ys = ys.to(tl.float32)
            s = tl.dot(xs, tl.trans(ys), input_precision=PREC)
            s_desc.store([h, m * BM, n * BN], s.to(s_desc.dtype).reshape(1, BM, BN))


@triton.jit
def causal_pv_kernel(a_desc, y_desc, out, sos, soh, soi, sod, R, K, D, ZERO_ABOVE, REP, CAUSAL: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                     UPCAST: tl.constexpr):
    """out (S, H, R, D) = a (H, R, K) y[:, :K] per head (y (Hkv, L, D), head h reading kv head
    h // REP) over split s's share of each row block's key blocks (S splits: program_id 2), in
    out's dtype with fp32 sums (fp64 for fp64); with CAUSAL, a[h, i, j] counts as zero for
    j > i + ZERO_ABOVE and is not read past the row block's last key. ACC: the sums' dtype.
    Grid (cdiv(R, BM), H, S), the longest rows first."""
    m = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    n_splits = tl.num_programs(2)
    rows = m * BM + tl.arange(0, BM)
    last = K
    past = K           # key blocks [0, past) lie in the past of every row of the block
    if CAUSAL:
        last = tl.minimum(K, m * BM + BM + ZERO_ABOVE)
        past = tl.minimum(K, (m * BM + ZERO_ABOVE + 1) // BN * BN)
    blocks = tl.cdiv(last, BN)
    lo = s * blocks // n_splits * BN
    hi = tl.minimum(last, (s + 1) * blocks // n_splits * BN)
    acc = tl.zeros([BM, DP], dtype=ACC)
    for n0 in range(lo, tl.minimum(past, hi), BN):
        at = a_desc.load([h, m * BM, n0]).reshape(BM, BN)
        ys = y_desc.load([h // REP, n0, 0]).reshape(BN, DP)
        if UPCAST:
            at, ys = at.to(tl.float32), ys.to(tl.float32)
        acc += tl.dot(at, ys, input_precision=PREC)
    for n0 in range(tl.maximum(lo, past), hi, BN):
        cols = n0 + tl.arange(0, BN)
        at = a_desc.load([h, m * BM, n0]).reshape(BM, BN)
        at = tl.where((cols[None, :] <= rows[:, None] + ZERO_ABOVE) & (cols[None, :] < K), at, 0.0)
        ys = y_desc.load([h // REP, n0, 0]).reshape(BN, DP)
        if UPCAST:
            at, ys = at.to(tl.float32), ys.to(tl.float32)
        acc += tl.dot(at, ys, input_precision=PREC)
    ds = tl.arange(0, DP)
    o_at = out + s.to(tl.int64) * sos + h.to(tl.int64) * soh + rows[:, None].to(tl.int64) * soi + ds[None, :] * sod
    tl.store(o_at, acc.to(out.dtype.element_ty), mask=(rows[:, None] < R) & (ds[None, :] < D))


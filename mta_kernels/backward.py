"""Host side of the fused backward: plain attention, and head mixing without convs."""
import os

import torch

from .flash_kernels import flash_bwd_dkdv_kernel, flash_bwd_dq_kernel, flash_bwd_preprocess_kernel
from .forward import (_next_pow2, _precision, acc_dtype, block_mix_weights, cdiv, heads_per_program,
                      split_count, sum_splits)
from .mix_bwd_kernels import mta_mix_bwd_col_kernel, mta_mix_bwd_row_kernel

# The fused talking-heads backward (default) or, with MTA_KERNELS_FUSED_MIX_BACKWARD=0, the
# row-chunked PyTorch one. H200, B=1, H=16, L=4096, D=128, bf16, fwd+bwd: 11.0 ms vs 42.7 ms.
FUSED_MIX_BACKWARD = os.environ.get("MTA_KERNELS_FUSED_MIX_BACKWARD", "1") == "1"

# The talking-heads backward reads q, k, v, dO this many dims at a time for its scores, so
# that the dot operands of 16 heads fit the H200's shared memory (D <= 128, as the forward).
MIX_BWD_DIM_CHUNK = 64

# Its programs take most of an SM's shared memory (one program per SM), so a grid of fewer
# than this many row (key) blocks splits each one's keys (rows) into up to MIX_BWD_MAX_SPLITS
# ranges: the H200's 132 SMs, a few programs each to balance the causal rows' lengths.
MIX_BWD_TARGET_PROGRAMS = 4 * 132
MIX_BWD_MAX_SPLITS = 8


def mix_backward_splits(programs: int, tiles: int) -> int:
    """Key (row) ranges per row (key) block of the talking-heads backward: enough for about
    MIX_BWD_TARGET_PROGRAMS programs, at most MIX_BWD_MAX_SPLITS and the number of tiles,
    and even where the caps allow. H200, B=1, H=16, causal (scripts/tune.py mixbwdsplits,
    notes/tune_mixbwdsplits_h200_43b131e.log), ms for 1..8 splits:
    L=2048, D=96: 3.46 1.90 2.37 1.96 2.17 1.98 2.12 2.05 (odd counts lose 10-25%);
    L=1024: 1.65 0.95 0.68 0.78 0.75 0.72 0.75 0.77; L=4096: 7.13 6.93 6.79 6.76 6.75 6.80 6.90 7.02."""
    n = split_count(programs, tiles, MIX_BWD_TARGET_PROGRAMS, MIX_BWD_MAX_SPLITS)
    if n > 1 and n % 2 and n + 1 <= min(MIX_BWD_MAX_SPLITS, tiles):
        n += 1
    return n


# Launch configurations of the plain-attention backward (L > 32; shorter runs use one block).
# H200, L=4096, H=16, D=128, bf16 (scripts/tune.py flashbwd): 64x64 with 4 warps for both
# 0.667 ms (SDPA's backward 0.434); 32x128/8 warps for dk/dv 0.773, 64x32 for dq 0.703.
# Masking only the tiles that cross the causal diagonal (e0cafa5, notes/flashab_h200_1958367.log)
# was no faster: backward 0.652 against 0.646 ms at L=4096, 9.05 against 9.21 at 16384; not kept.
FLASH_DKDV_CONFIG = dict(BM=64, BN=64, num_warps=4, num_stages=2)
FLASH_DQ_CONFIG = dict(BM=64, BN=64, num_warps=4, num_stages=2)


def flash_backward(grad_out, q, k, v, out, lse, causal, scale):
    """Gradients of plain attention from the forward's out and lse (B, H, L) (natural log).
    Returns (dq, dk, dv) in the inputs' dtypes; dk, dv are summed over the query heads of
    each kv head in a fixed order, so the result is deterministic."""
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    DP = max(16, _next_pow2(D))
    small = max(16, _next_pow2(L))
    dkdv_cfg = FLASH_DKDV_CONFIG if L > 32 else dict(FLASH_DKDV_CONFIG, BM=small, BN=small)
    dq_cfg = FLASH_DQ_CONFIG if L > 32 else dict(FLASH_DQ_CONFIG, BM=small, BN=small)
    prec = _precision(q)
    dev = q.device
    acc = acc_dtype(q)
    delta = torch.empty(B, H, L, device=dev, dtype=acc)
    flash_bwd_preprocess_kernel[(cdiv(L, 64), B * H)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), H, L, D, BM=64, DP=DP)
    # written in the inputs' dtypes straight from the fp32 (fp64) accumulators
    dq = torch.empty(B, H, L, D, device=dev, dtype=q.dtype)
    dk = torch.empty(B, Hkv, L, D, device=dev, dtype=k.dtype)
    dv = torch.empty(B, Hkv, L, D, device=dev, dtype=v.dtype)
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    flash_bwd_dkdv_kernel[(B * Hkv, cdiv(L, dkdv_cfg["BN"]))](
        q, k, v, grad_out, lse, delta, dk, dv, *strides, H, Hkv, L, D, scale,
        CAUSAL=causal, DP=DP, PREC=prec, **dkdv_cfg)
    flash_bwd_dq_kernel[(B * H, cdiv(L, dq_cfg["BM"]))](
        q, k, v, grad_out, lse, delta, dq, *strides, H, H // Hkv, L, D, scale,
        CAUSAL=causal, DP=DP, PREC=prec, **dq_cfg)
    return dq, dk, dv


def _unblock_mix_grad(blocks, H, ch):
    """(H // NH, NH, NH) gradient of the block-diagonal weight -> (G, ch, ch) of the mix."""
    NH = blocks.shape[1]
    if NH == ch:   # one group per block: the blocks are the groups
        return blocks
    heads = torch.arange(H, device=blocks.device).view(H // ch, ch)
    block, idx = heads // NH, heads % NH
    return blocks[block[:, :, None], idx[:, :, None], idx[:, None, :]]


def mix_backward(grad_out, q, k, v, pre_mix, post_mix, lse, causal, scale, needs=(True,) * 5):
    """Gradients of head mixing without convs from the forward's lse (B, H, L).
    Returns (dq, dk, dv, d_pre_mix, d_post_mix); None for absent weights and where
    ``needs`` (five bools in that order) is False: launches and weight-gradient partials
    nobody asked for are skipped. Deterministic: no atomics; partial sums are reduced in a
    fixed order."""
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    need_q, need_k, need_v, need_pre, need_post = (bool(n) for n in needs)
    need_pre, need_post = need_pre and pre_mix is not None, need_post and post_mix is not None
    need_rows = need_q or need_pre or need_post      # the row kernel's second launch
    NH = heads_per_program(pre_mix, post_mix)
    NHP = max(16, _next_pow2(NH))
    DP = max(16, _next_pow2(D))
    BM = BN = 16
    dev = q.device
    acc = acc_dtype(q)
    w_pre, w_post = block_mix_weights(pre_mix, post_mix, H, NH, acc, dev)
    n_blocks = H // NH
    n_rows = cdiv(L, BM)
    n_splits = mix_backward_splits(n_rows * B * n_blocks, n_rows)
    # per split: partial Delta, dq, dk, dv and weight gradients, summed below in a fixed order;
    # buffers nobody asked for are not allocated (the kernels neither write nor read them, so
    # delta stands in as their pointer)
    delta = torch.empty(n_splits, B, H, L, device=dev, dtype=acc)
    dq = torch.empty(n_splits, B, H, L, D, device=dev, dtype=acc) if need_rows else delta
    n_programs = n_splits * B * n_blocks * n_rows
    dw_pre, dw_post = (torch.zeros(n_programs, NH, NH, device=dev, dtype=acc) if need else delta
                       for need in (need_pre, need_post))
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    common = dict(CAUSAL=causal, PRE_MIX=pre_mix is not None, POST_MIX=post_mix is not None,
                  NH=NH, NHP=NHP, BM=BM, BN=BN, DP=DP, DC=min(DP, MIX_BWD_DIM_CHUNK), MIX_PREC=_precision(q), DOT_PREC=_precision(q),
                  num_warps=8, num_stages=1)
    grid = (n_rows, B * n_blocks, n_splits)
    args = (q, k, v, grad_out, lse)
    tail = (*strides, H, H // Hkv, L, D, scale, n_blocks)
    wanted = dict(GRAD_W_PRE=need_pre, GRAD_W_POST=need_post)
    if need_rows or need_k:    # Delta: for dq, dk and d_pre_mix (and read by the second launch)
        mta_mix_bwd_row_kernel[grid](*args, delta, dq, dw_pre, dw_post, w_pre, w_post, *tail, DELTA=True,
                                     **wanted, **common)
        delta = sum_splits(delta)
    if need_rows:
        mta_mix_bwd_row_kernel[grid](*args, delta, dq, dw_pre, dw_post, w_pre, w_post, *tail, DELTA=False,
                                     **wanted, **common)
    dq = sum_splits(dq).to(q.dtype) if need_q else None
    rep = H // Hkv
    dk_dv = []
    for grad_k, dtype, need in ((True, k.dtype, need_k), (False, v.dtype, need_v)):
        if not need:
            dk_dv.append(None)
            continue
        # a fresh buffer per launch: without splits or GQA, dk is a view of the first one
        dkv_heads = torch.empty(n_splits, B, H, L, D, device=dev, dtype=acc)
        mta_mix_bwd_col_kernel[(cdiv(L, BN), B * n_blocks, n_splits)](
            *args, delta, dkv_heads, w_pre, w_post, *tail, GRAD_K=grad_k, **common)
        grad = sum_splits(dkv_heads)
        if rep > 1:
            grad = grad.view(B, Hkv, rep, L, D).sum(2)
        dk_dv.append(grad.to(dtype))
    dk, dv = dk_dv

    def weight_grad(partial, w, need):
        if not need:
            return None
        blocks = partial.view(n_splits, B, n_blocks, n_rows, NH, NH).sum((0, 1, 3))
        return _unblock_mix_grad(blocks, H, w.shape[1]).to(w.dtype)

    return dq, dk, dv, weight_grad(dw_pre, pre_mix, need_pre), weight_grad(dw_post, post_mix, need_post)


"""Multi-Token Attention in plain PyTorch: the scores are materialized, index by index as in
``shared/spec/mta.md`` section 2. Slow and O(L^2) memory by design; it is the yardstick.
"""
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .validate import Problem, conv_row_halo, left_pad, validate, validate_block, validate_packed


def future_mask(L: int, device) -> torch.Tensor:
    """(L, L) bool, True where key j is after query i (j > i)."""
    idx = torch.arange(L, device=device)
    return idx[None, :] > idx[:, None]


def key_query_conv(x: torch.Tensor, w: torch.Tensor, pad_key: str) -> torch.Tensor:
    """Depthwise cross-correlation over (query, key) of scores.

    x: (B, H, L, L); w: (H, cq, ck). Returns out[b,h,i,j] = sum_{a,t} w[h,a,t] *
    x[b, h, i+a-(cq-1), j+t-pL], with out-of-range entries read as zero.
    """
    H, cq, ck = w.shape
    pL = left_pad(ck, pad_key)
    padded = F.pad(x, (pL, ck - 1 - pL, cq - 1, 0))
    if x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16):
        # CPU half-precision conv2d is extremely slow; accumulate in fp32 and round the
        # result, as the GPU's half-precision convolution does.
        return F.conv2d(padded.float(), w[:, None].float(), groups=H).to(x.dtype)
    return F.conv2d(padded, w[:, None].to(x.dtype), groups=H)


def mix_heads(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Head mixing within contiguous groups, nn.Linear convention.

    x: (B, H, L, L); w: (G, ch, ch) as W[g, out, in]. Returns (B, H, L, L) with
    out[b, g*ch+o] = sum_c w[g, o, c] * x[b, g*ch+c].
    """
    B, H, Lq, Lk = x.shape
    G, ch, _ = w.shape
    y = torch.einsum("goc,bgcij->bgoij", w.to(x.dtype), x.reshape(B, G, ch, Lq, Lk))
    return y.reshape(B, H, Lq, Lk)


class Intermediates(NamedTuple):
    """Every materialized tensor of the forward, (B, H, R, K) for the R = hi - lo query rows
    and K = key_end keys computed (all L unless a row range or key end was asked for), in
    compute dtype."""

    problem: Problem
    q: torch.Tensor        # (B, H, R, D): the computed rows of q
    k: torch.Tensor        # (B, H, K, D): kv heads repeated for GQA
    v: torch.Tensor        # (B, H, K, D)
    future: torch.Tensor   # (R, K) bool; all False when not causal
    s0: torch.Tensor       # scaled scores, zeroed on the future when pre_conv is given
    c: torch.Tensor        # after the pre-softmax conv (s0 without it)
    m: torch.Tensor        # after the pre-softmax mixing (c without it)
    probs: torch.Tensor    # softmax of m masked with -inf on the future
    a1: torch.Tensor       # after the post-softmax conv, zeroed on the future (probs without it)
    a: torch.Tensor        # after the post-softmax mixing (a1 without it)


def forward_intermediates(q, k, v, pre_conv=None, pre_mix=None, post_conv=None, post_mix=None, *,
                          causal=True, pad_key="both", scale=None, compute_dtype=torch.float32,
                          row_range=None, key_end=None, conv=None, mix=None) -> Intermediates:
    """The forward of docs/spec.md section 2, step by step; see ``mta_attention`` for the arguments.

    row_range=(lo, hi) computes only query rows lo..hi-1 of every tensor. The convs then
    read zeros above row lo, so a result row i is exact only from lo + (cq-1) (pre conv) or
    lo + (cq-1) + (cq'-1) (post conv) on, unless lo = 0: callers ask for that halo.
    key_end computes only key columns 0..key_end-1 (the convs read zeros right of them):
    exact when causal and key_end >= hi, since every later column is in the rows' future.
    conv, mix: other implementations of ``key_query_conv`` and ``mix_heads`` (same
    signatures) to use instead."""
    conv = conv or key_query_conv
    mix = mix or mix_heads
    p = validate(q, k, v, pre_conv, pre_mix, post_conv, post_mix, causal, pad_key, scale)
    lo, hi = row_range or (0, p.L)
    key_end = p.L if key_end is None else key_end
    cd = compute_dtype
    rep = p.H // p.Hkv
    qc = q[:, :, lo:hi].to(cd)
    kc, vc = k[:, :, :key_end].to(cd), v[:, :, :key_end].to(cd)
    if rep > 1:
        kc, vc = kc.repeat_interleave(rep, dim=1), vc.repeat_interleave(rep, dim=1)
    rows = torch.arange(lo, hi, device=q.device)
    future = rows[:, None] < torch.arange(key_end, device=q.device)[None, :]
    if not causal:
        future = torch.zeros_like(future)

    s0 = torch.matmul(qc, kc.transpose(-1, -2))
    if p.scale != 1.0:
        s0 = s0 * p.scale
    if pre_conv is not None:
        s0 = s0.masked_fill(future, 0.0)
    c = conv(s0, pre_conv, pad_key) if pre_conv is not None else s0
    m = mix(c, pre_mix) if pre_mix is not None else c
    softmax_dtype = torch.float64 if cd == torch.float64 else torch.float32
    probs = torch.softmax(m.masked_fill(future, float("-inf")).to(softmax_dtype), dim=-1).to(cd)
    a1 = probs
    if post_conv is not None:
        a1 = conv(probs, post_conv, pad_key).masked_fill(future, 0.0)
    a = mix(a1, post_mix) if post_mix is not None else a1
    return Intermediates(p, qc, kc, vc, future, s0, c, m, probs, a1, a)


def mta_attention(q, k, v, pre_conv=None, pre_mix=None, post_conv=None, post_mix=None, *,
                  causal: bool = True, pad_key: str = "both", scale: Optional[float] = None,
                  compute_dtype: torch.dtype = torch.float32, q_prev: Optional[torch.Tensor] = None,
                  seqlens: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None,
                  max_seqlen: Optional[int] = None) -> torch.Tensor:
    """Reference Multi-Token Attention.

    q: (B, H, L, D); k, v: (B, Hkv, L, D) with H % Hkv == 0.
    pre_conv, post_conv: (H, cq, ck) or None. pre_mix, post_mix: (G, ch, ch) or None, H = G*ch.
    Every intermediate is held in ``compute_dtype`` (fp32 by default; fp64 for gradchecks;
    the input dtype to play the low-precision baseline). The softmax runs in fp32, or
    fp64 when compute_dtype is fp64. Returns (B, H, L, D) in q's dtype.

    A query block at the end of the sequence (docs/spec.md, section 8): q (B, H, Lq, D) with
    Lq <= Lk for k, v (B, Hkv, Lk, D); row r is position Lk - Lq + r. q_prev (B, H, P, D)
    holds the queries just before the block (its last row is position Lk - Lq - 1); it is
    required, P >= ``conv_row_halo(pre_conv, post_conv)``, when that halo is not 0 and
    Lq < Lk. Rows at negative positions do not exist and are never read. seqlens (B,)
    int32/int64: sequence b has keys 0 .. seqlens[b]-1 (later keys are never read) and its
    block ends at its last key. Returns (B, H, Lq, D).

    Packed documents (docs/spec.md, section 9): cu_seqlens (N+1,) int32/int64 offsets [0, ..., T] of
    N non-empty documents in q (1, H, T, D), k, v (1, Hkv, T, D); each document is an
    independent sequence. max_seqlen, if given, must be >= every document's length.
    Returns (1, H, T, D).
    """
    weights = (pre_conv, pre_mix, post_conv, post_mix)
    opts = dict(causal=causal, pad_key=pad_key, scale=scale, compute_dtype=compute_dtype)
    validate(q, k, v, *weights, causal, pad_key, scale, block=True)
    if cu_seqlens is not None or max_seqlen is not None:
        docs = validate_packed(q, k, cu_seqlens, max_seqlen, q_prev, seqlens)
        return torch.cat([_dense(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], weights, opts) for s, e in docs], dim=2)
    lens = validate_block(q, k, pre_conv, post_conv, q_prev, seqlens)
    if q_prev is None and lens is None and q.shape[2] == k.shape[2]:
        return _dense(q, k, v, weights, opts)
    halo = conv_row_halo(pre_conv, post_conv)
    if lens is None:
        return _block(q, k, v, q_prev, halo, weights, opts)
    return torch.cat([_block(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n],
                             None if q_prev is None else q_prev[b:b + 1], halo, weights, opts)
                      for b, n in enumerate(lens)], dim=0)


def _dense(q, k, v, weights, opts):
    """Spec section 2 on a whole sequence: q (B, H, L, D), k, v (B, Hkv, L, D) -> (B, H, L, D)."""
    t = forward_intermediates(q, k, v, *weights, **opts)
    return torch.matmul(t.a, t.v).to(q.dtype)


def _block(q, k, v, q_prev, halo, weights, opts):
    """The last Lq rows of a sequence of Lk positions: q (B, H, Lq, D), k, v (B, Hkv, Lk, D),
    q_prev (B, H, P >= min(halo, Lk - Lq), D) or None -> (B, H, Lq, D).

    The block's outputs read the convs' rows from lo = start - halo on (section 8), so the
    forward runs on rows lo .. Lk-1 only: row_range leaves them exact from lo + halo on.
    """
    B, H, Lq, D = q.shape
    start = k.shape[2] - Lq
    lo = max(0, start - halo)
    rows = [q]
    if start > lo:
        rows.insert(0, q_prev[:, :, q_prev.shape[2] - (start - lo):])
    if lo > 0:
        rows.insert(0, q.new_zeros(B, H, lo, D))  # placeholders for positions 0 .. lo-1, never read
    t = forward_intermediates(torch.cat(rows, dim=2), k, v, *weights, row_range=(lo, k.shape[2]), **opts)
    return torch.matmul(t.a[:, :, -Lq:], t.v).to(q.dtype)

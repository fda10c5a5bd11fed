"""Exact MTA backward in PyTorch, one block of query rows at a time: O(rows x L) memory.

The stop-gap backward for calls with convolutions until fused kernels exist. It follows
``mta_reference.mta_attention_backward`` (spec section 3) but materializes only a slab of
rows [lo, hi) of every (B, H, L, L) tensor. For the output rows [r0, r1) of a chunk:

  - the convs read rows above (pre: cq-1, post: cq'-1), so the forward intermediates are
    valid from lo + HQ + HP on, with lo = r0 - HQ - HP;
  - the transposed convs read rows below, so the backward ones are valid up to
    hi - HP - HQ, with hi = r1 + HQ + HP;
  - Delta = rowsum(P * dP) needs whole rows, which every slab has.

The convs and their gradients on the slabs are the Triton tensor-core kernels of
conv_kernels.py (PyTorch's depthwise conv kernels were 80% of this backward's time on the
H200), the head mixes batched matmuls, and for 16-bit inputs the matmuls run in TF32. Each
chunk adds its rows' share to dq, dk, dv and the weight gradients, so the sums run over the
chunks in a fixed order, and nothing uses atomics: the result is deterministic.
"""
import contextlib
import functools
import os
from typing import NamedTuple, Optional

import torch

from .forward import _precision
from .slab_conv import CONV_CONFIG, key_query_conv, key_query_conv_input_grad, key_query_conv_weight_grad


def _chunk_bytes_from_env(default=1 << 30):
    """MTA_KERNELS_CHUNK_BYTES as a positive int (bytes), or ``default`` when unset."""
    text = os.environ.get("MTA_KERNELS_CHUNK_BYTES", "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"MTA_KERNELS_CHUNK_BYTES must be a positive number of bytes, got {text!r}")
    return value


# Working set per chunk: about this many bytes of (B, H, rows, L) tensors (1 GiB unless
# MTA_KERNELS_CHUNK_BYTES says otherwise: more memory, fewer and taller chunks; at L=4096 the
# full-MTA backward took 33.6 / 30.0 / 28.0 ms on the H200 with 1 / 2 / 4 GiB).
CHUNK_BYTES = _chunk_bytes_from_env()
LIVE_TENSORS = 14

# Run the fp32 matmuls of this backward (QK^T, dO V^T, dS K, dS^T Q, A^T dO, the head mixes)
# on TF32 tensor cores when q, k, v are 16-bit: their products are exact in TF32 (8-bit
# mantissas fit its 10), while A and dS are rounded to ~1e-3 relative, well inside the
# spec's 2x-the-bf16-reference rule. MTA_KERNELS_CHUNKED_TF32=0 keeps full fp32.
TF32_MATMULS = os.environ.get("MTA_KERNELS_CHUNKED_TF32", "1") == "1"


@contextlib.contextmanager
def _matmul_precision(q):
    """TF32 for CUDA fp32 matmuls inside the block when TF32_MATMULS and q is 16-bit."""
    use = TF32_MATMULS and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    matmul = torch.backends.cuda.matmul
    old = matmul.fp32_precision
    if use:
        matmul.fp32_precision = "tf32"
    try:
        yield
    finally:
        matmul.fp32_precision = old


def mix_slab(x, w):
    """``mta_reference.mix_heads`` as one batched matmul over (batch, group): x (B, H, R, L),
    w (G, ch, ch). The reference's einsum copies x into another layout when B > 1, and in
    the H200 profiles its products ran on SIMT sgemm kernels."""
    B, H, R, L = x.shape
    G, ch, _ = w.shape
    return torch.matmul(w.to(x.dtype), x.reshape(B, G, ch, R * L)).view(B, H, R, L)


def mix_slab_weight_grad(grad, x, groups):
    """Gradient of ``mix_slab(x, w)`` with respect to w (G, ch, ch) for G = ``groups``, summed
    over the batch: grad, x (B, H, R, L). (The gradient for x is ``mix_slab(grad, w^T)``.)"""
    B, H, R, L = x.shape
    ch = H // groups
    g = grad.reshape(B, groups, ch, R * L)
    return torch.matmul(g, x.reshape(B, groups, ch, R * L).transpose(-1, -2)).sum(0)


# A slab (a chunk's rows and its halos) is never shorter than one row tile of the slab conv
# kernels: below that, long sequences (18-row chunks at H=16, L=65536 in the budget) spent most
# of each chunk on halo rows and on tiles left mostly empty.
MIN_SLAB_ROWS = CONV_CONFIG["BR"]


def rows_per_chunk(H, L, itemsize, halo, budget=CHUNK_BYTES, live=LIVE_TENSORS):
    """Rows per chunk: ``live`` slabs of (1, H, rows, L) in ``budget`` bytes (the ``halo``
    rows, above and below together, come on top), but at least MIN_SLAB_ROWS - halo, so the
    working set outgrows the budget only where the budget would leave less than one full conv
    tile (beyond L of about 16384 at H=16 with the paper's convs)."""
    return max(16, MIN_SLAB_ROWS - halo, budget // (live * H * L * itemsize))


def conv_halos(pre_conv, post_conv):
    """(HQ, HP): the rows above (or below, transposed) that the pre and post convs reach."""
    return tuple(w.shape[1] - 1 if w is not None else 0 for w in (pre_conv, post_conv))


def slab_inputs(q, k, v, scale, compute_dtype):
    """q times the softmax scale (so that no slab is scaled), k and v, in compute_dtype with the
    kv heads repeated to q's heads: made once per batch element, read by every chunk."""
    rep = q.shape[1] // k.shape[1]
    qc, kc, vc = q.to(compute_dtype) * scale, k.to(compute_dtype), v.to(compute_dtype)
    if rep > 1:
        kc, vc = kc.repeat_interleave(rep, dim=1), vc.repeat_interleave(rep, dim=1)
    return qc, kc, vc


class SlabForward(NamedTuple):
    """The forward on rows [lo, hi) of one batch element, as (1, H, hi - lo, K) slabs for the
    K keys computed; with keep=False only ``a`` and ``lse`` (the others None), with keep
    all but ``lse``."""

    s0: Optional[torch.Tensor]      # scaled scores, zero on the future when a pre conv follows
    c: Optional[torch.Tensor]       # after the pre-softmax conv (s0 without it)
    probs: Optional[torch.Tensor]   # softmax of the pre-mixed logits, zero on the future
    a1: Optional[torch.Tensor]      # after the post-softmax conv, zero on the future (probs without it)
    a: torch.Tensor                 # after the post-softmax mixing (a1 without it)
    lse: Optional[torch.Tensor]     # (1, H, hi - lo): log-sum-exp of the masked pre-softmax logits


def _softmax_in_place(x):
    """(softmax of x over its last dim, written over x; the log-sum-exp of each row)."""
    row_max = x.amax(-1, keepdim=True)
    x.sub_(row_max).exp_()
    row_sum = x.sum(-1, keepdim=True)
    return x.div_(row_sum), (row_max + torch.log(row_sum)).squeeze(-1)


def slab_forward(qc, kc, vc, weights, lo, hi, *, causal, pad_key, precision, keep) -> SlabForward:
    """mta_reference.forward_intermediates on rows [lo, hi) of slab_inputs' tensors (one batch
    element) and keys [0, hi) when causal (every later key is in the rows' future), else all,
    with the slab conv kernels and batched-matmul mixes. Rows above lo read as zero, so rows
    from lo + the convs' row halos on are exact. Leaner than the reference: the conv kernels
    read the causal future as zero and zero it in the post conv's output (no masking pass
    but the one on s0 that the pre conv's weight gradient needs, with keep), and the
    forward's softmax runs in place. keep=False drops each intermediate once the next is made and
    returns the log-sum-exp (what the forward needs); the backward keeps them all."""
    pre_conv, pre_mix, post_conv, post_mix = weights
    keys = hi if causal else kc.shape[2]
    conv = functools.partial(key_query_conv, pad_key=pad_key, zero_above=lo if causal else None,
                             precision=precision)
    rows, cols = torch.arange(lo, hi, device=qc.device), torch.arange(keys, device=qc.device)
    future = rows[:, None] < cols if causal else None
    s0 = torch.matmul(qc[:, :, lo:hi], kc[:, :, :keys].transpose(-1, -2))
    if keep and causal and pre_conv is not None:
        s0.masked_fill_(future, 0.0)     # the conv weight gradient kernel reads it unmasked
    c = conv(s0, pre_conv) if pre_conv is not None else s0
    s0 = s0 if keep else None
    m = mix_slab(c, pre_mix) if pre_mix is not None else c
    c = c if keep else None
    # in place: m is a new tensor, or c (or s0) when no mix (or conv) follows them, and the
    # backward reads c (s0) only for the mix's (conv's) weight gradient
    if causal:
        m.masked_fill_(future, float("-inf"))
    # the backward needs no lse: one fused softmax kernel; the forward: fewer live slabs
    probs, lse = (torch.softmax(m, dim=-1), None) if keep else _softmax_in_place(m)
    del m
    a1 = conv(probs, post_conv, mask_output=True) if post_conv is not None else probs
    probs = probs if keep else None
    a = mix_slab(a1, post_mix) if post_mix is not None else a1
    a1 = a1 if keep else None
    return SlabForward(s0, c, probs, a1, a, lse)


def chunked_backward(grad_out, q, k, v, pre_conv, pre_mix, post_conv, post_mix, *, causal, pad_key,
                     scale, compute_dtype=torch.float32, rows=None, needs=(True,) * 7):
    """Gradients (dq, dk, dv, d_pre_conv, d_pre_mix, d_post_conv, d_post_mix) of MTA, each in its
    input's dtype (None for absent weights and where ``needs``, seven bools in that order, is
    False: no work is spent on those, e.g. no weight-gradient kernels for frozen weights).
    Shapes as ``mta_reference.mta_attention``; ``rows`` overrides the chunk height (for tests).

    The batch elements go one after another, each in chunks as tall as the budget allows for
    one element: sharing the budget across the batch made the chunks B times shorter (73 rows
    at B=8, L=2048), so the halo rows every chunk recomputes and the per-chunk launches grew
    with B. The weight gradients are summed over the elements in order (deterministic)."""
    B, H, L, D = q.shape
    cd = compute_dtype
    halo = 2 * sum(conv_halos(pre_conv, post_conv))   # above and below
    R = rows or rows_per_chunk(H, L, torch.finfo(cd).bits // 8, halo)
    weights = (pre_conv, pre_mix, post_conv, post_mix)
    needs = [bool(n) and x is not None for n, x in zip(needs, (q, k, v, *weights))]
    # B > 1: each element's dq, dk, dv go into these; B = 1: its own are the result (no copy)
    dqkv = [torch.empty(x.shape, device=x.device, dtype=x.dtype) if need and B > 1 else None
            for x, need in zip((q, k, v), needs)]
    dw = [torch.zeros(w.shape, device=q.device, dtype=cd) if need else None
          for w, need in zip(weights, needs[3:])]
    with _matmul_precision(q):
        for b in range(B):
            one = slice(b, b + 1)
            grads = _chunked_backward(grad_out[one], q[one], k[one], v[one], *weights, causal=causal,
                                      pad_key=pad_key, scale=scale, compute_dtype=cd, rows=R, needs=needs)
            if B == 1:
                dqkv = list(grads[:3])
            else:
                for total, g in zip(dqkv, grads[:3]):
                    if total is not None:
                        total[one] = g
            for total, g in zip(dw, grads[3:]):
                if total is not None:
                    total += g
    return (*dqkv, *[None if g is None else g.to(w.dtype) for g, w in zip(dw, weights)])


def _chunked_backward(grad_out, q, k, v, pre_conv, pre_mix, post_conv, post_mix, *, causal, pad_key,
                      scale, compute_dtype, rows, needs):
    """chunked_backward for one batch element (B = 1) in chunks of ``rows`` rows: dq, dk, dv in
    the inputs' dtypes, the weight gradients in compute_dtype; None where ``needs`` (seven
    bools, False for absent weights) is False. Each step of the chain back from dO runs only
    if a wanted gradient lies further along it."""
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    cd = compute_dtype
    rep = H // Hkv
    dout = grad_out.to(cd)
    qc, kc, vc = slab_inputs(q, k, v, scale, cd)
    HQ, HP = conv_halos(pre_conv, post_conv)

    need_q, need_k, need_v, *need_w = needs
    dq, dk, dv = (torch.zeros(B, H, L, D, device=q.device, dtype=cd) if need else None
                  for need in (need_q, need_k, need_v))
    dw = [torch.zeros(w.shape, device=q.device, dtype=cd) if need else None
          for w, need in zip((pre_conv, pre_mix, post_conv, post_mix), need_w)]
    # how far back from dO the chain must go: dA -> (post mix) -> dP -> dZ -> (pre mix) -> dC -> dS
    need_ds = need_q or need_k
    need_dc = need_ds or need_w[0]
    need_dz = need_dc or need_w[1]
    need_da = need_dz or need_w[2] or need_w[3]

    prec = _precision(q)
    for r0 in range(0, L, rows):
        r1 = min(L, r0 + rows)
        lo, hi = max(0, r0 - HQ - HP), min(L, r1 + HQ + HP)
        # causal: every conv input and gradient of the slab is zero in the future (j > lo + i);
        # the conv kernels read them so (no masking pass) and skip the tiles there
        zero_above = lo if causal else None
        # causal: keys from hi on are in the future of every row of the slab, zero in every
        # slab tensor, so the slab stops there (about half the work over all chunks)
        ke = hi if causal else L
        slab = dict(zero_above=zero_above, precision=prec)
        s0, c, probs, a1, a, _ = slab_forward(qc, kc, vc, (pre_conv, pre_mix, post_conv, post_mix), lo, hi,
                                              causal=causal, pad_key=pad_key, precision=prec, keep=True)
        mine = slice(r0 - lo, r1 - lo)     # this chunk's rows of the slab

        # backward on the slab: rows [lo, hi), keys [0, ke)
        do_slab = dout[:, :, lo:hi]
        if need_v:
            dv[:, :, :ke] += torch.matmul(a[:, :, mine].transpose(-1, -2), do_slab[:, :, mine])
        if not need_da:
            continue
        da = torch.matmul(do_slab, vc[:, :, :ke].transpose(-1, -2))
        if post_mix is not None:
            if need_w[3]:
                dw[3] += mix_slab_weight_grad(da[:, :, mine], a1[:, :, mine], post_mix.shape[0])
            da = mix_slab(da, post_mix.transpose(-1, -2))
        if need_w[2]:
            dw[2] += key_query_conv_weight_grad(da, probs, post_conv, pad_key, rows=(mine.start, mine.stop), **slab)
        if not need_dz:
            continue
        dp = da
        if post_conv is not None:
            dp = key_query_conv_input_grad(da, post_conv, pad_key, mask_output=True, **slab)
        # dz = P * (dP - Delta) with Delta = rowsum(P * dP): softmax's backward, one fused kernel
        dz = torch._softmax_backward_data(dp, probs, -1, probs.dtype)
        dc = dz
        if pre_mix is not None:
            if need_w[1]:
                dw[1] += mix_slab_weight_grad(dz[:, :, mine], c[:, :, mine], pre_mix.shape[0])
            if need_dc:
                dc = mix_slab(dz, pre_mix.transpose(-1, -2))
        if need_w[0]:
            dw[0] += key_query_conv_weight_grad(dc, s0, pre_conv, pad_key, rows=(mine.start, mine.stop), **slab)
        if not need_ds:
            continue
        ds = dc
        if pre_conv is not None:
            ds = key_query_conv_input_grad(dc, pre_conv, pad_key, mask_output=True, **slab)
        ds = ds[:, :, mine]
        if need_q:
            dq[:, :, r0:r1] = torch.matmul(ds, kc[:, :, :ke]) * scale
        if need_k:
            dk[:, :, :ke] += torch.matmul(ds.transpose(-1, -2), qc[:, :, r0:r1])   # qc is scale * q

    if dk is not None:
        dk = dk.view(B, Hkv, rep, L, D).sum(2)
    if dv is not None:
        dv = dv.view(B, Hkv, rep, L, D).sum(2)
    return (*[None if g is None else g.to(x.dtype) for g, x in zip((dq, dk, dv), (q, k, v))], *dw)

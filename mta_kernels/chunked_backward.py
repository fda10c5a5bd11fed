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
H200), each head mix's backward with its weight gradient one kernel of slab_mix_backward.py
(the pre mix's with the softmax's backward), the forward recomputation's pre conv for 16-bit
inputs one matmul (pre_conv_matmul.py, as in the chunked forward), and for 16-bit inputs the
matmuls run in TF32. Each chunk adds its rows' share to dq, dk, dv and the weight gradients,
so the sums run over the chunks in a fixed order, and nothing uses atomics: the result is
deterministic.
"""
import torch

from .forward import _precision
from .slab_conv import ConvWeightGradSums, key_query_conv_input_grad, key_query_conv_weight_grad
from .slab_mix_backward import mix_backward_rows
from .chunked_forward import slab_dtype, slab_weights_and_scale
from .slabs import (_matmul_precision, chunk_starts, conv_halos, live_slabs, matmul_into, mix_precision,
                    pre_conv_operands, rows_per_chunk, slab_forward, slab_inputs)

# (1, H, rows, L) slabs alive at once in a chunk (the chunk height's divisor): the chain frees
# each slab after its last use, so at most five (the forward's s0, c, probs, a1, a; then
# fewer), and one for slack. Measured on the CPU with the conv kernels stubbed by their output
# allocations (tests/test_backward.py): 5.0-5.3 slabs at the peak; 14-15 before the frees.
LIVE_TENSORS = 6
# Without convs (talking heads, one mix) at most three: the scores (kept as c for the pre mix's
# weight gradient), probs and a, then probs, c and dA, each mix's adjoint in place; one more for
# slack. Taller chunks, fewer launches: talking heads at L=4096 on the H200 (bf16, B=1, H=16,
# D=128; 1 and 1.5 GiB budgets at 6 slabs, i.e. 7 and 4 chunks, two rounds at cb11dd1,
# notes/thchunks_h200_cb11dd1.log) took 9.50 / 6.52 ms fwd+bwd in 7 chunks, 6.76 / 5.83 in 4.
LIVE_TENSORS_WITHOUT_CONVS = 4

# The forward recomputation's pre conv as one matmul where the chunked forward makes it so
# (slabs.pre_conv_operands; exact too). On the H200 (bf16, L=4096, paper weights, on and off
# alternating in one call at 895f0ca): backward 14.89 / 14.89 ms against 15.42 / 15.44 without,
# fwd+bwd 18.90 / 18.94 against 19.48 / 19.38. (A first A/B at ed2937c gave 17.58 ms with a
# [16.81, 18.39] spread: the first tree timed in that call, an outlier.)
PRE_CONV_MATMUL_IN_BACKWARD = True


def chunked_backward(grad_out, q, k, v, pre_conv, pre_mix, post_conv, post_mix, *, causal, pad_key,
                     scale, compute_dtype=torch.float32, rows=None, needs=(True,) * 7, slabs_dtype=None):
    """Gradients (dq, dk, dv, d_pre_conv, d_pre_mix, d_post_conv, d_post_mix) of MTA, each in its
    input's dtype (None for absent weights and where ``needs``, seven bools in that order, is
    False: no work is spent on those, e.g. no weight-gradient kernels for frozen weights).
    Shapes as ``mta_reference.mta_attention``; ``rows`` overrides the chunk height (for tests),
    ``slabs_dtype`` the slabs' dtype (chunked_forward.slab_dtype by default: bf16 for bf16
    inputs on CUDA, the matmuls into dq, dk, dv then on bf16 operands with fp32 results).

    The batch elements go one after another, each in chunks as tall as the budget allows for
    one element: sharing the budget across the batch made the chunks B times shorter (73 rows
    at B=8, L=2048), so the halo rows every chunk recomputes and the per-chunk launches grew
    with B. The weight gradients are summed over the elements in order (deterministic)."""
    B, H, L, D = q.shape
    cd = compute_dtype
    halo = 2 * sum(conv_halos(pre_conv, post_conv))   # above and below
    live = live_slabs(pre_conv, post_conv, LIVE_TENSORS, LIVE_TENSORS_WITHOUT_CONVS)
    weights = (pre_conv, pre_mix, post_conv, post_mix)
    needs = [bool(n) and x is not None for n, x in zip(needs, (q, k, v, *weights))]
    # B > 1: each element's dq, dk, dv go into these; B = 1: its own are the result (no copy)
    dqkv = [torch.empty(x.shape, device=x.device, dtype=x.dtype) if need and B > 1 else None
            for x, need in zip((q, k, v), needs)]
    dw = [torch.zeros(w.shape, device=q.device, dtype=cd) if need else None
          for w, need in zip(weights, needs[3:])]
    # (the CPU keeps fp32 slabs: there the interpreter's bf16 tl.dot is wrong)
    sd = slabs_dtype or (slab_dtype(q, *weights, cd) if q.is_cuda else cd)
    weights_sd, q_scale, scaled = slab_weights_and_scale(weights, q, scale, sd, cd)
    # the slabs' own bytes: full MTA at L=4096 on the H200 with bf16 slabs (notes/chunkbytes_h200_fa50c59.log,
    # two rounds) took bwd 9.76 / 9.75 ms in 4 chunks against 11.3 / 13.5 in 7 (counted as fp32)
    R = rows or rows_per_chunk(H, L, sd.itemsize, halo, live=live)
    with _matmul_precision(q):
        for b in range(B):
            one = slice(b, b + 1)
            grads = _chunked_backward(grad_out[one], q[one], k[one], v[one], *weights_sd, causal=causal,
                                      pad_key=pad_key, scale=q_scale, compute_dtype=cd, slabs_dtype=sd, rows=R,
                                      needs=needs)
            if B == 1:
                dqkv = list(grads[:3])
            else:
                for total, g in zip(dqkv, grads[:3]):
                    if total is not None:
                        total[one] = g
            for total, g in zip(dw, grads[3:]):
                if total is not None:
                    total += g
    if scaled is not None and dw[scaled] is not None:
        dw[scaled] *= scale     # that weight's slab copy took the scale
    return (*dqkv, *[None if g is None else g.to(w.dtype) for g, w in zip(dw, weights)])


def _chunked_backward(grad_out, q, k, v, pre_conv, pre_mix, post_conv, post_mix, *, causal, pad_key,
                      scale, compute_dtype, slabs_dtype, rows, needs):
    """chunked_backward for one batch element (B = 1) in chunks of ``rows`` rows, with slabs of
    ``slabs_dtype`` and q scaled by ``scale`` (slab_weights_and_scale's): dq, dk, dv in the
    inputs' dtypes, the weight gradients in compute_dtype; None where ``needs`` (seven bools,
    False for absent weights) is False. Each step of the chain back from dO runs only if a
    wanted gradient lies further along it."""
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    cd = compute_dtype
    rep = H // Hkv
    dout = grad_out.to(slabs_dtype)
    qc, kc, vc = slab_inputs(q, k, v, scale, slabs_dtype)
    HQ, HP = conv_halos(pre_conv, post_conv)

    need_q, need_k, need_v, *need_w = needs
    # (every chunk writes its rows of dq; dk and dv take sums, from the first chunk run, the last
    # rows', whose slab holds every key: slabs.slab_keys)
    dq, dk, dv = (torch.empty(B, H, L, D, device=q.device, dtype=cd) if need else None
                  for need in (need_q, need_k, need_v))
    # each conv's weight gradient as partial sums that every chunk's kernel writes into its own
    # slice of one buffer (ConvWeightGradSums); each mix's as one buffer of per-row shares
    # (mix_backward_rows' dw_rows) that every chunk fills with its rows; each summed once
    starts = list(chunk_starts(L, rows))
    conv_sums = [ConvWeightGradSums(w, B * H, min(L, rows + 2 * (HQ + HP)), L, pad_key, len(starts), q.device, cd)
                 if need else None for w, need in ((pre_conv, need_w[0]), (post_conv, need_w[2]))]
    dw = [None] * 4
    mix_dw_rows = [torch.empty(B, w.shape[0], L, *w.shape[1:], device=q.device, dtype=cd) if need else None
                   for w, need in zip((pre_mix, post_mix), (need_w[1], need_w[3]))]
    # how far back from dO the chain must go: dA -> (post mix) -> dP -> dZ -> (pre mix) -> dC -> dS
    need_ds = need_q or need_k
    need_dc = need_ds or need_w[0]
    need_dz = need_dc or need_w[1]
    need_da = need_dz or need_w[2] or need_w[3]

    prec = _precision(q)
    operands = pre_conv_operands(q, k, pre_conv, pad_key, scale) if PRE_CONV_MATMUL_IN_BACKWARD else None
    for r0 in starts:
        # the last chunk's slabs go before this one's are made (the chain below frees each
        # slab after its last use; those left by a `continue` go here), so that at most
        # live_slabs() slabs are alive at once
        s0 = c = probs = a1 = a = da = dp = dz = dc = ds = None
        r1 = min(L, r0 + rows)
        lo, hi = max(0, r0 - HQ - HP), min(L, r1 + HQ + HP)
        # causal: every conv input and gradient of the slab counts as zero in the future
        # (j > lo + i); the conv kernels read them so (no masking pass) and skip the tiles there
        zero_above = lo if causal else None
        slab = dict(zero_above=zero_above, precision=prec)
        mix = dict(zero_above=zero_above, precision=mix_precision(prec))
        s0, c, probs, a1, a, _ = slab_forward(qc, kc, (pre_conv, pre_mix, post_conv, post_mix), lo, hi,
                                              causal=causal, pad_key=pad_key, precision=prec, keep=True,
                                              pre_conv_operands=operands)
        # causal: keys from hi on are in the future of every row of the slab, zero in every
        # slab tensor, so the slab stops there (about half the work over all chunks; rounded up
        # to a multiple of 16 keys, slabs.slab_keys)
        ke = a.shape[-1]
        mine = slice(r0 - lo, r1 - lo)     # this chunk's rows of the slab

        # backward on the slab: rows [lo, hi), keys [0, ke)
        do_slab = dout[:, :, lo:hi]
        summed = r0 != starts[0]          # dk and dv hold a chunk's products already
        # (B = 1 here: dv, dk and dq take their rows' products in place, as 3-d batched matmuls)
        if need_v:
            matmul_into(dv[0, :, :ke], a[0, :, mine].transpose(-1, -2), do_slab[0, :, mine], accumulate=summed)
        a = None
        if not need_da:
            continue
        da = torch.matmul(do_slab, vc[:, :, :ke].transpose(-1, -2))
        if post_mix is not None:
            # the post mix's adjoint (in place) and weight gradient in one kernel; da counts as
            # zero in the causal future, where a1 is zero and what follows reads it as zero
            da, _ = mix_backward_rows(da, post_mix, x=a1 if need_w[3] else None, rows=(mine.start, mine.stop),
                                      out=da, dw_rows=(mix_dw_rows[1], lo), **mix)
        a1 = None
        if need_w[2]:
            key_query_conv_weight_grad(da, probs, post_conv, pad_key, rows=(mine.start, mine.stop),
                                       partial=conv_sums[1].next_slice(), **slab)
        if not need_dz:
            continue
        dp = da
        if post_conv is not None:
            dp = key_query_conv_input_grad(da, post_conv, pad_key, mask_output=True, **slab)
        da = None
        # dz = P * (dP - Delta) with Delta = rowsum(P * dP): softmax's backward; with a pre mix
        # in one kernel with the mix's adjoint (in place) and weight gradient
        if pre_mix is not None:
            dc, _ = mix_backward_rows(dp, pre_mix, x=c if need_w[1] else None, probs=probs,
                                      rows=(mine.start, mine.stop), out=dp, dw_rows=(mix_dw_rows[0], lo), **mix)
        else:
            dc = torch._softmax_backward_data(dp, probs, -1, probs.dtype)
        dp = probs = c = None
        if need_w[0]:
            key_query_conv_weight_grad(dc, s0, pre_conv, pad_key, rows=(mine.start, mine.stop),
                                       partial=conv_sums[0].next_slice(), **slab)
        s0 = None
        if not need_ds:
            continue
        ds = dc
        if pre_conv is not None:
            ds = key_query_conv_input_grad(dc, pre_conv, pad_key, mask_output=True, **slab)
        dc = None
        ds = ds[:, :, mine]
        if need_q:
            matmul_into(dq[0, :, r0:r1], ds[0], kc[0, :, :ke], accumulate=False)     # times scale below
        if need_k:
            matmul_into(dk[0, :, :ke], ds[0].transpose(-1, -2), qc[0, :, r0:r1], accumulate=summed)  # qc: scale * q

    for i, sums in ((0, conv_sums[0]), (2, conv_sums[1])):
        if sums is not None:
            dw[i] = sums.result()
    for i, rows_dw in ((1, mix_dw_rows[0]), (3, mix_dw_rows[1])):
        if rows_dw is not None:
            dw[i] = rows_dw.sum((0, 2))
    if dq is not None and scale != 1:
        dq *= scale
    if rep > 1:
        dk, dv = (None if x is None else x.view(B, Hkv, rep, L, D).sum(2) for x in (dk, dv))
    return (*[None if g is None else g.to(x.dtype) for g, x in zip((dq, dk, dv), (q, k, v))], *dw)

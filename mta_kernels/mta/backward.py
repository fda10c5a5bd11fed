"""The row-chunked MTA backward for calls with a conv or a head mix (mta_chunked_bwd).

It follows ``mta_reference.mta_attention_backward`` (the chain of docs/spec.md section 3) on slabs of
rows [lo, hi), every batch element and head at once. For a chunk's output rows [r0, r1):

  - the convs read rows above, so the recomputed forward is exact from lo + HQ + HP on,
    with lo = r0 - HQ - HP;
  - the transposed convs read rows below, so the backward's slabs are exact up to
    hi - HP - HQ, with hi = r1 + HQ + HP;
  - Delta = rowsum(P * dP) needs whole rows, which every slab has.

Each stage is a slab kernel: the convs and their gradients (mta/conv.py), each head mix's
backward with its weight gradient (slabs/rows.py, the pre mix's with the softmax's), and the
matmuls into dq, dk, dv. Each chunk adds its rows' share to dq, dk, dv and the weight
gradients in a fixed order, with no atomics: the result is deterministic.
"""
import torch

from ..options import Options
from ..slabs.chunks import chunk_starts, conv_halos, default_slab_dtype, rows_per_chunk, slab_inputs, slab_weights
from ..slabs.matmul import matmul_into, matmul_precision, rows_times_values
from ..slabs.rows import mix_backward_rows
from ..utils import acc_dtype, dot_precision
from .conv import ConvWeightGradSums, key_query_conv_input_grad, key_query_conv_weight_grad
from .pre_conv import pre_conv_operands, use_pre_conv_matmul
from .slab_forward import slab_forward

# (B, H, rows, L) slabs alive at once in a chunk: the chain frees each slab after its last use,
# so at most five (the forward's s0, c, probs, a1, a; fewer later), and one for slack.
LIVE_SLABS = 6


def mta_chunked_bwd(grad_out, q, k, v, weights, *, causal: bool, pad_key: str, scale: float, options: Options,
                    needs=(True,) * 7):
    """Gradients (dq, dk, dv, d_pre_conv, d_pre_mix, d_post_conv, d_post_mix) of MTA for q (B, H,
    L, D), k, v (B, Hkv, L, D), each in its input's dtype; None for absent weights and where
    ``needs`` (seven bools in that order) is False: no work is spent on those (frozen weights
    cost no weight-gradient kernels)."""
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    rep = H // Hkv
    cd = acc_dtype(q)
    sd = options.slab_dtype or default_slab_dtype(q, cd)
    sw = slab_weights(weights, q, scale, sd, cd)
    pre_conv, pre_mix, post_conv, post_mix = sw.weights
    HQ, HP = conv_halos(pre_conv, post_conv)
    R = options.chunk_rows or rows_per_chunk(B * H, L, sd.itemsize, 2 * (HQ + HP), LIVE_SLABS, options.chunk_bytes)
    needs = [bool(n) and x is not None for n, x in zip(needs, (q, k, v, *weights))]
    need_q, need_k, need_v, *need_w = needs
    # how far back from dO the chain must go: dA -> (post mix) -> dP -> dZ -> (pre mix) -> dC -> dS
    need_ds = need_q or need_k
    need_dc = need_ds or need_w[0]
    need_dz = need_dc or need_w[1]
    need_da = need_dz or need_w[2] or need_w[3]

    dout = grad_out.to(sd).flatten(0, 1)
    qf, kf, vf = slab_inputs(q, k, v, sw.q_scale, sd)
    # every chunk writes its rows of dq; dk and dv take sums from the first chunk run on, the
    # last rows', whose slab holds every key
    dq, dk, dv = (torch.empty(B * H, L, D, device=q.device, dtype=cd) if need else None
                  for need in (need_q, need_k, need_v))
    starts = chunk_starts(L, R)
    # each conv's weight gradient as partial sums every chunk writes into its own slice; each
    # mix's as per-row shares every chunk fills with its rows; each summed once at the end
    conv_sums = [ConvWeightGradSums(w, B * H, min(L, R + 2 * (HQ + HP)), L, pad_key, len(starts), q.device, cd)
                 if need else None for w, need in ((pre_conv, need_w[0]), (post_conv, need_w[2]))]
    mix_dw_rows = [torch.empty(B, w.shape[0], L, *w.shape[1:], device=q.device, dtype=cd) if need else None
                   for w, need in zip((pre_mix, post_mix), (need_w[1], need_w[3]))]
    prec = dot_precision(q)
    operands = None
    if use_pre_conv_matmul(q, k, pre_conv, options.pre_conv_matmul, options.chunk_bytes):
        operands = pre_conv_operands(q, k, pre_conv, pad_key, sw.q_scale)

    with matmul_precision(q):
        for r0 in starts:
            r1 = min(L, r0 + R)
            lo, hi = max(0, r0 - HQ - HP), min(L, r1 + HQ + HP)
            mine = slice(r0 - lo, r1 - lo)     # this chunk's rows of the slab
            rows = (mine.start, mine.stop)
            # causal: every conv input and gradient of the slab counts as zero in the future
            # (j > lo + i); the kernels read them so (no masking pass) and skip the tiles there
            zero_above = lo if causal else None
            s0, c, probs, a1, a, _ = slab_forward(qf, kf, sw.weights, lo, hi, heads=H, causal=causal, pad_key=pad_key,
                                                  precision=prec, keep=True, pre_conv_operands=operands,
                                                  softmax_scale=sw.softmax_scale)
            ke = a.shape[-1]      # causal: keys from hi on are zero in every slab tensor
            summed = r0 != starts[0]
            do_rows = dout.narrow(1, r0, r1 - r0)
            if need_v:
                matmul_into(dv[:, :ke], a.flatten(0, 1)[:, mine].transpose(1, 2), do_rows, accumulate=summed)
            a = None
            if not need_da:
                continue
            da = torch.bmm(dout.narrow(1, lo, hi - lo), vf[:, :ke].transpose(1, 2)).view(B, H, hi - lo, ke)
            if post_mix is not None:
                # the post mix's adjoint (in place) and weight gradient in one kernel
                da, _ = mix_backward_rows(da, post_mix, x=a1 if need_w[3] else None, rows=rows, out=da,
                                          dw_rows=(mix_dw_rows[1], lo), zero_above=zero_above, precision=prec)
            a1 = None
            if need_w[2]:
                key_query_conv_weight_grad(da, probs, post_conv, pad_key, rows=rows, partial=conv_sums[1].next_slice(),
                                           zero_above=zero_above, precision=prec)
            if not need_dz:
                continue
            dp = key_query_conv_input_grad(da, post_conv, pad_key, mask_output=True, zero_above=zero_above,
                                           precision=prec) if post_conv is not None else da
            da = None
            # dZ = P * (dP - rowsum(P * dP)): the softmax's backward; with a pre mix in one kernel
            # with the mix's adjoint (in place) and weight gradient
            if pre_mix is not None:
                dc, _ = mix_backward_rows(dp, pre_mix, x=c if need_w[1] else None, probs=probs, rows=rows, out=dp,
                                          dw_rows=(mix_dw_rows[0], lo), zero_above=zero_above, precision=prec)
            else:
                dc = torch._softmax_backward_data(dp, probs, -1, probs.dtype)
            dp = probs = c = None
            if need_w[0]:
                key_query_conv_weight_grad(dc, s0, pre_conv, pad_key, rows=rows, partial=conv_sums[0].next_slice(),
                                           zero_above=zero_above, precision=prec)
            s0 = None
            if not need_ds:
                continue
            ds = key_query_conv_input_grad(dc, pre_conv, pad_key, mask_output=True, zero_above=zero_above,
                                           precision=prec) if pre_conv is not None else dc
            dc = None
            ds = ds.flatten(0, 1)[:, mine]
            if need_q:
                rows_times_values(ds, kf, dq[:, r0:r1], zero_above=r0 if causal else None, precision=prec)
            if need_k:
                matmul_into(dk[:, :ke], ds.transpose(1, 2), qf[:, r0:r1], accumulate=summed)
            ds = None

    dw = [None] * 4
    for i, sums in ((0, conv_sums[0]), (2, conv_sums[1])):
        if sums is not None:
            dw[i] = sums.result()
    for i, rows_dw in ((1, mix_dw_rows[0]), (3, mix_dw_rows[1])):
        if rows_dw is not None:
            dw[i] = rows_dw.sum((0, 2))
    if sw.scaled is not None and dw[sw.scaled] is not None:
        dw[sw.scaled] *= scale     # that weight's slab copy took the scale
    # dS is the gradient of qf kf^T: qf = q * q_scale, and the softmax may scale the scores too
    grad_scale = sw.q_scale * sw.softmax_scale
    dq = None if dq is None else dq.view(B, H, L, D) * grad_scale
    if dk is not None and sw.softmax_scale != 1:
        dk *= sw.softmax_scale
    dk, dv = (None if x is None else x.view(B, Hkv, rep, L, D).sum(2) for x in (dk, dv))
    return (*[None if g is None else g.to(x.dtype) for g, x in zip((dq, dk, dv), (q, k, v))],
            *[None if g is None else g.to(w.dtype) for g, w in zip(dw, weights)])

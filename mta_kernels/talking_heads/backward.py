"""The row-chunked backward of talking heads, from the forward's log-sum-exp.

Per chunk of rows [r0, r1) and keys [0, K), every batch element and head at once:

    S = Q K^T                                   the forward's scores, by the forward's kernel
    dA = dO V^T
    dS = w_pre^T (P * (dP - rowsum(P * dP))),   dP = w_post^T dA, P = exp(w_pre S - lse):
                                                one row kernel (two sweeps) with both weight
                                                gradients' per-row shares, written over dA,
                                                and A = w_post P on the way
    dv += A^T dO;  dq = dS K;  dk += dS^T Q

About nine slab passes, three slabs alive at once (S, dA or dS, A). For bf16 inputs dA is
bf16 too, and on CUDA A and dS are, so that the four matmuls run on bf16 operands with fp32
sums, each rounding once where the bf16 reference rounds.
"""
import torch

from ..options import Options
from ..slabs.chunks import chunk_starts, default_slab_dtype, rows_per_chunk, slab_inputs, slab_keys, slab_weights
from ..slabs.matmul import causal_scores, matmul_into, matmul_precision, rows_times_values, scores_buffer
from ..slabs.rows import mix_softmax_rows, talking_heads_backward_rows
from ..utils import acc_dtype, dot_precision, repeat_kv_heads
from .forward import uses_causal_matmuls


def _bytes_per_entry(scores_dtype, da_dtype, matmul_dtype) -> int:
    """Bytes per (head, row, key) entry of the slabs a chunk keeps alive at once: S, dA and A,
    with dS over dA where their dtypes agree, beside it otherwise."""
    same = matmul_dtype == da_dtype
    return scores_dtype.itemsize + da_dtype.itemsize + matmul_dtype.itemsize * (1 if same else 2)


def talking_heads_chunked_bwd(grad_out, q, k, v, pre_mix, post_mix, lse, *, causal: bool, scale: float,
                              options: Options, needs=(True,) * 5):
    """Gradients (dq, dk, dv, d_pre_mix, d_post_mix) of talking heads, each in its input's dtype
    (None where ``needs``, five bools in that order, is False). lse (B, H, L): what
    talking_heads_chunked_fwd returned for these inputs. dk and dv are summed over the query
    heads of a kv head, the weight gradients over batch and rows, in a fixed order."""
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    rep = H // Hkv
    cd = acc_dtype(q)
    need_q, need_k, need_v, need_pre, need_post = needs
    need_ds = need_q or need_k or need_pre or need_post
    sd = options.slab_dtype or default_slab_dtype(q, cd)
    sw = slab_weights((None, pre_mix, None, post_mix), q, scale, sd, cd)
    w_pre, w_post = sw.weights[1], sw.weights[3]
    scores16 = sd != cd
    da16 = scores16 and grad_out.dtype == q.dtype
    gemm16 = da16 and q.is_cuda
    md = q.dtype if gemm16 else cd          # the operands of the matmuls into dq, dk, dv
    R = options.chunk_rows or rows_per_chunk(B * H, L, _bytes_per_entry(sd, grad_out.dtype if da16 else cd, md), 0,
                                             1, options.chunk_bytes)

    qs, ks, _ = slab_inputs(q, k, None, sw.q_scale, sd)
    # dS is the gradient of qs K^T, so dk takes qs
    q_m, k_m = (qs, ks) if sd == md else slab_inputs(q, k, None, 1.0, md)[:2]
    causal_s = uses_causal_matmuls(causal, options, qs, ks)   # the forward's scores, bit for bit
    dout = grad_out.to(md).flatten(0, 1)
    da_lhs = grad_out.flatten(0, 1) if da16 else dout
    da_rhs = repeat_kv_heads(v if da16 else v.to(cd), H).flatten(0, 1).transpose(1, 2)
    # dk and dv take sums from the first chunk run on, the last rows', whose slab holds every key
    dq, dk, dv = (torch.empty(B * H, L, D, device=q.device, dtype=cd) if need else None
                  for need in (need_q, need_k, need_v))
    G, ch, _ = pre_mix.shape
    dw_rows = [torch.empty(B, G, L, ch, ch, device=q.device, dtype=cd) if need else None
               for need in (need_pre, need_post)]
    prec = dot_precision(q)
    starts = chunk_starts(L, R)
    with matmul_precision(q):
        for r0 in starts:
            n = min(L, r0 + R) - r0
            summed = r0 != starts[0]
            keys = slab_keys(r0 + n, L, causal)
            zero_above = r0 if causal else None
            lse_rows = lse[:, :, r0:r0 + n]
            dout_rows = dout.narrow(1, r0, n)
            if causal_s:
                s = causal_scores(qs, ks, scores_buffer(B * H, n, keys, sd, q.device), row0=r0, zero_above=r0,
                                  precision=prec)
            else:
                s = torch.bmm(qs.narrow(1, r0, n), ks.narrow(1, 0, keys).transpose(1, 2))
            s = s.view(B, H, n, keys)
            if not need_ds:
                if need_v:
                    a = mix_softmax_rows(s, w_pre, zero_above, precision=prec, post_mix=w_post, out_dtype=md,
                                         lse_in=lse_rows)[0]
                    matmul_into(dv[:, :keys], a.flatten(0, 1).transpose(1, 2), dout_rows, accumulate=summed)
                continue
            da = torch.bmm(da_lhs.narrow(1, r0, n), da_rhs.narrow(2, 0, keys)).view(B, H, n, keys)
            ds = torch.empty(da.shape, device=q.device, dtype=md) if da.dtype != md else da
            # A for dV from the backward kernel's first sweep (no recomputation of its own)
            a = torch.empty(s.shape, device=q.device, dtype=md) if need_v else None
            talking_heads_backward_rows(da, s, lse_rows, w_pre, w_post, zero_above, precision=prec, out=ds,
                                        dw_pre_rows=dw_rows[0], dw_post_rows=dw_rows[1], row0=r0, a_out=a)
            del s, da
            if need_v:
                matmul_into(dv[:, :keys], a.flatten(0, 1).transpose(1, 2), dout_rows, accumulate=summed)
                del a
            ds = ds.flatten(0, 1)
            if need_q:
                rows_times_values(ds, k_m, dq[:, r0:r0 + n], zero_above=zero_above, precision=prec)
            if need_k:
                matmul_into(dk[:, :keys], ds.transpose(1, 2), q_m[:, r0:r0 + n], accumulate=summed)
            del ds
    # dS is the gradient of qs K^T: qs = q * q_scale (dq takes it) or q with w_pre = scale * pre_mix
    # (the pre mix's gradient takes it)
    dq = None if dq is None else dq.view(B, H, L, D) * sw.q_scale
    d_pre, d_post = (None if x is None else x.sum((0, 2)) for x in dw_rows)
    if d_pre is not None and sw.scaled is not None:
        d_pre *= scale
    dk, dv = (None if x is None else x.view(B, Hkv, rep, L, D).sum(2) for x in (dk, dv))
    return (*[None if g is None else g.to(x.dtype) for g, x in zip((dq, dk, dv), (q, k, v))],
            *[None if g is None else g.to(w.dtype) for g, w in zip((d_pre, d_post), (pre_mix, post_mix))])

"""The row-chunked backward of talking heads (slabs.is_talking_heads: both head mixes, of one
group size, no convs), from the forward's log-sum-exp.

chunked_backward.py recomputes every intermediate of a chunk's rows and runs the chain back
one stage per kernel: about 19 passes over (1, H, rows, keys) slabs per chunk. Talking heads
need far fewer. Per chunk of rows [r0, r1) and keys [0, K):

    S = Q K^T                                   one slab, bf16 where the forward's were, by the
                                                forward's kernel (takes_causal_scores)
    dA = dO V^T
    dS = w_pre^T (P * (dP - rowsum(P * dP))),   dP = w_post^T dA, P = exp(w_pre S - lse) with
                                                the forward's lse: one kernel (two sweeps),
                                                with both weight gradients' per-row shares,
                                                written over dA, and A = w_post P on the way
    dv += A^T dO;  dq = dS K;  dk += dS^T Q

so about 9 slab passes, and three slabs alive at once (S, dA or dS, A). The scores are those
of the forward (chunked_forward.slab_dtype: bf16 with the softmax scale in w_pre for bf16
inputs), so that its lse normalises them exactly. For bf16 inputs dA is bf16 too, and on CUDA
A and dS are, so that the four matmuls run on bf16 operands with fp32 results (out_dtype),
each rounding once where the bf16 reference rounds.
"""
import torch

from .causal_matmul import causal_scores, scores_buffer
from .chunked_forward import slab_dtype, slab_weights_and_scale, takes_causal_scores
from .forward import _precision
from .slab_mix_backward import talking_heads_backward_rows
from .slab_softmax import mix_softmax_rows
from .slabs import (_matmul_precision, chunk_starts, matmul_into, mix_precision, repeat_kv_heads, rows_per_chunk,
                    slab_inputs, slab_keys)

def live_bytes_per_entry(scores_dtype, da_dtype, matmul_dtype) -> int:
    """Bytes per (head, row, key) entry of the slabs a chunk keeps alive at once: S, dA and A
    (from the backward kernel's first sweep), with dS over dA where their dtypes agree, beside
    it otherwise. H200, L=4096, bf16 (notes/thchunks2_h200_efb9e19.log, before A came from that
    kernel): the backward took 2.56 ms in two chunks, 2.67 / 2.85 in four."""
    same = matmul_dtype == da_dtype
    return scores_dtype.itemsize + da_dtype.itemsize + matmul_dtype.itemsize * (1 if same else 2)

# dA = dO V^T in bf16 where the scores are (rounded once, as the bf16 reference rounds it):
# half its bytes, read twice by the backward kernel, and a bf16 matmul. H200, L=4096, B=1,
# H=16, D=128 (scripts/profile_talking_heads.py, notes/thprofile_h200_4fae9fb.log, alternating
# in one process): backward 3.01 / 3.62 / 3.01 ms against 3.61 / 3.61 / 3.61 with fp32 dA.
BF16_DA = True


def talking_heads_backward(grad_out, q, k, v, pre_mix, post_mix, lse, *, causal, scale,
                           compute_dtype=torch.float32, rows=None, needs=(True,) * 5):
    """Gradients (dq, dk, dv, d_pre_mix, d_post_mix) of talking heads, each in its input's dtype
    (None where ``needs``, five bools in that order, is False). q (B, H, L, D), k, v (B, Hkv, L,
    D), pre_mix and post_mix (G, ch, ch); lse (B, H, L) in compute_dtype: the log-sum-exp the
    chunked forward returned for these inputs (its scores, bf16 or not, are the ones made
    here). ``rows`` overrides the chunk height (for tests). dk and dv are summed over the query
    heads of a kv head, the weight gradients over the batch and rows in a fixed order: the
    result is deterministic."""
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    rep = H // Hkv
    cd = compute_dtype
    need_q, need_k, need_v, need_pre, need_post = needs
    need_ds = need_q or need_k or need_pre or need_post
    # bf16 scores with the scale in w_pre (or cd with it in q); dA in bf16 with them; on CUDA A
    # and dS in bf16 too, for bf16 matmuls with fp32 results
    sd = slab_dtype(q, None, pre_mix, None, post_mix, cd)
    (_, w_pre, _, w_post), q_scale, _ = slab_weights_and_scale((None, pre_mix, None, post_mix), q, scale, sd, cd)
    scores16 = sd != cd
    da16 = scores16 and BF16_DA and grad_out.dtype == q.dtype
    gemm16 = da16 and q.is_cuda
    md = q.dtype if gemm16 else cd          # the operands of the matmuls into dq, dk, dv
    R = rows or rows_per_chunk(H, L, live_bytes_per_entry(sd, grad_out.dtype if da16 else cd, md), 0, live=1)

    # dk and dv take sums from the first chunk run on, the last rows', whose slab holds every key
    dq, dk, dv = (torch.empty(B, H, L, D, device=q.device, dtype=cd) if need else None
                  for need in (need_q, need_k, need_v))
    G, ch, _ = pre_mix.shape
    dw_rows = [torch.empty(B, G, L, ch, ch, device=q.device, dtype=cd) if need else None
               for need in (need_pre, need_post)]
    prec = mix_precision(_precision(q))
    with _matmul_precision(q):
        for b in range(B):
            # this element's (H, L, D) operands, kv heads repeated, and (H, D, L) transposes: every
            # chunk takes narrow() views of them (the host's time per chunk counts here: the H200's
            # host took longer to issue this backward than its GPU took to run it)
            one = slice(b, b + 1)
            qs, ks = (x[0] for x in slab_inputs(q[one], k[one], None, q_scale, sd)[:2])
            # the matmuls' operands: dS is the gradient of qs K^T, so dk takes qs
            q_m, k_m = (qs, ks) if sd == md else (x[0] for x in slab_inputs(q[one], k[one], None, 1.0, md)[:2])
            ks_t = ks.transpose(1, 2)
            # the forward's scores: its kernels where it took them
            causal_s = takes_causal_scores(causal, qs, ks)
            dout = grad_out[b].to(md)
            da_lhs = grad_out[b] if da16 else dout
            da_rhs = repeat_kv_heads((v[one] if da16 else v[one].to(cd)), H)[0].transpose(1, 2)
            lse_b = lse[b]
            dq_b, dk_b, dv_b = (None if x is None else x[b] for x in (dq, dk, dv))
            element = [None if x is None else x[one] for x in dw_rows]
            starts = list(chunk_starts(L, R))
            for r0 in starts:
                n = min(L, r0 + R) - r0
                summed = r0 != starts[0]
                keys = slab_keys(r0 + n, L, causal)
                zero_above = r0 if causal else None
                lse_rows = lse_b.narrow(1, r0, n).unsqueeze(0)
                dout_rows = dout.narrow(1, r0, n)
                if causal_s:
                    s = causal_scores(qs, ks, scores_buffer(H, n, keys, sd, q.device), row0=r0, zero_above=r0,
                                      precision=_precision(q))
                else:
                    s = torch.bmm(qs.narrow(1, r0, n), ks_t.narrow(2, 0, keys))   # (H, n, keys)
                if not need_ds:
                    if need_v:
                        a = mix_softmax_rows(s.unsqueeze(0), w_pre, zero_above, precision=prec, post_mix=w_post,
                                             out_dtype=md, lse_in=lse_rows)[0]
                        matmul_into(dv_b.narrow(1, 0, keys), a[0].transpose(1, 2), dout_rows, accumulate=summed)
                    continue
                da = torch.bmm(da_lhs.narrow(1, r0, n), da_rhs.narrow(2, 0, keys))
                ds = torch.empty(da.shape, device=q.device, dtype=md) if da.dtype != md else da
                # A for dV from the backward kernel's first sweep (no recomputation of its own)
                a = torch.empty(s.shape, device=q.device, dtype=md) if need_v else None
                talking_heads_backward_rows(da.unsqueeze(0), s.unsqueeze(0), lse_rows, w_pre, w_post, zero_above,
                                            precision=prec, out=ds.unsqueeze(0), dw_pre_rows=element[0],
                                            dw_post_rows=element[1], row0=r0,
                                            a_out=None if a is None else a.unsqueeze(0))
                del s, da
                if need_v:
                    matmul_into(dv_b.narrow(1, 0, keys), a.transpose(1, 2), dout_rows, accumulate=summed)
                    del a
                if need_q:
                    matmul_into(dq_b.narrow(1, r0, n), ds, k_m.narrow(1, 0, keys), accumulate=False)
                if need_k:
                    matmul_into(dk_b.narrow(1, 0, keys), ds.transpose(1, 2), q_m.narrow(1, r0, n), accumulate=summed)
                del ds
    # dS is the gradient of qs K^T: qs = q * scale (dq takes the scale) or q with w_pre = scale * pre_mix
    # (the pre mix's gradient takes it)
    if dq is not None and q_scale != 1:
        dq *= q_scale
    d_pre, d_post = (None if x is None else x.sum((0, 2)) for x in dw_rows)
    if d_pre is not None and scores16:
        d_pre *= scale
    if rep > 1:
        dk, dv = (None if x is None else x.view(B, Hkv, rep, L, D).sum(2) for x in (dk, dv))
    return (*[None if g is None else g.to(x.dtype) for g, x in zip((dq, dk, dv), (q, k, v))],
            *[None if g is None else g.to(w.dtype) for g, w in zip((d_pre, d_post), (pre_mix, post_mix))])

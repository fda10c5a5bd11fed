"""The row-chunked backward of talking heads (both head mixes, of one group size, no convs),
from the forward's log-sum-exp.

chunked_backward.py recomputes every intermediate of a chunk's rows and runs the chain back
one stage per kernel: about 19 passes over (1, H, rows, keys) slabs per chunk. Talking heads
need far fewer. Per chunk of rows [r0, r1) and keys [0, K):

    S = Q K^T                                   one slab, bf16 where the forward's were
    A = w_post softmax(w_pre S)                 one sweep over S: the forward's lse normalises
    dv += A^T dO;  dA = dO V^T
    dS = w_pre^T (P * (dP - rowsum(P * dP))),   dP = w_post^T dA, P from S and the lse again:
                                                one kernel (two sweeps), with both weight
                                                gradients' per-row shares, written over dA
    dq = dS K;  dk += dS^T Q

so about 10 slab passes, and two slabs alive at once (S, and A or dA). The scores are those
of the forward (chunked_forward.bf16_scores: bf16 with the softmax scale in w_pre for bf16
inputs), so that its lse normalises them exactly.
"""
import torch

from .chunked_forward import bf16_scores
from .forward import _precision
from .slab_mix_backward import talking_heads_backward_rows
from .slab_softmax import mix_softmax_rows
from .slabs import _matmul_precision, mix_precision, rows_per_chunk, slab_keys, slab_weights

# (1, H, rows, K) slabs alive at once: S and A, then S and dA (dS over it); one for slack.
LIVE_TENSORS = 3

# dA = dO V^T in bf16 where the scores are (rounded once, as the bf16 reference rounds it):
# half its bytes, read twice by the backward kernel, and a bf16 matmul. H200, L=4096, B=1,
# H=16, D=128 (scripts/profile_talking_heads.py, notes/thprofile_h200_4fae9fb.log, alternating
# in one process): backward 3.01 / 3.62 / 3.01 ms against 3.61 / 3.61 / 3.61 with fp32 dA.
BF16_DA = True


def takes_talking_heads_backward(pre_conv, pre_mix, post_conv, post_mix) -> bool:
    """Whether talking_heads_backward computes this call's gradients: both mixes, of one group
    size, and no conv."""
    return (pre_conv is None and post_conv is None and pre_mix is not None and post_mix is not None
            and pre_mix.shape == post_mix.shape)


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
    scores16 = bf16_scores(q, None, pre_mix, None, post_mix)
    # the scores' operands: bf16 q and k with the scale in w_pre, or copies in cd with it in q
    sd, q_scale = (q.dtype, 1.0) if scores16 else (cd, scale)
    w_pre, w_post = slab_weights((pre_mix, post_mix), cd)
    w_pre = w_pre * scale if scores16 else w_pre
    R = rows or rows_per_chunk(H, L, cd.itemsize, 0, live=LIVE_TENSORS)
    repeat = lambda x: x.repeat_interleave(rep, dim=1) if rep > 1 else x

    dq = torch.empty(B, H, L, D, device=q.device, dtype=cd) if need_q else None
    dk, dv = (torch.zeros(B, H, L, D, device=q.device, dtype=cd) if need else None for need in (need_k, need_v))
    G, ch, _ = pre_mix.shape
    dw_rows = [torch.empty(B, G, L, ch, ch, device=q.device, dtype=cd) if need else None
               for need in (need_pre, need_post)]
    prec = mix_precision(_precision(q))
    with _matmul_precision(q):
        for b in range(B):
            one = slice(b, b + 1)
            qs = q[one].to(sd)
            qs = qs * q_scale if q_scale != 1 else qs
            ks = repeat(k[one].to(sd))
            # dq = dS K and dk = dS^T Q in cd (TF32 for 16-bit inputs), with dS that of qs K^T
            q_cd, k_cd = (qs, ks) if sd == cd else (q[one].to(cd), repeat(k[one].to(cd)))
            dout = grad_out[one].to(cd)
            # dA's operands: dO and V in bf16, or in cd
            da16 = BF16_DA and scores16 and grad_out.dtype == q.dtype
            da_lhs, da_rhs = (grad_out[one], repeat(v[one])) if da16 else (dout, repeat(v[one].to(cd)))
            element = [None if x is None else x[one] for x in dw_rows]
            for r0 in range(0, L, R):
                r1 = min(L, r0 + R)
                keys = slab_keys(r1, L, causal)
                zero_above = r0 if causal else None
                lse_rows = lse[one, :, r0:r1]
                s = torch.matmul(qs[:, :, r0:r1], ks[:, :, :keys].transpose(-1, -2))
                if need_v:
                    a = mix_softmax_rows(s, w_pre, zero_above, precision=prec, post_mix=w_post, out_dtype=cd,
                                         lse_in=lse_rows)[0]
                    dv[b, :, :keys].baddbmm_(a[0].transpose(-1, -2), dout[0, :, r0:r1])
                    del a
                if not need_ds:
                    continue
                da = torch.matmul(da_lhs[:, :, r0:r1], da_rhs[:, :, :keys].transpose(-1, -2))
                ds = talking_heads_backward_rows(da, s, lse_rows, w_pre, w_post, zero_above, precision=prec,
                                                 out=None if da16 else da, dw_pre_rows=element[0],
                                                 dw_post_rows=element[1], row0=r0)
                del s
                if need_q:
                    torch.bmm(ds[0], k_cd[0, :, :keys], out=dq[b, :, r0:r1])
                if need_k:
                    dk[b, :, :keys].baddbmm_(ds[0].transpose(-1, -2), q_cd[0, :, r0:r1])
                del ds, da
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

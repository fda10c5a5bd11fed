"""The row-chunked forward of talking heads (both head mixes, of one group size, no conv).

Per chunk of rows [r0, r1) over the keys up to r1 (causal) or all keys:

    S = Q K^T                          one slab (bf16 for bf16 inputs, the scale in w_pre)
    A = w_post softmax(w_pre S)        one row kernel, which writes the lse too
    O = A V

Causal chunks take S and A V through the tensor-descriptor kernels of slabs/matmul.py that
skip the tiles in every row's future, where the operands allow descriptors.
"""
import torch

from ..options import Options
from ..slabs.chunks import chunk_starts, default_slab_dtype, rows_per_chunk, slab_inputs, slab_keys, slab_weights
from ..slabs.matmul import causal_pv, causal_scores, matmul_precision, scores_buffer, tma_ok
from ..slabs.rows import mix_softmax_rows
from ..utils import acc_dtype, dot_precision, repeat_kv_heads

# (B, H, rows, L) slabs alive at once in a chunk: the scores and A.
LIVE_SLABS = 2


def uses_causal_matmuls(causal: bool, options: Options, *operands) -> bool:
    """Whether causal talking heads' scores and A V run through causal_scores and causal_pv:
    as options.causal_matmuls says, else wherever the operands allow tensor descriptors. The
    forward and the backward ask alike, so that the backward's scores are the forward's bit for
    bit (its lse normalises exactly those)."""
    if not causal or options.causal_matmuls is False:
        return False
    return tma_ok(*operands)


def talking_heads_chunked_fwd(q, k, v, pre_mix, post_mix, *, causal: bool, scale: float, options: Options):
    """Talking heads' forward: q (B, H, L, D), k, v (B, Hkv, L, D), pre_mix and post_mix (G, ch,
    ch). Returns (out (B, H, L, D) in q's dtype, lse (B, H, L) in acc_dtype(q))."""
    B, H, L, D = q.shape
    cd = acc_dtype(q)
    sd = options.slab_dtype or default_slab_dtype(q, cd)
    sw = slab_weights((None, pre_mix, None, post_mix), q, scale, sd, cd)
    w_pre, w_post = sw.weights[1], sw.weights[3]
    qf, kf, _ = slab_inputs(q, k, None, sw.q_scale, sd)
    causal_s = uses_causal_matmuls(causal, options, qf, kf)
    # A in q's dtype for 16-bit inputs, so that A V runs on 16-bit tensor cores
    a_dtype = q.dtype
    v_in = v if v.dtype == a_dtype else v.to(a_dtype)
    vf = v_in.flatten(0, 1)
    causal_a = causal_s and tma_ok(vf)     # A V reads GQA's kv heads in place
    if not causal_a:
        vf = repeat_kv_heads(v_in, H).flatten(0, 1)
    # chunks that skip the future waste no keys however tall: budgeted in the slabs' own bytes
    itemsize = sd.itemsize if causal_s else cd.itemsize
    R = options.chunk_rows or rows_per_chunk(B * H, L, itemsize, 0, LIVE_SLABS, options.chunk_bytes)
    out = torch.empty(B, H, L, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, L, device=q.device, dtype=cd)
    prec = dot_precision(q)
    with matmul_precision(q):
        for r0 in chunk_starts(L, R):
            r1 = min(L, r0 + R)
            n = r1 - r0
            keys = slab_keys(r1, L, causal)
            zero_above = r0 if causal else None
            if causal_s:
                s = causal_scores(qf, kf, scores_buffer(B * H, n, keys, sd, q.device), row0=r0, zero_above=r0,
                                  precision=prec)
            else:
                s = torch.bmm(qf.narrow(1, r0, n), kf.narrow(1, 0, keys).transpose(1, 2))
            # causal_pv masks the future of A, so the mix-softmax may leave it unwritten
            a_out = scores_buffer(B * H, n, keys, a_dtype, q.device).view(B, H, n, keys) if causal_a else None
            a, _ = mix_softmax_rows(s.view(B, H, n, keys), w_pre, zero_above, want_lse=True, precision=prec,
                                    out=a_out, post_mix=w_post, out_dtype=a_dtype, lse_out=lse[:, :, r0:r1],
                                    write_future=not causal_a)
            del s
            o = out[:, :, r0:r1].flatten(0, 1)
            if causal_a:
                causal_pv(a.flatten(0, 1), vf, o, zero_above=r0, precision=prec)
            else:
                torch.bmm(a.flatten(0, 1), vf[:, :keys], out=o)
            del a, a_out     # before the next chunk's slabs: LIVE_SLABS counts none from this one
    return out, lse

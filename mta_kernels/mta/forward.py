"""The row-chunked MTA forward for calls with a conv or a head mix (mta_chunked_fwd).

For the output rows [r0, r1) of a chunk it materializes rows [lo, r1) of every (B, H, L, L)
intermediate, lo = r0 - (cq-1) - (cq'-1) being the rows the convs read above, over the keys
up to r1 when causal (later keys are in every row's future); one chunk runs every batch
element and head at once. Memory: O(rows x L) within the slabs' budget.
"""
import torch

from ..options import Options
from ..slabs.chunks import (chunk_starts, conv_halos, default_slab_dtype, rows_per_chunk, slab_inputs,
                            slab_weights)
from ..slabs.matmul import matmul_precision, rows_times_values
from ..utils import acc_dtype, dot_precision, repeat_kv_heads
from .pre_conv import pre_conv_operands, use_pre_conv_matmul
from .slab_forward import slab_forward

# (B, H, rows, L) slabs alive at once in a chunk: a stage's input and output (the softmax works
# in place), and one for the matmuls' and the allocator's slack.
LIVE_SLABS = 3


def mta_chunked_fwd(q, k, v, weights, *, causal: bool, pad_key: str, scale: float, options: Options,
                    q_offset=None):
    """MTA forward as ``mta_reference.mta_attention``: q (B, H, Lq, D), row r at position
    q_offset + r (default Lk - Lq), k, v (B, Hkv, Lk, D), weights the four (pre_conv, pre_mix,
    post_conv, post_mix), None where absent. Rows above q's first are taken as zero, so a block
    that starts past position 0 must bring the rows its convs read (the api's q_prev).
    Returns (out (B, H, Lq, D) in q's dtype, lse (B, H, Lq) in acc_dtype(q): each row's
    log-sum-exp of the masked pre-softmax logits)."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    row_offset = Lk - Lq if q_offset is None else q_offset
    cd = acc_dtype(q)
    sd = options.slab_dtype or default_slab_dtype(q, cd)
    sw = slab_weights(weights, q, scale, sd, cd)
    HQ, HP = conv_halos(weights[0], weights[2])
    R = options.chunk_rows or rows_per_chunk(B * H, Lk, sd.itemsize, HQ + HP, LIVE_SLABS, options.chunk_bytes)
    out = torch.empty(B, H, Lq, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, Lq, device=q.device, dtype=cd)
    prec = dot_precision(q)
    # A V on 16-bit operands where A is 16-bit (the post mix's kernel writes it in q's dtype)
    a_in_q_dtype = (weights[3] is not None or sd == q.dtype) and q.dtype != cd
    qf, kf, _ = slab_inputs(q, k, None, sw.q_scale, sd)
    vf = repeat_kv_heads(v if a_in_q_dtype else v.to(sd), H).flatten(0, 1)
    operands = None
    if use_pre_conv_matmul(q, k, weights[0], options.pre_conv_matmul, options.chunk_bytes):
        operands = pre_conv_operands(q, k, sw.weights[0], pad_key, sw.q_scale)
    with matmul_precision(q):
        for r0 in chunk_starts(Lq, R):
            r1 = min(Lq, r0 + R)
            lo = max(0, r0 - HQ - HP)
            # without conv halos the mix-softmax kernel writes these rows' lse in place
            lse_rows = lse[:, :, r0:r1] if lo == r0 else None
            t = slab_forward(qf, kf, sw.weights, lo, r1, heads=H, causal=causal, pad_key=pad_key, precision=prec,
                             keep=False, a_dtype=q.dtype, pre_conv_operands=operands, lse_out=lse_rows,
                             softmax_scale=sw.softmax_scale, row_offset=row_offset)
            a = t.a[:, :, r0 - lo:].flatten(0, 1)
            o = torch.empty(B * H, r1 - r0, D, device=q.device, dtype=a.dtype)
            rows_times_values(a, vf[:, :a.shape[-1]].to(a.dtype), o, zero_above=r0 + row_offset if causal else None,
                              precision=prec)
            out[:, :, r0:r1] = o.view(B, H, r1 - r0, D)
            if t.lse is not lse_rows:
                lse[:, :, r0:r1] = t.lse[:, :, r0 - lo:]
            del t, a, o    # before the next slab: LIVE_SLABS counts none from the last
    return out, lse

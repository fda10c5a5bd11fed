"""Exact MTA forward in PyTorch and the slab conv kernels, one block of query rows at a time.

An alternative to the general fused kernel (forward_kernels.py) for calls with convolutions,
built from the chunked backward's pieces. For the output rows [r0, r1) of a chunk it
materializes rows [lo, r1) of every (B, H, L, L) intermediate, lo = r0 - HQ - HP being the
rows the convs read above, and keys [0, r1) when causal (later keys are in every row's
future); the convs are the Triton tensor-core slab kernels, the mixes batched matmuls, the
matmuls TF32 for 16-bit inputs. Memory: O(rows x L) within the chunked backward's
working-set budget (MTA_KERNELS_CHUNK_BYTES), one batch element at a time.

Why it exists: the chunked backward's recomputation of the forward looked cheaper on the
H200 than the general kernel's forward (at L=4096 its forward-side convs took about 6 ms of
slab-conv time against 13.5 ms for the whole fused forward), so this path may be the faster
forward where convs are present. It is off by default until it is timed there: set
MTA_KERNELS_CHUNKED_FORWARD=1 (or ``chunked_forward.CHUNKED_FORWARD = True``) to use it.
"""
import os

import torch

from .chunked_backward import _matmul_precision, conv_halos, rows_per_chunk, slab_inputs, slab_intermediates
from .forward import _precision

CHUNKED_FORWARD = os.environ.get("MTA_KERNELS_CHUNKED_FORWARD", "0") == "1"

# (1, H, rows, L) tensors alive at once in a chunk: s0, c, m, the masked copy of m, probs, a1,
# a, and the masked copy for the log-sum-exp.
LIVE_TENSORS = 8


def chunked_forward(q, k, v, pre_conv, pre_mix, post_conv, post_mix, *, causal, pad_key, scale,
                    compute_dtype=torch.float32, rows=None):
    """MTA forward as ``mta_reference.mta_attention`` (same shapes; scale already resolved to
    a float), computed in chunks of ``rows`` query rows (default: what the budget allows).
    Returns (out (B, H, L, D) in q's dtype, lse (B, H, L) in compute_dtype: the log-sum-exp of
    each row of the masked pre-softmax logits, as the fused forward returns it)."""
    B, H, L, D = q.shape
    cd = compute_dtype
    HQ, HP = conv_halos(pre_conv, post_conv)
    R = rows or rows_per_chunk(H, L, torch.finfo(cd).bits // 8, HQ + HP, live=LIVE_TENSORS)
    out = torch.empty(B, H, L, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, L, device=q.device, dtype=cd)
    prec = _precision(q)
    with _matmul_precision(q):
        for b in range(B):
            one = slice(b, b + 1)
            qc, kc, vc = slab_inputs(q[one], k[one], v[one], scale, cd)
            for r0 in range(0, L, R):
                r1 = min(L, r0 + R)
                lo = max(0, r0 - HQ - HP)
                ke = r1 if causal else L
                t = slab_intermediates(qc, kc, vc, (pre_conv, pre_mix, post_conv, post_mix), causal=causal,
                                       pad_key=pad_key, compute_dtype=cd, row_range=(lo, r1), key_end=ke,
                                       precision=prec)
                mine = slice(r0 - lo, r1 - lo)
                out[one, :, r0:r1] = torch.matmul(t.a[:, :, mine], t.v).to(q.dtype)
                m = t.m[:, :, mine].masked_fill(t.future[mine], float("-inf"))
                lse[one, :, r0:r1] = torch.logsumexp(m.to(lse.dtype), dim=-1)
    return out, lse

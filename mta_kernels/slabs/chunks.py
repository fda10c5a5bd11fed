"""How the row-chunked paths cut a call into slabs, and what the slabs hold.

A slab holds query rows [lo, hi) of the (B, H, L, L) MTA tensors for every batch element
and head at once, (B, H, hi - lo, K) for the K keys computed: the chunk's own rows plus the
rows its convs read above (and, in the backward, below). The chunk height comes from a
working-set budget in bytes; slabs hold 16-bit values for bf16 inputs (each rounded once,
where the bf16 reference rounds it) and fp32 otherwise.
"""
from typing import NamedTuple, Optional

import torch

from .. import configs
from ..utils import cdiv, repeat_kv_heads

# A slab is never shorter than one row tile of the conv kernels: below that, long sequences
# would spend most of each chunk on halo rows and half-empty tiles.
MIN_SLAB_ROWS = configs.CONV["BR"]

# Causal slabs end their keys at a multiple of KEY_ALIGN (or at L): keys past the slab's last
# row are in every row's future, and a row stride divisible by 16 elements lets Triton
# vectorize the slab kernels' loads and cuBLAS take its aligned kernels.
KEY_ALIGN = 16


def rows_per_chunk(heads: int, L: int, itemsize: int, halo: int, live: int, budget: int) -> int:
    """Rows per chunk: ``live`` slabs of (heads, rows, L) elements of ``itemsize`` bytes in
    ``budget`` bytes (the ``halo`` rows come on top), at least MIN_SLAB_ROWS - halo; the L rows
    then shared evenly by as many chunks as that height needs (so no chunk is all halo)."""
    fit = max(16, MIN_SLAB_ROWS - halo, budget // (live * heads * L * itemsize))
    chunks = cdiv(L, fit)
    return max(16, MIN_SLAB_ROWS - halo, cdiv(L, chunks))


def chunk_starts(L: int, rows: int):
    """First rows of the chunks of ``rows`` rows that cover [0, L), last first: a causal chunk's
    work grows with its keys, so the largest queues up on the GPU while the host launches the
    rest. Sums over chunks (dk, dv, weight gradients) run in this fixed order: deterministic."""
    return list(reversed(range(0, L, rows)))


def slab_keys(hi: int, L: int, causal: bool) -> int:
    """Keys [0, K) a slab of rows ending at hi computes: all L, or when causal hi rounded up to
    KEY_ALIGN, at most L."""
    return min(L, cdiv(hi, KEY_ALIGN) * KEY_ALIGN) if causal else L


def conv_halos(pre_conv, post_conv):
    """(HQ, HP): the rows above (or below, transposed) that the pre and post convs reach."""
    return tuple(w.shape[1] - 1 if w is not None else 0 for w in (pre_conv, post_conv))


def is_talking_heads(pre_conv, pre_mix, post_conv, post_mix) -> bool:
    """Both head mixes, of one group size, and no conv: the talking-heads path's calls."""
    return (pre_conv is None and post_conv is None and pre_mix is not None and post_mix is not None
            and pre_mix.shape == post_mix.shape)


def default_slab_dtype(q: torch.Tensor, compute_dtype: torch.dtype) -> torch.dtype:
    """bf16 slabs for bf16 inputs (rounded once where the bf16 reference rounds), else the
    accumulator dtype (fp16 scores before the softmax scale could overflow)."""
    return q.dtype if q.dtype == torch.bfloat16 else compute_dtype


class SlabWeights(NamedTuple):
    """The four weights as the slab kernels take them, and where the softmax scale went: into q
    (``q_scale``, fp32 slabs), into the first linear map of the scores (the pre conv, else the
    pre mix: weight ``scaled``, whose gradient takes the scale too), or into the softmax kernel
    (``softmax_scale``, 16-bit slabs without a pre conv or pre mix)."""

    weights: tuple
    q_scale: float
    softmax_scale: float
    scaled: Optional[int]


def slab_weights(weights, q: torch.Tensor, scale: float, slabs_dtype, compute_dtype) -> SlabWeights:
    """The four weights (None where absent) in compute_dtype, contiguous, made once per call, with
    the softmax scale placed for slabs of ``slabs_dtype``: a 16-bit slab holds q k^T rounded once,
    unscaled, so the scale goes to a kernel that sums in fp32 rather than into q rounded again."""
    ws = [None if w is None else w.to(compute_dtype).contiguous() for w in weights]
    if slabs_dtype == compute_dtype:
        return SlabWeights(tuple(ws), scale, 1.0, None)
    first = 0 if ws[0] is not None else 1 if ws[1] is not None else None
    if first is None:
        return SlabWeights(tuple(ws), 1.0, scale, None)
    ws[first] = ws[first] * scale
    return SlabWeights(tuple(ws), 1.0, 1.0, first)


def slab_inputs(q, k, v, q_scale: float, dtype):
    """q times q_scale, k and v, in ``dtype`` with the kv heads repeated to q's heads, flattened
    to (B * H, L, D): made once per call, read by every chunk (views of the inputs where
    nothing changes them). v may be None (then None comes back for it)."""
    H = q.shape[1]
    qc = q.to(dtype)
    qc = qc * q_scale if q_scale != 1 else qc
    kc = repeat_kv_heads(k.to(dtype), H)
    vc = None if v is None else repeat_kv_heads(v.to(dtype), H)
    return tuple(None if x is None else x.flatten(0, 1) for x in (qc, kc, vc))

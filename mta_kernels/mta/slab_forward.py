"""The MTA forward on one slab of query rows, every batch element and head at once.

The row-chunked forward and backward both run it: the forward for each chunk's rows plus the
rows its convs read above, keeping only A and the log-sum-exp; the backward for a chunk's
rows with halos above and below, keeping the intermediates its weight gradients read.
"""
import functools
from typing import NamedTuple, Optional

import torch

from ..slabs.chunks import slab_keys
from ..slabs.rows import mix_rows, mix_softmax_rows, softmax_rows_
from .conv import band_first_column, key_query_conv
from .pre_conv import pre_conv_matmul


class SlabForward(NamedTuple):
    """The forward on rows [lo, hi), as (B, H, hi - lo, K) slabs for the K keys computed; with
    keep=False only ``a`` and ``lse`` (the others None), with keep all but ``lse``. Causal
    slabs are not masked where the next stage reads them through a kernel that masks."""

    s0: Optional[torch.Tensor]      # scores, not masked; None without a pre conv
    c: Optional[torch.Tensor]       # after the pre-softmax conv (s0 without it); None without a pre mix
    probs: Optional[torch.Tensor]   # softmax of the pre-mixed logits, zero on the future
    a1: Optional[torch.Tensor]      # after the post-softmax conv, zero on the future (probs without it)
    a: torch.Tensor                 # after the post-softmax mixing (a1 without it)
    lse: Optional[torch.Tensor]     # (B, H, hi - lo): log-sum-exp of the masked pre-softmax logits


def slab_forward(qf, kf, weights, lo: int, hi: int, *, heads: int, causal: bool, pad_key: str, precision: str,
                 keep: bool, a_dtype=None, pre_conv_operands=None, lse_out=None, softmax_scale: float = 1.0,
                 row_offset: int = 0) -> SlabForward:
    """``mta_reference.forward_intermediates`` on q rows [lo, hi) at positions row_offset + row,
    over the keys up to the slab's last position. qf (B * H, Lq, D) and kf (B * H, Lk, D) come
    from slabs.chunks.slab_inputs (``heads`` = H); ``weights`` from slab_weights. The convs, the
    pre mix with the softmax, and the post mix are slab kernels; with keep=False, both mixes of
    one group size and no post conv, the post mix runs in the softmax's kernel too. With
    ``pre_conv_operands`` the pre conv is one matmul away from the causal diagonal (the slab
    conv kernel making the band). Rows above lo read as zero, so result rows from lo + the convs'
    row halos on are exact. keep=False drops each intermediate once the next is made and
    returns the lse (``lse_out`` (B, H, hi - lo), unit stride along rows, takes it where a pre
    mix's kernel writes it); keep=True keeps what the backward's weight gradients read."""
    pre_conv, pre_mix, post_conv, post_mix = weights
    BH, Lk = kf.shape[0], kf.shape[1]
    B, R = BH // heads, hi - lo
    keys = slab_keys(hi + row_offset, Lk, causal)
    zero_above = lo + row_offset if causal else None
    conv = functools.partial(key_query_conv, pad_key=pad_key, zero_above=zero_above, precision=precision)

    def scores(first):
        s = torch.bmm(qf.narrow(1, lo, R), kf.narrow(1, first, keys - first).transpose(1, 2))
        return s.view(B, heads, R, keys - first)

    fused_post_mix = post_mix if (pre_mix is not None and post_mix is not None and post_conv is None
                                  and post_mix.shape == pre_mix.shape and not keep) else None
    if pre_conv is not None and pre_conv_operands is not None:
        q_in, k_tilde, scale = pre_conv_operands
        c = pre_conv_matmul(q_in, k_tilde, lo, hi, keys, scale, zero_above, precision=precision, dtype=qf.dtype)
        # the band near the causal diagonal from the scores the slab conv reads there (all of them
        # where the backward keeps s0 for the weight gradient)
        s0 = scores(0) if keep else None
        if causal:
            first = 0 if keep else min(keys, band_first_column(zero_above, *pre_conv.shape[1:], pad_key))
            conv(s0 if keep else scores(first), pre_conv, out=c, band=True, x_col0=first)
    else:
        s0 = scores(0)
        c = conv(s0, pre_conv) if pre_conv is not None else s0
    s0 = s0 if keep and pre_conv is not None else None
    if pre_mix is not None:
        # mixed and normalised in one kernel: over c itself unless the backward keeps it or the
        # post mix makes a new slab in a_dtype
        in_place = not keep and fused_post_mix is None
        probs, lse = mix_softmax_rows(c, pre_mix, zero_above, want_lse=not keep, precision=precision,
                                      out=c if in_place else None, post_mix=fused_post_mix,
                                      out_dtype=a_dtype if fused_post_mix is not None else None, lse_out=lse_out)
        c = c if keep else None
        if fused_post_mix is not None:
            return SlabForward(None, None, None, None, probs, lse)
    else:
        # in place: c (or the scores when no conv made c), which nothing reads again
        probs, lse = softmax_rows_(c, zero_above, want_lse=not keep, scale=softmax_scale)
        c = None
    a1 = conv(probs, post_conv, mask_output=True) if post_conv is not None else probs
    probs = probs if keep else None
    a = mix_rows(a1, post_mix, zero_above, precision=precision, out_dtype=a_dtype) if post_mix is not None else a1
    a1 = a1 if keep else None
    return SlabForward(s0, c, probs, a1, a, lse)

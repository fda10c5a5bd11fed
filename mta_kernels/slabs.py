"""Row slabs of the (B, H, L, L) MTA tensors: what the row-chunked forward
(chunked_forward.py) and backward (chunked_backward.py) share.

A slab holds query rows [lo, hi) of one batch element's scores, probabilities and their
gradients, (1, H, hi - lo, K) for the K keys computed. Here: the working-set budget that
sets the chunk height (MTA_KERNELS_CHUNK_BYTES), the TF32 switch for the slabs' fp32
matmuls (MTA_KERNELS_CHUNKED_TF32), and the forward on a slab with the Triton slab conv,
softmax and mix kernels (slab_conv.py, slab_softmax.py, slab_mix.py).
"""
import contextlib
import functools
import os
from typing import NamedTuple, Optional

import torch

from .causal_matmul import causal_scores, scores_buffer
from .forward import cdiv
from .pre_conv_matmul import conv_keys, pre_conv_matmul
from .slab_conv import CONV_CONFIG, band_first_column, key_query_conv
from .slab_mix import mix_rows
from .slab_softmax import mix_softmax_rows, softmax_rows_


def _chunk_bytes_from_env(default=1 << 30):
    """MTA_KERNELS_CHUNK_BYTES as a positive int (bytes), or ``default`` when unset."""
    text = os.environ.get("MTA_KERNELS_CHUNK_BYTES", "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"MTA_KERNELS_CHUNK_BYTES must be a positive number of bytes, got {text!r}")
    return value


# Working set per chunk: about this many bytes of (B, H, rows, L) tensors (1 GiB unless
# MTA_KERNELS_CHUNK_BYTES says otherwise: more memory, fewer and taller chunks; at L=4096 the
# full-MTA backward took 33.6 / 30.0 / 28.0 ms on the H200 with 1 / 2 / 4 GiB).
CHUNK_BYTES = _chunk_bytes_from_env()

# Run the fp32 matmuls of the chunked paths (QK^T, A V, dO V^T, dS K, dS^T Q, A^T dO, the mixes)
# on TF32 tensor cores when q, k, v are 16-bit: their products are exact in TF32 (8-bit
# mantissas fit its 10), while A and dS are rounded to ~1e-3 relative, well inside the
# spec's 2x-the-bf16-reference rule. MTA_KERNELS_CHUNKED_TF32=0 keeps full fp32.
TF32_MATMULS = os.environ.get("MTA_KERNELS_CHUNKED_TF32", "1") == "1"


def auto_switch_from_env(name: str) -> str:
    """Environment variable ``name`` as 'auto' (unset or empty), '1' or '0'; anything else is
    refused with an error that names it."""
    text = os.environ.get(name, "").strip() or "auto"
    if text not in ("auto", "1", "0"):
        raise ValueError(f"{name} must be auto, 1 or 0, got {text!r}")
    return text


def _pre_conv_matmul_mode_from_env() -> str:
    """MTA_KERNELS_PRE_CONV_MATMUL as 'auto' (unset), '1' or '0'."""
    return auto_switch_from_env("MTA_KERNELS_PRE_CONV_MATMUL")


# The row-chunked paths' pre conv as one matmul (pre_conv_matmul.py) instead of the slab conv
# kernel: 'auto' for 16-bit inputs while K~ (H x L x cq x D of q's dtype per batch element)
# takes at most a quarter of the slab budget (L <= 8192 at H=16, D=128 with the paper's
# 6-row convs); '1' always (tests); '0' never.
PRE_CONV_MATMUL = _pre_conv_matmul_mode_from_env()


def use_pre_conv_matmul(q, pre_conv) -> bool:
    """Whether the row-chunked paths for q (B, H, L, D) make the pre conv as one matmul (the
    forward, and the backward's forward recomputation)."""
    if pre_conv is None or PRE_CONV_MATMUL == "0":
        return False
    if PRE_CONV_MATMUL == "1":
        return True
    B, H, L, D = q.shape
    k_tilde_bytes = H * L * pre_conv.shape[1] * D * q.element_size()
    return q.dtype in (torch.float16, torch.bfloat16) and k_tilde_bytes <= CHUNK_BYTES // 4


def pre_conv_operands(q, k, pre_conv, pad_key, scale):
    """slab_forward's ``pre_conv_operands`` for one batch element's q (1, H, L, D) and k: q, K~ =
    conv_keys(k, pre_conv) and scale where use_pre_conv_matmul says so; else None. (Without a
    pre conv, Q K^T as the same 16-bit kernel, K~ = k, was no faster than the TF32 torch.matmul
    of the slabs' copies: talking heads at L=4096 on the H200, 1.227 against 1.203 ms forward.)"""
    if not use_pre_conv_matmul(q, pre_conv):
        return None
    return (q, conv_keys(k, pre_conv, pad_key, q.shape[1], q.dtype), scale)


@contextlib.contextmanager
def _matmul_precision(q):
    """TF32 for CUDA fp32 matmuls inside the block when TF32_MATMULS and q is 16-bit."""
    use = TF32_MATMULS and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    matmul = torch.backends.cuda.matmul
    old = matmul.fp32_precision
    if use:
        matmul.fp32_precision = "tf32"
    try:
        yield
    finally:
        matmul.fp32_precision = old


def matmul_into(out, a, b, accumulate):
    """out = a @ b, or out += a @ b, for batched a, b; 16-bit a and b with an fp32 out go through
    out_dtype on CUDA (bf16 tensor cores, fp32 accumulation, twice TF32's speed on the H200,
    notes/out_dtype_h200_efb9e19.log), through fp32 copies elsewhere (the CPU build lacks it)."""
    extra = {}
    if a.dtype != out.dtype:
        if a.is_cuda:
            extra = dict(out_dtype=out.dtype)
        else:
            a, b = a.to(out.dtype), b.to(out.dtype)
    if accumulate:
        torch.baddbmm(out, a, b, out=out, **extra)
    else:
        torch.bmm(a, b, out=out, **extra)


def mix_precision(precision):
    """tl.dot precision of the fused mix kernels: the slab kernels' (tf32 beside 16-bit
    inputs), but exact fp32 when TF32_MATMULS is off, as for the slabs' matmuls."""
    return precision if TF32_MATMULS else "ieee"


# A slab (a chunk's rows and its halos) is never shorter than one row tile of the slab conv
# kernels: below that, long sequences (18-row chunks at H=16, L=65536 in the budget) spent most
# of each chunk on halo rows and on tiles left mostly empty.
MIN_SLAB_ROWS = CONV_CONFIG["BR"]


def rows_per_chunk(H, L, itemsize, halo, live, budget=CHUNK_BYTES):
    """Rows per chunk: ``live`` slabs of (1, H, rows, L) in ``budget`` bytes (the ``halo``
    rows, above and below together, come on top), but at least MIN_SLAB_ROWS - halo, so the
    working set outgrows the budget only where the budget would leave less than one full conv
    tile (at H=16 with the paper's convs and the 1 GiB default, beyond L of about 64K for the
    backward's 6 live slabs). The L rows are then shared evenly by as many chunks as that
    height needs: 1365 rows at L=4096 made chunks of 1365, 1365, 1365 and 1 rows, where
    four of 1024 compute fewer causal slab entries (the keys of a chunk end at its last row)
    and no chunk is all halo."""
    fit = max(16, MIN_SLAB_ROWS - halo, budget // (live * H * L * itemsize))
    chunks = cdiv(L, fit)
    return max(16, MIN_SLAB_ROWS - halo, cdiv(L, chunks))


def chunk_starts(L, rows):
    """The first rows of the chunks of ``rows`` rows that cover [0, L), last first: a causal
    chunk's work grows with its keys, so the largest queues up on the GPU while the host
    launches the smaller ones (first to last, the first chunks' few keys had left the GPU
    waiting on the host's launches). Chunks are independent but for the sums into dk, dv and
    the weight gradients, whose fixed order keeps them deterministic."""
    return reversed(range(0, L, rows))


def is_talking_heads(pre_conv, pre_mix, post_conv, post_mix) -> bool:
    """Both head mixes, of one group size, and no conv: the calls whose chunked forward mixes,
    normalises and mixes again in one kernel, and which have a backward of their own
    (chunked_talking_heads.py)."""
    return (pre_conv is None and post_conv is None and pre_mix is not None and post_mix is not None
            and pre_mix.shape == post_mix.shape)


def live_slabs(pre_conv, post_conv, with_convs, without_convs) -> int:
    """Slabs alive at once in a chunk (rows_per_chunk's ``live``): ``with_convs`` for a call with
    a conv (pre_conv or post_conv not None), else ``without_convs``."""
    return with_convs if pre_conv is not None or post_conv is not None else without_convs


def conv_halos(pre_conv, post_conv):
    """(HQ, HP): the rows above (or below, transposed) that the pre and post convs reach."""
    return tuple(w.shape[1] - 1 if w is not None else 0 for w in (pre_conv, post_conv))


# Causal slabs end their keys at a multiple of KEY_ALIGN (or at L): the keys past the slab's
# last row are in every row's future, zero in every slab tensor, and a row stride divisible
# by 16 elements lets Triton vectorize the slab conv kernels' loads (it specializes integer
# arguments on divisibility by 16) and cuBLAS take its aligned kernels.
KEY_ALIGN = 16


def slab_keys(hi, L, causal):
    """Keys [0, K) that a slab of rows ending at hi computes: all L, or when causal hi
    rounded up to KEY_ALIGN, at most L."""
    return min(L, cdiv(hi, KEY_ALIGN) * KEY_ALIGN) if causal else L


def repeat_kv_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """x (B, Hkv, L, D) with each kv head repeated for the heads // Hkv query heads that share it
    (x itself without GQA)."""
    rep = heads // x.shape[1]
    return x.repeat_interleave(rep, dim=1) if rep > 1 else x


def slab_inputs(q, k, v, scale, compute_dtype):
    """q times the softmax scale (so that no slab is scaled), k and v, in compute_dtype with the
    kv heads repeated to q's heads: made once per batch element, read by every chunk (q, k, v
    themselves where nothing changes them). v may be None (the chunked forward's A V in q's
    dtype reads v itself): then vc is None."""
    H = q.shape[1]
    qc, kc = q.to(compute_dtype), repeat_kv_heads(k.to(compute_dtype), H)
    qc = qc * scale if scale != 1 else qc
    return qc, kc, None if v is None else repeat_kv_heads(v.to(compute_dtype), H)


def slab_weights(weights, compute_dtype):
    """The four weights (None where absent) in compute_dtype and contiguous, made once per call:
    the slab kernels' own conversions are then no-ops (they had been a launch each per chunk)."""
    return tuple(None if w is None else w.to(compute_dtype).contiguous() for w in weights)


class SlabForward(NamedTuple):
    """The forward on rows [lo, hi) of one batch element, as (1, H, hi - lo, K) slabs for the
    K keys computed; with keep=False only ``a`` and ``lse`` (the others None), with keep
    all but ``lse``. Causal slabs are not masked where the next stage reads them through a
    kernel that masks (the slab convs and their weight gradients, the softmax)."""

    s0: Optional[torch.Tensor]      # scaled scores, not masked; None without a pre conv
    c: Optional[torch.Tensor]       # after the pre-softmax conv (s0 without it); None without a pre mix
    probs: Optional[torch.Tensor]   # softmax of the pre-mixed logits, zero on the future
    a1: Optional[torch.Tensor]      # after the post-softmax conv, zero on the future (probs without it)
    a: torch.Tensor                 # after the post-softmax mixing (a1 without it)
    lse: Optional[torch.Tensor]     # (1, H, hi - lo): log-sum-exp of the masked pre-softmax logits


def slab_forward(qc, kc, weights, lo, hi, *, causal, pad_key, precision, keep, a_dtype=None,
                 pre_conv_operands=None, lse_out=None, skip_future_scores=False, leave_a_future=False) -> SlabForward:
    """mta_reference.forward_intermediates on rows [lo, hi) of slab_inputs' tensors (one batch
    element) and keys [0, slab_keys(hi, L, causal)) (keys from hi on are in every row's future),
    with the slab conv kernels, the pre mix and the softmax as one kernel (the softmax alone,
    in place, without a pre mix), the post mix as one kernel writing ``a`` in ``a_dtype``
    (default the slabs' dtype; without a post mix ``a`` is a1 in that dtype); with keep=False,
    both mixes of one group size and no post conv, the post mix in the softmax's kernel too. With
    ``pre_conv_operands`` (from slabs.pre_conv_operands) the pre conv is one matmul, its tiles
    near a causal diagonal the slab conv kernel's (which reads scores computed for the columns
    near the diagonal only, unless keep). Rows above lo read as zero, so rows from lo + the
    convs' row halos on are exact. Leaner than the
    reference: no masking pass, since the conv kernels read the causal future as zero (and
    zero it in the post conv's output) and the softmax kernel takes it as -inf. keep=False
    drops each intermediate once the next is made and returns the log-sum-exp (what the
    forward needs); the backward keeps those its weight gradients read (s0 for the pre conv's,
    c for the pre mix's; each None without that weight, since the softmax may overwrite it).
    ``lse_out`` (1, H, hi - lo), with keep=False and a pre mix: where the mix-softmax kernel
    writes the log-sum-exp (the returned lse is then that tensor). Causal talking heads' forward
    (both mixes of one group size fused with the softmax, no convs), its operands passing
    causal_matmul.tma_ok: ``skip_future_scores`` makes the scores with causal_matmul.causal_scores,
    which skips the tiles in every row's future; ``leave_a_future`` leaves ``a`` unwritten
    there, for causal_matmul.causal_pv."""
    pre_conv, pre_mix, post_conv, post_mix = weights
    keys = slab_keys(hi, kc.shape[2], causal)
    zero_above = lo if causal else None
    conv = functools.partial(key_query_conv, pad_key=pad_key, zero_above=zero_above, precision=precision)
    # (one batch element: a bmm of its (H, rows, D) and (H, D, keys) views, fewer host calls than
    # torch.matmul's 4-d broadcast)
    scores = lambda first: torch.bmm(qc[0].narrow(1, lo, hi - lo),
                                     kc[0].narrow(1, first, keys - first).transpose(1, 2)).unsqueeze(0)
    # talking heads in the forward: the post mix inside the softmax's kernel, no probs slab
    fused_post_mix = post_mix if (pre_mix is not None and post_mix is not None and post_conv is None
                                  and post_mix.shape == pre_mix.shape and not keep) else None
    causal_talking_heads = causal and fused_post_mix is not None and pre_conv is None
    leave_a_future = leave_a_future and causal_talking_heads
    if skip_future_scores and causal_talking_heads:
        H = qc.shape[1]
        scores = lambda first: causal_scores(qc[0], kc[0], scores_buffer(H, hi - lo, keys, qc.dtype, qc.device),
                                             row0=lo, zero_above=lo, precision=precision).unsqueeze(0)
    a_out = scores_buffer(qc.shape[1], hi - lo, keys, a_dtype or qc.dtype, qc.device).unsqueeze(0) if leave_a_future else None
    if pre_conv is not None and pre_conv_operands is not None:
        q_in, k_tilde, scale = pre_conv_operands
        c = pre_conv_matmul(q_in, k_tilde, lo, hi, keys, scale, zero_above, precision=precision, dtype=qc.dtype)
        # the scores the slab conv reads for the tiles near the diagonal: from the first column
        # they read on (all of them where the backward keeps s0 for the weight gradient)
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
        probs, lse = mix_softmax_rows(c, pre_mix, zero_above, want_lse=not keep, precision=mix_precision(precision),
                                      out=c if in_place else a_out, post_mix=fused_post_mix,
                                      out_dtype=a_dtype if fused_post_mix is not None else None, lse_out=lse_out,
                                      write_future=not leave_a_future)
        c = c if keep else None
        if fused_post_mix is not None:
            return SlabForward(None, None, None, None, probs, lse)
    else:
        # in place: c (or s0 when no conv made c), which nothing reads again
        probs, lse = softmax_rows_(c, zero_above, want_lse=not keep)
        c = None
    # (probabilities written in 16 bits for the post conv to read were slower: 4.03 against 3.88
    # ms forward at L=4096 on the H200, the conv kernel converting them to fp32 as it reads them)
    a1 = conv(probs, post_conv, mask_output=True) if post_conv is not None else probs
    probs = probs if keep else None
    if post_mix is not None:
        a = mix_rows(a1, post_mix, zero_above, precision=mix_precision(precision), out_dtype=a_dtype)
    else:
        a = a1
    a1 = a1 if keep else None
    return SlabForward(s0, c, probs, a1, a, lse)

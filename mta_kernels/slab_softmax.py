"""The softmax over the keys of a slab of logits, in place, with the causal mask built in.

The row-chunked paths (slabs.slab_forward) normalise slabs of pre-mixed logits (B, H, R, K):
rows lo.. of one batch element, keys 0..K-1. In PyTorch that took a masking pass, a max, a
subtraction, an exp, a sum and a division, each a pass over the slab (2.5 of the 9.5 ms of
full MTA's forward at L=4096 on the H200). Here one program per row reads the row's
unmasked part twice (online max and sum, then the normalised values) and writes it once,
zero on the future, and can return the row's log-sum-exp.
"""
import torch
import triton
import triton.language as tl

from .forward import _next_pow2
from .slab_conv import _NO_ZEROS


@triton.jit
def softmax_rows_kernel(x, lse, sb, sh, si, sj, H, R, K, ZERO_ABOVE,
                        WRITE_LSE: tl.constexpr, BLOCK: tl.constexpr):
    """x (B, H, R, K), any strides, overwritten row by row with softmax(x) over its last dim,
    where entries with col - row > ZERO_ABOVE count as -inf (and are written as zero);
    with WRITE_LSE, lse (B, H, R) contiguous gets each row's log-sum-exp. One program per
    row; every row must keep column 0 (ZERO_ABOVE >= 0)."""
    n = tl.program_id(0)
    bh, i = n // R, n % R
    row = x + (bh // H).to(tl.int64) * sb + (bh % H).to(tl.int64) * sh + i.to(tl.int64) * si
    end = tl.minimum(K, i + ZERO_ABOVE + 1)      # columns [0, end) are not masked
    cols = tl.arange(0, BLOCK)
    # online max and sum over the unmasked columns
    v = tl.load(row + cols * sj, mask=cols < end, other=float("-inf"))
    row_max = tl.max(v, axis=0)
    row_sum = tl.sum(tl.exp(v - row_max), axis=0)
    for c0 in range(BLOCK, end, BLOCK):
        v = tl.load(row + (c0 + cols) * sj, mask=c0 + cols < end, other=float("-inf"))
        new_max = tl.maximum(row_max, tl.max(v, axis=0))
        row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(v - new_max), axis=0)
        row_max = new_max
    inv_sum = 1.0 / row_sum
    for c0 in range(0, K, BLOCK):
        v = tl.load(row + (c0 + cols) * sj, mask=c0 + cols < end, other=float("-inf"))
        tl.store(row + (c0 + cols) * sj, tl.exp(v - row_max) * inv_sum, mask=c0 + cols < K)
    if WRITE_LSE:
        tl.store(lse + n, row_max + tl.log(row_sum))


def softmax_rows_(x: torch.Tensor, zero_above=None, want_lse=False):
    """Softmax of x (B, H, R, K) over its last dim, written over x, with entries where
    col - row > zero_above (a causal slab of rows lo.. has zero_above = lo) taken as -inf and
    written as zero; None: no mask. Returns (x, lse (B, H, R) in x's dtype or None)."""
    B, H, R, K = x.shape
    if zero_above is not None and zero_above < 0:
        raise ValueError(f"zero_above must be >= 0 (every row keeps its first key), got {zero_above}")
    lse = torch.empty(B, H, R, device=x.device, dtype=x.dtype) if want_lse else None
    if x.numel() == 0:
        return x, lse
    block = min(2048, max(16, _next_pow2(K)))
    softmax_rows_kernel[(B * H * R,)](
        x, lse if want_lse else x, *x.stride(), H, R, K, _NO_ZEROS if zero_above is None else zero_above,
        WRITE_LSE=want_lse, BLOCK=block, num_warps=4 if block <= 1024 else 8)
    return x, lse

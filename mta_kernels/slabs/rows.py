"""Host side of the slab row kernels (row_kernels.py): softmax, head mixes and their backward
over slabs (B, H, R, K) of materialized rows.

Common arguments: zero_above, an int Z such that entries with col - row > Z are the causal
future (a slab of rows lo.. has Z = lo; None: no such structure), which the kernels never
read; precision, tl.dot's input precision for fp32 math ("tf32", "tf32x3" or "ieee"; fp64 is
exact).
"""
import torch

from .. import configs
from ..utils import acc_dtype, next_pow2, tl_acc_dtype
from .row_kernels import (mix_backward_rows_kernel, mix_rows_kernel, mix_softmax_rows_kernel, softmax_rows_kernel,
                          talking_heads_backward_rows_kernel)

# zero_above=None: no causal structure (any value beyond every column offset would do)
NO_ZEROS = 2 ** 30


def row_kernel_zero_above(zero_above):
    """ZERO_ABOVE for the row kernels of the slab softmax and mixes: NO_ZEROS for None; a
    negative value is refused (every row of a causal slab keeps its first key)."""
    if zero_above is None:
        return NO_ZEROS
    if zero_above < 0:
        raise ValueError(f"zero_above must be >= 0 (every row keeps its first key), got {zero_above}")
    return zero_above


def row_block_elements(config, x) -> int:
    """The elements (heads x keys) of a row kernel's key block for slab x: config's
    'elements_16bit' for 16-bit x, else its 'elements'."""
    return config["elements_16bit"] if x.element_size() == 2 else config["elements"]


def softmax_rows_(x: torch.Tensor, zero_above=None, want_lse=False, scale=1.0):
    """Softmax of scale * x (B, H, R, K) over its last dim, written over x, with entries where
    col - row > zero_above taken as -inf and written as zero. x may be 16-bit: the math then
    runs in fp32. Returns (x, lse (B, H, R) in the math's dtype or None)."""
    B, H, R, K = x.shape
    zeros = row_kernel_zero_above(zero_above)
    lse = torch.empty(B, H, R, device=x.device, dtype=acc_dtype(x)) if want_lse else None
    if x.numel() == 0:
        return x, lse
    block = min(configs.SOFTMAX["max_block"], max(16, next_pow2(K)))
    softmax_rows_kernel[(B * H * R,)](
        x, lse if want_lse else x, *x.stride(), H, R, K, zeros, scale, MATH=tl_acc_dtype(x),
        WRITE_LSE=want_lse, BLOCK=block, num_warps=4 if block <= 1024 else 8)
    return x, lse


def _dots16(x: torch.Tensor) -> bool:
    """Whether the mixes may run as 16-bit dots in x's dtype: 16-bit x, and not bf16 under the
    interpreter (whose bf16 tl.dot is wrong)."""
    return x.element_size() == 2 and (x.is_cuda or x.dtype == torch.float16)


def mix_softmax_rows(x: torch.Tensor, w: torch.Tensor, zero_above=None, want_lse=False, precision="ieee",
                     out=None, post_mix=None, out_dtype=None, lse_out=None, lse_in=None, write_future=True):
    """softmax(mta_reference.mix_heads(x, w)) over the last dim: x (B, H, R, K), w (G, ch, ch)
    with H = G * ch, entries where col - row > zero_above taken as -inf and written as zero
    (None: no mask); with post_mix (G, ch, ch) that softmax mixed again,
    mix_heads(softmax(...), post_mix), without a slab in between. Written to ``out`` (B, H, R,
    K), which may be x itself (in place), or a new tensor of ``out_dtype`` (default x's).
    x may be 16-bit (scores rounded once, as a 16-bit reference rounds them): the mixes, the
    softmax and the lse then run in fp32. precision: tl.dot's for the mixes of fp32 math
    ("tf32", "tf32x3" or "ieee"; fp64 is exact). Returns (out, lse (B, H, R) in the math's dtype or None);
    with want_lse, ``lse_out`` (B, H, R) of that dtype with unit stride along R (a view into a
    longer lse, say) takes the lse instead of a new tensor. ``lse_in``, of the same layout:
    the rows' log-sum-exp, known (the backward's recomputation has the forward's), so that one
    sweep over the keys does (not with want_lse). write_future=False (with zero_above): the key
    blocks wholly in a row's causal future are left unwritten, for a reader that masks them
    (slabs.matmul.causal_pv), instead of written as zeros."""
    B, H, R, K = x.shape
    G, ch, _ = w.shape
    cd = acc_dtype(x)
    if post_mix is not None and post_mix.shape != w.shape:
        raise ValueError(f"post_mix must have the pre mix's shape {tuple(w.shape)}, got {tuple(post_mix.shape)}")
    zeros = row_kernel_zero_above(zero_above)
    out = torch.empty(x.shape, device=x.device, dtype=out_dtype or x.dtype) if out is None else out
    if want_lse and lse_in is not None:
        raise ValueError("lse_in gives the log-sum-exp: want_lse must be False with it")
    lse = None
    if want_lse:
        lse = torch.empty(B, H, R, device=x.device, dtype=cd) if lse_out is None else lse_out
    for given, name in ((lse, "lse_out"), (lse_in, "lse_in")):
        if given is not None and (given.shape != (B, H, R) or given.dtype != cd or (R > 1 and given.stride(2) != 1)):
            raise ValueError(f"{name} must be ({B}, {H}, {R}) of {cd} with unit stride along its last dim, "
                             f"got {tuple(given.shape)} of {given.dtype}, strides {given.stride()}")
    stats = lse if want_lse else lse_in
    if x.numel() == 0:
        return out, lse
    chp = max(16, next_pow2(ch))
    block = min(max(16, row_block_elements(configs.MIX_SOFTMAX, x) // chp), max(16, next_pow2(K)))
    w_post = w if post_mix is None else post_mix
    # the backward's recomputation from the forward's lse keeps the math of talking heads'
    # backward kernel, so that A is the same to the bit whichever gradients are wanted
    fast = lse_in is None
    mix_softmax_rows_kernel[(B * G * R,)](
        x, w.to(cd).contiguous(), w_post.to(cd).contiguous(), out, x if stats is None else stats,
        *x.stride(), *out.stride(), *((0, 0) if stats is None else stats.stride()[:2]), H, R, K, zeros,
        CH=ch, CHP=chp, WRITE_LSE=want_lse, READ_LSE=lse_in is not None, POST_MIX=post_mix is not None,
        WRITE_FUTURE=write_future or zero_above is None, BLOCK=block, MIX16=fast and _dots16(x),
        POST16=fast and _dots16(x) and post_mix is not None, EXP2=fast, LONGEST_FIRST=True,
        PREC="ieee" if x.dtype == torch.float64 else precision, num_warps=configs.MIX_SOFTMAX["num_warps"],
        num_stages=configs.MIX_SOFTMAX["num_stages"])
    return out, lse


def mix_rows(x: torch.Tensor, w: torch.Tensor, zero_above=None, precision="ieee", out_dtype=None):
    """The head mix of x, ``mta_reference.mix_heads(x, w)``, as a new tensor of ``out_dtype``
    (default x's): x (B, H, R, K), w (G, ch, ch) with H = G * ch; entries of x where
    col - row > zero_above are taken as zero (None: all are read). precision: tl.dot's for
    fp32 slabs ("tf32", "tf32x3" or "ieee"; fp64 is exact). Returns (B, H, R, K)."""
    B, H, R, K = x.shape
    G, ch, _ = w.shape
    zeros = row_kernel_zero_above(zero_above)
    out = torch.empty(x.shape, device=x.device, dtype=out_dtype or x.dtype)
    if x.numel() == 0:
        return out
    chp = max(16, next_pow2(ch))
    block = min(max(16, row_block_elements(configs.MIX, x) // chp), max(16, next_pow2(K)))
    mix_rows_kernel[(B * G * R,)](
        x, w.to(x.dtype).contiguous(), out, *x.stride(), *out.stride(), H, R, K, zeros,
        CH=ch, CHP=chp, BLOCK=block, PREC="ieee" if x.dtype == torch.float64 else precision,
        num_warps=configs.MIX["num_warps"], num_stages=configs.MIX["num_stages"])
    return out


def mix_backward_rows(grad: torch.Tensor, w: torch.Tensor, x=None, probs=None, zero_above=None, rows=None,
                      precision="ieee", out=None, dw_rows=None):
    """Backward of the head mix ``mta_reference.mix_heads(x, w)`` for slabs (B, H, R, K) and
    w (G, ch, ch), H = G * ch, with incoming gradient ``grad``, or, given ``probs`` (the
    softmax P the mix was applied to), the gradient before that softmax: P * (grad -
    rowsum(P * grad)). The incoming gradient is taken as zero where col - row > zero_above
    (None: nowhere), as the causal slabs are.

    Returns (dx, dw): dx (B, H, R, K) written to ``out`` (grad itself allowed: in place) or
    a new tensor, zero where the gradient is; dw (G, ch, ch) summed over the batch, the rows
    ``rows`` = (lo, hi) of the slab (all by default) and the keys, in a fixed order, or None
    without x. With dw_rows = (buffer (B, G, N, ch, ch) contiguous, row0), each of those rows
    i writes its share to row row0 + i of the buffer instead, and dw is None: the caller sums
    the buffer once (the row-chunked backward, one sum for all its chunks). The slabs may be
    16-bit: the math then runs in fp32, and dw (and the buffer) are fp32. precision: tl.dot's
    for the fp32 math ("tf32", "tf32x3" or "ieee"; fp64 is exact)."""
    B, H, R, K = grad.shape
    G, ch, _ = w.shape
    zeros = row_kernel_zero_above(zero_above)
    out = torch.empty_like(grad) if out is None else out
    lo, hi = rows or (0, R)
    summed = x is not None and dw_rows is None
    math = acc_dtype(grad)
    if grad.numel() == 0:
        return out, torch.zeros(G, ch, ch, device=grad.device, dtype=math) if summed else None
    if x is None:
        partial, row0 = grad, 0
    elif dw_rows is not None:
        partial, row0 = dw_rows
        _row_buffer(partial, B, G, ch, row0 + hi, "dw_rows")
    else:
        partial, row0 = torch.empty(B, G, R, ch, ch, device=grad.device, dtype=math), 0
    chp = max(16, next_pow2(ch))
    block = min(max(16, row_block_elements(configs.MIX_BACKWARD, grad) // chp), max(16, next_pow2(K)))
    mix_backward_rows_kernel[(B * G * R,)](
        grad, grad if probs is None else probs, grad if x is None else x, w.to(math).contiguous(), out, partial,
        *grad.stride(), *(grad if probs is None else probs).stride(), *(grad if x is None else x).stride(),
        *out.stride(), H, R, K, zeros, lo, hi, row0, partial.shape[2] if x is not None else R,
        CH=ch, CHP=chp, SOFTMAX=probs is not None, WANT_DW=x is not None, BLOCK=block,
        PREC="ieee" if grad.dtype == torch.float64 else precision, num_warps=configs.MIX_BACKWARD["num_warps"],
        num_stages=configs.MIX_BACKWARD["num_stages"])
    return out, partial[:, :, lo:hi].sum((0, 2)) if summed else None


def _row_buffer(buffer, B, G, ch, rows_needed, name):
    """Checks a per-row weight-gradient buffer (B, G, N, ch, ch), contiguous, N >= rows_needed."""
    N = buffer.shape[2] if buffer.dim() == 5 else -1
    if not buffer.is_contiguous() or tuple(buffer.shape) != (B, G, N, ch, ch) or N < rows_needed:
        raise ValueError(f"{name} must hold a contiguous ({B}, {G}, N, {ch}, {ch}) buffer with "
                         f"N >= {rows_needed}, got {tuple(buffer.shape)}")
    return buffer


def talking_heads_backward_rows(da: torch.Tensor, s: torch.Tensor, lse: torch.Tensor, w_pre: torch.Tensor,
                                w_post: torch.Tensor, zero_above=None, precision="ieee", out=None,
                                dw_pre_rows=None, dw_post_rows=None, row0=0, a_out=None) -> torch.Tensor:
    """Talking heads' backward on slabs (B, H, R, K): the gradient of the scores s (the pre
    mix's input) from da, the gradient of A = mix_heads(softmax(mix_heads(s, w_pre)), w_post),
    with the softmax's rows given by the forward's log-sum-exp ``lse`` (B, H, R) (unit stride
    along R), entries where col - row > zero_above masked (None: none). w_pre, w_post (G, ch,
    ch); s and da may be 16-bit (the math runs in w_pre's dtype). Written to ``out`` (da itself
    allowed: in place) or a new tensor of w_pre's dtype. dw_pre_rows / dw_post_rows: buffers
    (B, G, N, ch, ch) whose rows row0 + i (i < R) get each slab row's share of the weight
    gradients (None: not computed); the caller sums them. ``a_out`` (B, H, R, K), of any dtype
    and strides, gets A on the way (zero in the causal future), for dV = A^T dO without a
    recomputation of its own. precision: tl.dot's for fp32 math ("tf32", "tf32x3" or "ieee";
    fp64 is exact). Returns out."""
    B, H, R, K = da.shape
    G, ch, _ = w_pre.shape
    if s.shape != da.shape or w_post.shape != w_pre.shape:
        raise ValueError(f"s must have da's shape {tuple(da.shape)} and w_post w_pre's {tuple(w_pre.shape)}, "
                         f"got {tuple(s.shape)} and {tuple(w_post.shape)}")
    if lse.shape != (B, H, R) or (R > 1 and lse.stride(2) != 1):
        raise ValueError(f"lse must be ({B}, {H}, {R}) with unit stride along its last dim, got "
                         f"{tuple(lse.shape)}, strides {lse.stride()}")
    if a_out is not None and a_out.shape != da.shape:
        raise ValueError(f"a_out must have da's shape {tuple(da.shape)}, got {tuple(a_out.shape)}")
    out = torch.empty(da.shape, device=da.device, dtype=w_pre.dtype) if out is None else out
    if da.numel() == 0:
        return out
    buffers = [None if x is None else _row_buffer(x, B, G, ch, row0 + R, name)
               for x, name in ((dw_pre_rows, "dw_pre_rows"), (dw_post_rows, "dw_post_rows"))]
    dw_rows = next((x for x in buffers if x is not None), None)
    if all(x is not None for x in buffers) and buffers[0].shape != buffers[1].shape:
        raise ValueError(f"dw_pre_rows and dw_post_rows must have one shape, got {tuple(buffers[0].shape)} "
                         f"and {tuple(buffers[1].shape)}")
    cd = w_pre.dtype
    chp = max(16, next_pow2(ch))
    config = configs.TALKING_HEADS_BACKWARD
    block = min(max(16, config["elements"] // chp), max(16, next_pow2(K)))
    talking_heads_backward_rows_kernel[(B * G * R,)](
        da, s, lse, w_pre.contiguous(), w_post.to(cd).contiguous(), out,
        da if buffers[0] is None else buffers[0], da if buffers[1] is None else buffers[1],
        da if a_out is None else a_out, *da.stride(), *s.stride(), *lse.stride()[:2], *out.stride(),
        *(da if a_out is None else a_out).stride(), H, R, K, row_kernel_zero_above(zero_above),
        row0, 0 if dw_rows is None else dw_rows.shape[2],
        CH=ch, CHP=chp, WANT_DW_PRE=buffers[0] is not None, WANT_DW_POST=buffers[1] is not None,
        WRITE_A=a_out is not None, BLOCK=block,
        PREC="ieee" if cd == torch.float64 else precision, num_warps=config["num_warps"],
        num_stages=config["num_stages"])
    return out

"""The softmax over the keys of a slab of logits, in place, with the causal mask built in.

The row-chunked paths (slabs.slab_forward) normalise slabs of pre-mixed logits (B, H, R, K):
rows lo.. of one batch element, keys 0..K-1. In PyTorch that took a masking pass, a max, a
subtraction, an exp, a sum and a division, each a pass over the slab (2.5 of the 9.5 ms of
full MTA's forward at L=4096 on the H200). Here one program per row reads the row's
unmasked part twice (online max and sum, then the normalised values) and writes it once,
zero on the future, and can return the row's log-sum-exp.

With head mixing before the softmax, mix_softmax_rows does both in one kernel: a program
holds one row of every head of a mixing group and mixes each block of keys as it reads it
(a [heads, heads] x [heads, keys] tl.dot), so the mixed logits never go to memory (a
batched matmul over the slab wrote and re-read them: about 0.18 ms per 1365-row chunk at
L=4096 on the H200).
"""
import torch
import triton
import triton.language as tl

from .forward import _next_pow2, acc_dtype, tl_acc_dtype
from .slab_conv import row_kernel_zero_above
from .slab_mix import group_row, group_row_program, load_end, row_block_elements


@triton.jit
def _masked_block(row, cols, end, loaded, sj, MATH: tl.constexpr):
    """[BLOCK] columns cols of a row in MATH, -inf at cols >= end (loaded up to load_end)."""
    v = tl.load(row + cols * sj, mask=cols < loaded, other=0.0).to(MATH)
    return tl.where(cols < end, v, float("-inf"))


@triton.jit
def softmax_rows_kernel(x, lse, sb, sh, si, sj, H, R, K, ZERO_ABOVE,
                        MATH: tl.constexpr, WRITE_LSE: tl.constexpr, BLOCK: tl.constexpr):
    """x (B, H, R, K), any strides, overwritten row by row with softmax(x) over its last dim,
    where entries with col - row > ZERO_ABOVE count as -inf (and are written as zero);
    with WRITE_LSE, lse (B, H, R) contiguous gets each row's log-sum-exp. The math runs in
    MATH (fp32 for 16-bit x; lse's dtype). One program per row; every row must keep column 0
    (ZERO_ABOVE >= 0)."""
    n = tl.program_id(0)
    bh, i = n // R, n % R
    row = x + (bh // H).to(tl.int64) * sb + (bh % H).to(tl.int64) * sh + i.to(tl.int64) * si
    end = tl.minimum(K, i + ZERO_ABOVE + 1)      # columns [0, end) are not masked
    loaded = load_end(end, K)
    cols = tl.arange(0, BLOCK)
    # online max and sum over the unmasked columns
    v = _masked_block(row, cols, end, loaded, sj, MATH)
    row_max = tl.max(v, axis=0)
    row_sum = tl.sum(tl.exp(v - row_max), axis=0)
    for c0 in range(BLOCK, end, BLOCK):
        v = _masked_block(row, c0 + cols, end, loaded, sj, MATH)
        new_max = tl.maximum(row_max, tl.max(v, axis=0))
        row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(v - new_max), axis=0)
        row_max = new_max
    inv_sum = 1.0 / row_sum
    for c0 in range(0, K, BLOCK):
        v = _masked_block(row, c0 + cols, end, loaded, sj, MATH)
        tl.store(row + (c0 + cols) * sj, (tl.exp(v - row_max) * inv_sum).to(x.dtype.element_ty), mask=c0 + cols < K)
    if WRITE_LSE:
        tl.store(lse + n, row_max + tl.log(row_sum))


def softmax_rows_(x: torch.Tensor, zero_above=None, want_lse=False):
    """Softmax of x (B, H, R, K) over its last dim, written over x, with entries where
    col - row > zero_above (a causal slab of rows lo.. has zero_above = lo) taken as -inf and
    written as zero; None: no mask. x may be 16-bit: the math then runs in fp32. Returns (x,
    lse (B, H, R) in the math's dtype or None)."""
    B, H, R, K = x.shape
    zeros = row_kernel_zero_above(zero_above)
    lse = torch.empty(B, H, R, device=x.device, dtype=acc_dtype(x)) if want_lse else None
    if x.numel() == 0:
        return x, lse
    block = min(2048, max(16, _next_pow2(K)))
    softmax_rows_kernel[(B * H * R,)](
        x, lse if want_lse else x, *x.stride(), H, R, K, zeros, MATH=tl_acc_dtype(x),
        WRITE_LSE=want_lse, BLOCK=block, num_warps=4 if block <= 1024 else 8)
    return x, lse


# mix_softmax_rows' key block holds about this many elements (heads x keys), and its warps.
# H200, one 1365-row chunk of 16 heads by 2736 keys (scripts/tune.py mixsoftmax,
# notes/tune_mixsoftmax_h200_be43e22.log): 2048 / 4 warps 0.213 ms, 4096 / 4 0.226,
# 8192 / 8 0.303, 16384 / 8 0.340; the batched-matmul mix and slab softmax 0.384. On bf16 slabs
# 4096 elements (slab_mix.MIX_CONFIG's note).
MIX_SOFTMAX_CONFIG = dict(elements=2048, elements_16bit=4096, num_warps=4, num_stages=3)
# How mix_softmax_rows_kernel computes (module switches, for A/B runs in one process). H200,
# talking heads' forward at L=4096, B=1, H=16, D=128, bf16, causal, as replayed CUDA graphs
# (scripts/th_forward_variants.py; notes/th_variants_h200_ad3b86b.log and _f484ed1.log), each
# on top of the one before: tf32 mixes 0.527-0.529 ms; MIX16 and LONGEST_FIRST 0.491-0.495;
# EXP2 0.487-0.488; POST16 too 0.473-0.477. The mix-softmax had issued one instruction per 5.4
# cycles per warp at 58% of DRAM bandwidth (notes/ncu_mixsoftmax_h200_ebcc3c0.log): fewer
# instructions per element pay.
# MIX16: the pre mix of 16-bit slabs as two 16-bit dots on the weight's high and low parts (16
# mantissa bits in bf16, more than TF32's 10), the slab as it is, no conversion to fp32.
MIX16 = True
# POST16: the post mix likewise, on the probabilities rounded to the slab's dtype (as the 16-bit
# reference rounds them before its post mix; A is rounded to it after the mix either way).
POST16 = True
# EXP2: logits in base 2 (log2(e) folded into the pre mix's weight), exp2 per element.
EXP2 = True
# LONGEST_FIRST: programs take the rows of a causal slab last row first, the longest first, so
# that the shortest end the grid instead of the longest.
LONGEST_FIRST = True


LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _exp(x, BASE2: tl.constexpr):
    """exp2(x) with BASE2 (x already in base-2 units), else exp(x)."""
    if BASE2:
        return tl.exp2(x)
    return tl.exp(x)


@triton.jit
def _split16(w, dtype: tl.constexpr):
    """(hi, lo): w (fp32) as the sum of two values of 16-bit dtype, hi = w rounded and lo the
    rest rounded (16 mantissa bits in bf16 together, more than TF32's 10), for two 16-bit dots
    with fp32 sums in place of one on fp32 operands."""
    hi = w.to(dtype)
    return hi, (w - hi.to(w.dtype)).to(dtype)


@triton.jit
def _mixed_block(src, w_g, w_lo, cols, end, loaded, head_ok, sj, PREC: tl.constexpr, MIX16: tl.constexpr):
    """[CHP, BLOCK] mixed logits sum_c w_g[o, c] x[c, cols] of one row in fp32 (fp64 for fp64),
    -inf at cols >= end (loaded up to load_end). With MIX16, x is 16-bit and w_g, w_lo are the
    16-bit high and low parts of the weight: two 16-bit dots with fp32 sums, x as it is."""
    x = tl.load(src + cols[None, :] * sj, mask=head_ok[:, None] & (cols[None, :] < loaded), other=0.0)
    if MIX16:
        m = tl.dot(w_lo, x, tl.dot(w_g, x))
    else:
        m = tl.dot(w_g, x.to(w_g.dtype), input_precision=PREC)
    return tl.where(cols[None, :] < end, m, float("-inf"))


@triton.jit
def mix_softmax_rows_kernel(x, w, w_post, out, lse, sxb, sxh, sxi, sxj, sob, soh, soi, soj, slb, slh,
                            H, R, K, ZERO_ABOVE, CH: tl.constexpr, CHP: tl.constexpr, WRITE_LSE: tl.constexpr,
                            READ_LSE: tl.constexpr, POST_MIX: tl.constexpr, WRITE_FUTURE: tl.constexpr,
                            BLOCK: tl.constexpr, PREC: tl.constexpr, MIX16: tl.constexpr, POST16: tl.constexpr,
                            EXP2: tl.constexpr, LONGEST_FIRST: tl.constexpr):
    """out (B, H, R, K) = softmax over keys of the head mix of x (B, H, R, K) with w (G, CH, CH)
    (out[o] = sum_c w[g, o, c] x[c] within group g), entries with col - row > ZERO_ABOVE taken
    as -inf and written as zero; out may be x (each program reads a block of its rows before
    it writes it). With POST_MIX, out is that softmax mixed again with w_post (G, CH, CH), in
    out's dtype. With WRITE_LSE, lse (B, H, R) with strides (slb, slh, 1) gets each row's
    log-sum-exp (of the first mix's logits); with READ_LSE it holds them already (from the
    forward), and one sweep over the keys normalises with them. Without WRITE_FUTURE, the
    key blocks past the row's last key are left unwritten (for causal_matmul.causal_pv, which
    masks them). The math runs in w's dtype (fp32 for 16-bit x); with MIX16 (POST16) the pre
    (post) mix is two dots in x's 16-bit dtype on w's high and low parts, with EXP2 the logits are
    in base 2 (the lse written and read stays natural). One program per (batch, group, row),
    with LONGEST_FIRST the last rows first; CHP: CH rounded up to a power of two >= 16."""
    b, g, i, hh, head_ok = group_row_program(H, R, CH, CHP)
    if LONGEST_FIRST:
        i = R - 1 - i
    heads = g * CH + hh
    src = group_row(x, b, g, i, hh, sxb, sxh, sxi, CH)
    dst = group_row(out, b, g, i, hh, sob, soh, soi, CH)
    w_ok = head_ok[:, None] & head_ok[None, :]
    w_g = tl.load(w + g * CH * CH + hh[:, None] * CH + hh[None, :], mask=w_ok, other=0.0)
    if EXP2:
        w_g = w_g * LOG2E       # logits in base 2: exp2 below, no multiply per element
    w_lo = w_g
    if MIX16:
        w_g, w_lo = _split16(w_g, x.dtype.element_ty)
    if POST_MIX:
        # zero columns for the padding heads, whose softmax is not zero
        w_post_g = tl.load(w_post + g * CH * CH + hh[:, None] * CH + hh[None, :], mask=w_ok, other=0.0)
        w_post_lo = w_post_g
        if POST16:
            w_post_g, w_post_lo = _split16(w_post_g, x.dtype.element_ty)
    end = tl.minimum(K, i + ZERO_ABOVE + 1)      # columns [0, end) are not masked
    loaded = load_end(end, K)
    cols = tl.arange(0, BLOCK)
    lse_at = lse + b.to(tl.int64) * slb + heads.to(tl.int64) * slh + i
    if READ_LSE:
        row_max = tl.load(lse_at, mask=head_ok, other=0.0)
        if EXP2:
            row_max = row_max * LOG2E
        inv_sum = tl.full([CHP], 1.0, dtype=row_max.dtype)
    else:
        # online max and sum per head over the unmasked columns (padding heads mix to zeros)
        m = _mixed_block(src, w_g, w_lo, cols, end, loaded, head_ok, sxj, PREC, MIX16)
        row_max = tl.max(m, axis=1)
        row_sum = tl.sum(_exp(m - row_max[:, None], EXP2), axis=1)
        for c0 in range(BLOCK, end, BLOCK):
            m = _mixed_block(src, w_g, w_lo, c0 + cols, end, loaded, head_ok, sxj, PREC, MIX16)
            new_max = tl.maximum(row_max, tl.max(m, axis=1))
            row_sum = row_sum * _exp(row_max - new_max, EXP2) + tl.sum(_exp(m - new_max[:, None], EXP2), axis=1)
            row_max = new_max
        inv_sum = 1.0 / row_sum
    for c0 in range(0, K if WRITE_FUTURE else end, BLOCK):
        m = _mixed_block(src, w_g, w_lo, c0 + cols, end, loaded, head_ok, sxj, PREC, MIX16)
        p = _exp(m - row_max[:, None], EXP2) * inv_sum[:, None]
        if POST_MIX:
            if POST16:
                p16 = p.to(x.dtype.element_ty)
                p = tl.dot(w_post_lo, p16, tl.dot(w_post_g, p16))
            else:
                p = tl.dot(w_post_g, p, input_precision=PREC)
        tl.store(dst + (c0 + cols)[None, :] * soj, p.to(out.dtype.element_ty),
                 mask=head_ok[:, None] & (c0 + cols[None, :] < K))
    if WRITE_LSE:
        if EXP2:
            tl.store(lse_at, (row_max + tl.log2(row_sum)) * LN2, mask=head_ok)
        else:
            tl.store(lse_at, row_max + tl.log(row_sum), mask=head_ok)


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
    ("tf32" or "ieee"; fp64 is exact). Returns (out, lse (B, H, R) in the math's dtype or None);
    with want_lse, ``lse_out`` (B, H, R) of that dtype with unit stride along R (a view into a
    longer lse, say) takes the lse instead of a new tensor. ``lse_in``, of the same layout:
    the rows' log-sum-exp, known (the backward's recomputation has the forward's), so that one
    sweep over the keys does (not with want_lse). write_future=False (with zero_above): the key
    blocks wholly in a row's causal future are left unwritten, for a reader that masks them
    (causal_matmul.causal_pv), instead of written as zeros."""
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
    chp = max(16, _next_pow2(ch))
    block = min(max(16, row_block_elements(MIX_SOFTMAX_CONFIG, x) // chp), max(16, _next_pow2(K)))
    w_post = w if post_mix is None else post_mix
    # the backward's recomputation from the forward's lse keeps the math of talking heads'
    # backward kernel, so that A is the same to the bit whichever gradients are wanted
    fast = lse_in is None
    mix_softmax_rows_kernel[(B * G * R,)](
        x, w.to(cd).contiguous(), w_post.to(cd).contiguous(), out, x if stats is None else stats,
        *x.stride(), *out.stride(), *((0, 0) if stats is None else stats.stride()[:2]), H, R, K, zeros,
        CH=ch, CHP=chp, WRITE_LSE=want_lse, READ_LSE=lse_in is not None, POST_MIX=post_mix is not None,
        WRITE_FUTURE=write_future or zero_above is None, BLOCK=block, MIX16=fast and MIX16 and _dots16(x),
        POST16=fast and POST16 and _dots16(x) and post_mix is not None, EXP2=fast and EXP2, LONGEST_FIRST=LONGEST_FIRST,
        PREC="ieee" if x.dtype == torch.float64 else precision, num_warps=MIX_SOFTMAX_CONFIG["num_warps"],
        num_stages=MIX_SOFTMAX_CONFIG["num_stages"])
    return out, lse

"""The post-softmax head mix of a slab as one Triton kernel that can write a 16-bit result.

The row-chunked paths (slabs.slab_forward) mix slabs (B, H, R, K) of one batch element:
out[o] = sum_c w[g, o, c] x[c] within each group g of ch heads. As a batched matmul that
read and wrote fp32 slabs (about 0.24 ms per 1365-row chunk at L=4096 on the H200), and the
product with V then read the fp32 result again. Here a program holds one row of every head
of a group, mixes a block of keys per tl.dot ([heads, heads] x [heads, keys]), skips the
keys a causal slab holds as zero, and writes the result in the dtype asked for: q's 16-bit
dtype in the forward, so that A V runs on 16-bit tensor cores, as flash attention rounds P
before P V.
"""
import torch
import triton
import triton.language as tl

from .forward import _next_pow2
from .slab_conv import row_kernel_zero_above

# key block of about this many elements (heads x keys) for fp32 slabs and for 16-bit ones, and the
# warps. H200, a 1365-row chunk of 16 heads by 2736 keys in bf16 (scripts/tune.py mix16,
# notes/tune_mix16_h200_bc31bc2.log): 4096 elements / 4 warps 0.080 ms, 2048 0.089, 8192 0.081; for
# the pre mix's softmax 0.145 against 0.153 (8192: 0.179), the mix backward 0.285 against 0.305.
# With the loads vectorized (load_end; scripts/tune.py rows16, notes/tune_rows16_h200_c9f2df8.log,
# against the same kernels with 2-byte loads): post mix 0.068 against 0.080 ms (stages 1: 0.074,
# 8192 elements 0.066), pre mix's softmax 0.103 against 0.145 (stages 1 / 2: 0.119), talking
# heads' mix-softmax 0.228 against 0.330 on rows 2048..4096 of L=4096 (stages 1: 0.267), its
# recomputation 0.139 against 0.193; the mix backward 0.210 with 1 stage against 0.281 with 3
# (and 0.283 before).
MIX_CONFIG = dict(elements=2048, elements_16bit=4096, num_warps=4, num_stages=3)


def row_block_elements(config, x) -> int:
    """The elements (heads x keys) of a row kernel's key block for slab x: config's
    'elements_16bit' for 16-bit x, else its 'elements'."""
    return config["elements_16bit"] if x.element_size() == 2 else config["elements"]


@triton.jit
def group_row_program(H, R, CH: tl.constexpr, CHP: tl.constexpr):
    """(b, g, i, hh, head_ok) of this program where a program holds row i of the CH heads of
    group g in batch element b of (B, H, R, K) slabs (the grid is B * H / CH * R programs):
    hh = arange(CHP), the heads g * CH + hh, head_ok where hh < CH (CHP: CH padded)."""
    n = tl.program_id(0)
    G = H // CH
    bg, i = n // R, n % R
    hh = tl.arange(0, CHP)
    return bg // G, bg % G, i, hh, hh < CH


@triton.jit
def group_row(ptr, b, g, i, hh, sb, sh, si, CH: tl.constexpr):
    """[CHP, 1] pointers to row i of heads g * CH + hh of batch element b in a (B, H, R, K)
    tensor with strides (sb, sh, si, .)."""
    heads = (g * CH + hh)[:, None].to(tl.int64)
    return ptr + b.to(tl.int64) * sb + heads * sh + i.to(tl.int64) * si


@triton.jit
def load_end(end, K):
    """The columns [0, load_end) a row kernel loads where it uses columns [0, end) of a row of K:
    end rounded up to a multiple of 16, at most K. The kernel masks the columns in between
    with tl.where after the load; a load mask ending at ``end`` itself changes within a
    16-column run, so each element became a load of its own (2-byte loads for 16-bit slabs)."""
    return tl.minimum(K, tl.cdiv(end, 16) * 16)


@triton.jit
def mix_rows_kernel(x, w, out, sxb, sxh, sxi, sxj, sob, soh, soi, soj, H, R, K, ZERO_ABOVE,
                    CH: tl.constexpr, CHP: tl.constexpr, BLOCK: tl.constexpr, PREC: tl.constexpr):
    """out (B, H, R, K) = the head mix of x (B, H, R, K) with w (G, CH, CH): out[o] = sum_c
    w[g, o, c] x[c] within group g, x taken as zero where col - row > ZERO_ABOVE; any strides,
    out in its own dtype. One program per (batch, group, row); CHP: CH rounded up to a power
    of two >= 16."""
    b, g, i, hh, head_ok = group_row_program(H, R, CH, CHP)
    src = group_row(x, b, g, i, hh, sxb, sxh, sxi, CH)
    dst = group_row(out, b, g, i, hh, sob, soh, soi, CH)
    w_ok = head_ok[:, None] & head_ok[None, :]
    w_g = tl.load(w + g * CH * CH + hh[:, None] * CH + hh[None, :], mask=w_ok, other=0.0).to(x.dtype.element_ty)
    end = tl.minimum(K, i + ZERO_ABOVE + 1)      # columns [end, K) are zero
    loaded = load_end(end, K)
    cols = tl.arange(0, BLOCK)
    for c0 in range(0, K, BLOCK):
        c = c0 + cols
        block = tl.load(src + c[None, :] * sxj, mask=head_ok[:, None] & (c[None, :] < loaded), other=0.0)
        mixed = tl.where(c[None, :] < end, tl.dot(w_g, block, input_precision=PREC), 0.0)
        tl.store(dst + c[None, :] * soj, mixed.to(out.dtype.element_ty), mask=head_ok[:, None] & (c[None, :] < K))


def mix_rows(x: torch.Tensor, w: torch.Tensor, zero_above=None, precision="ieee", out_dtype=None):
    """The head mix of x, ``mta_reference.mix_heads(x, w)``, as a new tensor of ``out_dtype``
    (default x's): x (B, H, R, K), w (G, ch, ch) with H = G * ch; entries of x where
    col - row > zero_above are taken as zero (None: all are read). precision: tl.dot's for
    fp32 slabs ("tf32" or "ieee"; fp64 is exact). Returns (B, H, R, K)."""
    B, H, R, K = x.shape
    G, ch, _ = w.shape
    zeros = row_kernel_zero_above(zero_above)
    out = torch.empty(x.shape, device=x.device, dtype=out_dtype or x.dtype)
    if x.numel() == 0:
        return out
    chp = max(16, _next_pow2(ch))
    block = min(max(16, row_block_elements(MIX_CONFIG, x) // chp), max(16, _next_pow2(K)))
    mix_rows_kernel[(B * G * R,)](
        x, w.to(x.dtype).contiguous(), out, *x.stride(), *out.stride(), H, R, K, zeros,
        CH=ch, CHP=chp, BLOCK=block, PREC="ieee" if x.dtype == torch.float64 else precision,
        num_warps=MIX_CONFIG["num_warps"], num_stages=MIX_CONFIG["num_stages"])
    return out

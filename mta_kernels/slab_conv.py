"""Host side of conv_kernels.py: drop-in replacements for mta_reference's key-query conv and
its gradients (same leading arguments), for slabs of materialized scores (B, H, R, L).

Common keyword arguments:
  zero_above: an int Z; the inputs (x and the gradient) are read as zero wherever
      col - row > Z (a causal slab of rows lo.. has Z = lo), and tiles that would read only
      there are skipped. None: no such structure.
  precision: tl.dot input precision for fp32 slabs, "tf32" or "ieee" (fp64 is always exact).
"""
import functools

import torch
from triton.tools.tensor_descriptor import TensorDescriptor

from mta_reference.validate import left_pad

from .conv_kernels import (kq_conv_kernel, kq_conv_strip_kernel, kq_conv_weight_grad_kernel,
                           kq_conv_weight_grad_strip_kernel)
from .forward import _next_pow2, acc_dtype, cdiv, tl_acc_dtype

# zero_above=None: no zero structure (any value beyond every column offset would do)
_NO_ZEROS = 2 ** 30


def row_kernel_zero_above(zero_above):
    """ZERO_ABOVE for the row kernels of the slab softmax and mixes: _NO_ZEROS for None; a
    negative value is refused (every row of a causal slab keeps its first key)."""
    if zero_above is None:
        return _NO_ZEROS
    if zero_above < 0:
        raise ValueError(f"zero_above must be >= 0 (every row keeps its first key), got {zero_above}")
    return zero_above

# Launch configurations: the largest tile [BR, BC], column tiles per weight-gradient program,
# and Triton's options. H200, one causal slab of 302 x 4096, 16 heads, fp32 (scripts/tune.py
# slabconv). At 1b475ba, after the loads were vectorized (notes/tune_slabconv_h200_1b475ba.log,
# two runs): conv 0.142 / 0.132 ms and its input gradient 0.149 / 0.137 at 64x32 with 4 warps
# and 1 stage (64x64 0.162-0.164 / 0.157-0.181, 128x32 0.171-0.179 / 0.160-0.169, 128x64 with
# 8 warps 0.189-0.240, 128x16 0.196-0.203); weight gradient 0.209-0.210 ms at 32 rows, 16 tiles
# per program, 4 warps, 1 stage (64 rows 0.230-0.235, with 2 stages 0.209-0.211, 8 tiles
# 0.246-0.247, 128 rows with 8 warps 0.311-0.312). Before that, with 4-byte loads, 64x64 was
# best (0.197 / 0.210 ms, notes/tune_slabconv_h200_c96e620.log). Toeplitz matrices built on the
# host and loaded per tile were slower both times (0892a2f: 0.295 ms; branch
# exp/conv-toeplitz-table, contiguous 16-byte loads: 0.266 against 0.164 ms at 64x64).
# At b78801e (notes/tune_slabconv_h200_b78801e.log) unrolling the loop over query offsets
# fully (unroll = CQ, 6 here) took the 64x32 conv to 0.129 ms (0.128 input gradient) against
# 0.142 (0.149) rolled; unroll 2 or 3 0.18, 2 stages 0.157; on the whole path full MTA at
# L=4096 5.62 / 18.61 ms forward / backward against 6.07 / 19.55 rolled.
CONV_CONFIG = dict(BR=64, BC=32, num_warps=4, num_stages=1, unroll="full")
# 16-bit slabs (with cq up to MAX_FULL_UNROLL) take kq_conv_strip_kernel, with CONV_CONFIG's tile
# and warps: a program per strip of TILES column tiles, the tiles clear of the causal diagonal
# loaded by TMA (where the GPU has it, sm_90 on, and x's strides let it) with registers capped at
# maxnreg, else by pointers under maxnreg_without_tma. H200, a bf16 slab of 1044 x 2048, conv /
# input gradient (scripts/tune.py slabconvtiles; notes/tune_slabconvtiles_h200_34481c8.log, _2f33b77.log,
# _ae52132.log, _c8576e3.log): TMA 0.131 / 0.130 ms at 96 registers (80: 0.141, 112: 0.142, 128:
# 0.140, 160: 0.156, uncapped 0.200); pointers 0.149 / 0.151 at 128 (96: 0.173, uncapped 0.185 /
# 0.179); a program per tile (kq_conv_kernel) 0.214 / 0.195. 8 tiles per strip (4 or 16: 0.137 /
# 0.140 at TMA and 128 registers); pipelining the clear tiles' loop (clean_stages 2: 0.204 / 0.216
# ms), 128-row tiles, two offsets per dot (group 2, pointers only: 0.159 / 0.155 uncapped, 0.169 /
# 0.165 at 128) were slower. (A rewrite of the kernel spilling 572 instead of 336 bytes at 96
# registers took 0.146 / 0.144 ms, notes/tune_slabconvtiles_h200_bc31bc2.log: the kernel is as
# timed.) Full MTA at L=4096 (bench processes of their own, two rounds, notes/caps_ab_h200_c8576e3.log):
# forward / fwd+bwd 2.29 / 10.94 and 2.30 / 10.50 ms with TMA at 96 registers, 2.37 / 11.56 and
# 2.37 / 11.81 with pointers at 128, 2.59 / 11.65 and 2.58 / 11.68 uncapped, against 2.80 / 12.28 a
# program per tile (notes/tiles_ab_h200_ae52132.log). TILES=0: a program per tile.
STRIP_CONV_CONFIG = dict(TILES=8, tma=True, maxnreg=96, maxnreg_without_tma=128, group=1, clean_stages=1)
# (the weight gradient's column tiles are 2 * halo wide: 32 for the paper's convs)
# At 2e57d89 (notes/tune_slabconv_h200_maxnreg_2e57d89.log) the weight gradient took 0.154 ms
# at 64 rows capped at 96 registers against 0.165 at 32 rows (the conv itself gained nothing
# from a cap: 0.131 at 96, 0.149 at 80, against 0.129); on the whole path at be43e22, full
# MTA's backward 17.22 against 17.49 ms at L=4096 (4.96 against 5.03 at L=2048), one call.
WEIGHT_GRAD_CONFIG = dict(BR=64, num_warps=4, num_stages=1, TILES=16, maxnreg=96)
# 16-bit slabs take kq_conv_weight_grad_strip_kernel instead (the product transposed, so that
# wgmma takes it, and the tiles clear of the causal diagonal loaded by TMA, or by pointers, with
# no causal select), with WEIGHT_GRAD_CONFIG's rows, warps and tiles, registers capped at maxnreg
# with TMA and at maxnreg_without_tma without (0: no cap). H200, a bf16 slab of 1044 x 2048
# (scripts/tune.py slabconvtiles, notes/tune_slabconvtiles_h200_79b8874.log): 0.188 ms with TMA
# at 96 registers (128: 0.215, uncapped 0.214), 0.186 with pointers at 128 (uncapped 0.220),
# against 0.253 for kq_conv_weight_grad_kernel (on=False), which fp32 slabs keep.
WEIGHT_GRAD_STRIP_CONFIG = dict(on=True, tma=True, maxnreg=96, maxnreg_without_tma=128)


def _blocks(R, LC, config):
    """Tile [BR, BC] (each 16..config's, for tl.dot), the row/col tile counts of a (R, LC)
    plane, and the launch options."""
    BR = min(config["BR"], max(16, _next_pow2(R)))
    BC = min(config["BC"], max(16, _next_pow2(LC)))
    return BR, BC, cdiv(R, BR), cdiv(LC, BC), _launch_options(config)


def _launch_options(config):
    """Triton's launch options in a config: warps, stages and, if given, a register cap
    (maxnreg: more programs per SM, or spills)."""
    options = dict(num_warps=config["num_warps"], num_stages=config["num_stages"])
    if config.get("maxnreg"):
        options["maxnreg"] = config["maxnreg"]
    return options


# "full" unrolls the conv kernel's loop over query offsets up to this many: compiled for
# sm_90a, a 12x35 conv's input-gradient kernel spills 1304 B unrolled (104 B rolled), 8x35 none.
MAX_FULL_UNROLL = 8


def _unroll(cq, config):
    """The conv kernel's unroll factor for its loop over the cq query offsets: config's
    'unroll' (default 1), "full" meaning cq up to MAX_FULL_UNROLL and 1 beyond."""
    unroll = config.get("unroll", 1)
    if unroll == "full":
        return cq if cq <= MAX_FULL_UNROLL else 1
    return unroll


def _halo(ck, pl):
    """Key columns read beside a tile: a power of two >= 16 covering the taps on both sides."""
    return max(16, _next_pow2(max(pl, ck - 1 - pl)))


def _prec(x, precision):
    return "ieee" if x.dtype == torch.float64 else precision


def _conv(x, w, pad_key, transpose, zero_above, mask_output, precision, out=None, band=False, x_col0=0):
    B, H, R, _ = x.shape
    LC = x_col0 + x.shape[-1]
    _, cq, ck = w.shape
    pl = left_pad(ck, pad_key)
    out = torch.empty(B, H, R, LC, device=x.device, dtype=x.dtype) if out is None else out
    if out.numel() == 0:
        return out
    BR, BC, n_r, n_c, options = _blocks(R, LC, CONV_CONFIG)
    # how far toward the diagonal (column minus row) a tap reads
    reach = (cq - 1) + (ck - 1 - pl) if transpose else pl
    zeros = _NO_ZEROS if zero_above is None else zero_above
    common = dict(CQ=cq, CK=ck, PL=pl, TRANSPOSE=transpose, MASK_OUT=mask_output and zero_above is not None,
                  BAND_ONLY=band, HALO=_halo(ck, pl), KW=_next_pow2(BC + 2 * _halo(ck, pl)), BR=BR, BC=BC,
                  PREC=_prec(x, precision), ACC=tl_acc_dtype(x), **options)
    args = (x, w.to(x.dtype).contiguous(), out, *x.stride(), H, R, LC, zeros, reach, zeros - (cq - 1) - (ck - 1 - pl),
            x_col0)
    strip = STRIP_CONV_CONFIG
    if strip["TILES"] and cq <= MAX_FULL_UNROLL and x.element_size() == 2:
        desc = _box_descriptor(x, BR, common["KW"]) if strip["tma"] and strip["group"] == 1 else None
        cap = strip["maxnreg"] if desc is not None else strip["maxnreg_without_tma"]
        if cap:     # (0 or None: no cap)
            common["maxnreg"] = cap
        n_strips = cdiv(n_c, strip["TILES"])
        kq_conv_strip_kernel[(B * H, n_r, n_strips)](args[0], desc, *args[1:], n_strips, TILES=strip["TILES"],
                                                     GROUP=strip["group"], CLEAN_STAGES=strip["clean_stages"], **common)
    else:
        kq_conv_kernel[(B * H, n_r, n_c)](*args, UNROLL=_unroll(cq, CONV_CONFIG), **common)
    return out


@functools.lru_cache(maxsize=None)
def _has_tma(device: torch.device) -> bool:
    """Whether a CUDA device has TMA (sm_90 on), asked once per device."""
    return torch.cuda.get_device_capability(device)[0] >= 9


def _box_descriptor(x, rows, cols):
    """A TMA descriptor of x (B, H, R, L) loading [1, 1, rows, cols] boxes, or None where TMA
    cannot read x: a CUDA device before sm_90, x empty, its base or a stride other than the last
    not 16-byte aligned, the last not 1. (The interpreter takes descriptors too.)"""
    if x.is_cuda and not _has_tma(x.device):
        return None
    size = x.element_size()
    if x.numel() == 0 or x.stride(-1) != 1 or x.data_ptr() % 16 or any(st * size % 16 for st in x.stride()[:-1]):
        return None
    return TensorDescriptor(x, list(x.shape), list(x.stride()), [1, 1, rows, cols])


def key_query_conv(x: torch.Tensor, w: torch.Tensor, pad_key: str, zero_above=None,
                   mask_output=False, precision="ieee", out=None, band=False, x_col0=0) -> torch.Tensor:
    """out[b, h, i, j] = sum_{a,t} w[h, a, t] x[b, h, i + a - (cq-1), j + t - pL]; x (B, H, R, L),
    w (H, cq, ck); zero outside x. Returns (B, H, R, L) in x's dtype (``out`` if given, which
    must be contiguous); with mask_output also zero where j - i > zero_above. band=True (with
    zero_above and ``out``): only the tiles holding an entry whose conv window reaches above
    that diagonal, j - i > zero_above - (cq-1) - (ck-1-pL), are written (pre_conv_matmul.py
    makes the others), and x may hold only the slab's columns from x_col0 on (at most
    band_first_column(...), the first that those tiles read)."""
    if band and (zero_above is None or out is None):
        raise ValueError("band=True needs zero_above and out")
    if x_col0 and not (band and x_col0 <= band_first_column(zero_above, w.shape[1], w.shape[2], pad_key)):
        raise ValueError("x_col0 > 0 needs band=True and at most band_first_column(...)")
    return _conv(x, w, pad_key, False, zero_above, mask_output, precision, out=out, band=band, x_col0=x_col0)


def band_first_column(zero_above: int, cq: int, ck: int, pad_key: str) -> int:
    """The first slab column that key_query_conv(..., band=True) reads (0 or more): its tiles
    (CONV_CONFIG's [BR, BC] at row 0 or below) hold an entry with j - i > zero_above - (cq-1) -
    (ck-1-pL), so none starts left of zero_above - (cq-1) - (ck-1-pL) - BC + 1, and each
    reads a halo left of its first column. Rounded down to a multiple of 16."""
    pl = left_pad(ck, pad_key)
    first = zero_above - (cq - 1) - (ck - 1 - pl) - CONV_CONFIG["BC"] + 1 - _halo(ck, pl)
    return max(0, first // 16 * 16)


def key_query_conv_input_grad(grad: torch.Tensor, w: torch.Tensor, pad_key: str, zero_above=None,
                              mask_output=False, precision="ieee") -> torch.Tensor:
    """Gradient of key_query_conv with respect to x: the transposed conv of grad (B, H, R, L)."""
    return _conv(grad, w, pad_key, True, zero_above, mask_output, precision)


def _weight_grad_tiles(R, LC, ck, pad_key):
    """The weight-gradient kernels' row tile BR, halo, and partial-sum slots (row tiles times
    groups of TILES column tiles) for a (R, LC) plane: the slots never fall as R or LC grow."""
    halo = _halo(ck, left_pad(ck, pad_key))
    cfg = WEIGHT_GRAD_CONFIG
    BR = min(cfg["BR"], max(16, _next_pow2(R)))
    n_groups = cdiv(cdiv(LC, 2 * halo), cfg["TILES"])    # column tiles of 2 * halo (the kernel's)
    return BR, halo, n_groups, cdiv(R, BR) * n_groups


def key_query_conv_weight_grad(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, pad_key: str,
                               zero_above=None, rows=None, precision="ieee", partial=None):
    """Gradient of key_query_conv(x, w) with respect to w: (H, cq, ck) summed over batch and
    positions in a fixed order (deterministic), in fp32 (fp64 for fp64 slabs; grad and x of
    one dtype, 16-bit allowed). rows=(lo, hi): only grad's rows lo..hi-1 count (the others are
    read as zero). ``partial``: a zero-filled contiguous (B * H, cq, S, ck) buffer of the sums'
    dtype with S >= the kernels' slots for this plane (ConvWeightGradSums hands them out): the
    kernel writes its partial sums there and the call returns None; the caller sums them."""
    B, H, R, LC = x.shape
    _, cq, ck = w.shape
    sums = acc_dtype(grad)
    if x.numel() == 0:
        return torch.zeros(H, cq, ck, device=x.device, dtype=sums) if partial is None else None
    pl = left_pad(ck, pad_key)
    BR, halo, n_groups, slots = _weight_grad_tiles(R, LC, ck, pad_key)
    cfg = WEIGHT_GRAD_CONFIG
    g_lo, g_hi = rows or (0, R)
    if partial is None:
        out = torch.zeros(B * H, cq, slots, ck, device=x.device, dtype=sums)
    else:
        out = partial
        if (out.dim() != 4 or tuple(out.shape[:2]) != (B * H, cq) or out.shape[2] < slots or out.shape[3] != ck
                or out.dtype != sums or not out.is_contiguous()):
            raise ValueError(f"partial must be a contiguous ({B * H}, {cq}, S >= {slots}, {ck}) buffer of {sums}, "
                             f"got {tuple(out.shape)} of {out.dtype}")
    # a program per slot of out: those past this plane's slots find no rows and return at once
    grid = (B * H, cq, out.shape[2])
    args = (out, *grad.stride(), *x.stride(), H, R, LC, _NO_ZEROS if zero_above is None else zero_above,
            g_lo, g_hi, n_groups)
    common = dict(CQ=cq, CK=ck, CKP=_next_pow2(ck), PL=pl, HALO=halo, BR=BR, TILES=cfg["TILES"],
                  PREC=_prec(grad, precision))
    strip = WEIGHT_GRAD_STRIP_CONFIG
    if strip["on"] and grad.element_size() == 2:
        descs = (None, None)
        if strip["tma"]:
            descs = (_box_descriptor(grad[:, :, g_lo:g_hi], BR, 2 * halo), _box_descriptor(x, BR, 4 * halo))
            descs = descs if None not in descs else (None, None)
        options = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        cap = strip["maxnreg"] if descs[0] is not None else strip["maxnreg_without_tma"]
        if cap:
            options["maxnreg"] = cap
        kq_conv_weight_grad_strip_kernel[grid](grad, descs[0], x, descs[1], *args, **common, **options)
    else:
        kq_conv_weight_grad_kernel[grid](grad, x, *args, **common, UNROLL=cfg.get("unroll", 1), **_launch_options(cfg))
    return out.view(B, H, cq, -1, ck).sum((0, 3)) if partial is None else None


class ConvWeightGradSums:
    """A conv weight's gradient summed over the chunks of a row-chunked backward with one
    zero fill and one reduction per buffer of partial sums, instead of a fill, a reduction
    and an add per chunk (host time: every launch costs tens of microseconds of Python).
    Each chunk's kernel writes its own zeroed slice (``next_slice``); a full buffer is reduced
    into the running total, in a fixed order (deterministic), and zeroed again."""

    def __init__(self, w, heads, max_rows, max_cols, pad_key, chunks, device, dtype, max_bytes=16 << 20):
        """w (H, cq, ck); slabs of at most max_rows x max_cols over ``heads`` (B * H) planes, in
        ``chunks`` chunks; partial sums of ``dtype``; the buffer holds at most max_bytes (but
        one slice)."""
        _, cq, ck = w.shape
        slots = _weight_grad_tiles(max_rows, max_cols, ck, pad_key)[3]
        slice_bytes = heads * cq * slots * ck * dtype.itemsize
        self.H = w.shape[0]
        self.buffer = torch.zeros(max(1, min(chunks, max_bytes // slice_bytes)), heads, cq, slots, ck, device=device,
                                  dtype=dtype)
        self.total = None
        self.used = 0

    def next_slice(self):
        """A zero-filled (heads, cq, slots, ck) slice for the next chunk's partial sums."""
        if self.used == self.buffer.shape[0]:
            self._reduce()
            self.buffer.zero_()
        self.used += 1
        return self.buffer[self.used - 1]

    def _reduce(self):
        n, heads, cq, slots, ck = self.buffer.shape
        part = self.buffer[:self.used].view(self.used, heads // self.H, self.H, cq, slots, ck).sum((0, 1, 4))
        self.total = part if self.total is None else self.total.add_(part)
        self.used = 0

    def result(self):
        """The gradient (H, cq, ck) summed over every slice handed out."""
        if self.used or self.total is None:
            self._reduce()
        return self.total

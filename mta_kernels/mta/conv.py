"""Host side of the key-query conv on slabs (conv_kernels.py): the conv, its input gradient
and its weight gradient, for slabs (B, H, R, L) of materialized scores or probabilities.

Common keyword arguments:
  zero_above: an int Z; the inputs (x and the gradient) are read as zero wherever
      col - row > Z (a causal slab of rows lo.. has Z = lo), and tiles that would read only
      there are skipped. None: no such structure.
  precision: tl.dot input precision for fp32 slabs, "tf32", "tf32x3" or "ieee" (fp64 is always exact).
"""
import torch
from triton.tools.tensor_descriptor import TensorDescriptor

from mta_reference.validate import left_pad

from .. import configs
from ..slabs.rows import NO_ZEROS
from ..utils import acc_dtype, cdiv, next_pow2, operand_precision, tl_acc_dtype
from .conv_kernels import (kq_conv_kernel, kq_conv_strip_kernel, kq_conv_weight_grad_kernel,
                           kq_conv_weight_grad_strip_kernel)


def _blocks(R, LC, config):
    """Tile [BR, BC] (each 16..config's, for tl.dot), the row/col tile counts of a (R, LC)
    plane, and the launch options."""
    BR = min(config["BR"], max(16, next_pow2(R)))
    BC = min(config["BC"], max(16, next_pow2(LC)))
    return BR, BC, cdiv(R, BR), cdiv(LC, BC), _launch_options(config)


def _launch_options(config):
    """Triton's launch options in a config: warps, stages and, if given, a register cap
    (maxnreg: more programs per SM, or spills)."""
    options = dict(num_warps=config["num_warps"], num_stages=config["num_stages"])
    if config.get("maxnreg"):
        options["maxnreg"] = config["maxnreg"]
    return options


def _unroll(cq, config):
    """The conv kernel's unroll factor for its loop over the cq query offsets: config's
    'unroll' (default 1), "full" meaning cq up to configs.MAX_FULL_UNROLL and 1 beyond."""
    unroll = config.get("unroll", 1)
    if unroll == "full":
        return cq if cq <= configs.MAX_FULL_UNROLL else 1
    return unroll


def _halo(ck, pl):
    """Key columns read beside a tile: a power of two >= 16 covering the taps on both sides."""
    return max(16, next_pow2(max(pl, ck - 1 - pl)))


def _conv(x, w, pad_key, transpose, zero_above, mask_output, precision, out=None, band=False, x_col0=0):
    B, H, R, _ = x.shape
    LC = x_col0 + x.shape[-1]
    _, cq, ck = w.shape
    pl = left_pad(ck, pad_key)
    out = torch.empty(B, H, R, LC, device=x.device, dtype=x.dtype) if out is None else out
    if out.numel() == 0:
        return out
    BR, BC, n_r, n_c, options = _blocks(R, LC, configs.CONV)
    # how far toward the diagonal (column minus row) a tap reads
    reach = (cq - 1) + (ck - 1 - pl) if transpose else pl
    zeros = NO_ZEROS if zero_above is None else zero_above
    common = dict(CQ=cq, CK=ck, PL=pl, TRANSPOSE=transpose, MASK_OUT=mask_output and zero_above is not None,
                  BAND_ONLY=band, HALO=_halo(ck, pl), KW=next_pow2(BC + 2 * _halo(ck, pl)), BR=BR, BC=BC,
                  PREC=operand_precision(x, precision), ACC=tl_acc_dtype(x), **options)
    args = (x, w.to(x.dtype).contiguous(), out, *x.stride(), H, R, LC, zeros, reach, zeros - (cq - 1) - (ck - 1 - pl),
            x_col0)
    strip = configs.STRIP_CONV
    if strip["TILES"] and cq <= configs.MAX_FULL_UNROLL and x.element_size() == 2:
        desc = _box_descriptor(x, BR, common["KW"]) if strip["tma"] and strip["group"] == 1 else None
        cap = strip["maxnreg"] if desc is not None else strip["maxnreg_without_tma"]
        if cap:     # (0 or None: no cap)
            common["maxnreg"] = cap
        n_strips = cdiv(n_c, strip["TILES"])
        kq_conv_strip_kernel[(B * H, n_r, n_strips)](args[0], desc, *args[1:], n_strips, TILES=strip["TILES"],
                                                     GROUP=strip["group"], CLEAN_STAGES=strip["clean_stages"], **common)
    else:
        kq_conv_kernel[(B * H, n_r, n_c)](*args, UNROLL=_unroll(cq, configs.CONV), **common)
    return out


def _box_descriptor(x, rows, cols):
    """A TMA descriptor of x (B, H, R, L) loading [1, 1, rows, cols] boxes, or None where TMA
    cannot read x: a CUDA device before sm_90, x empty, its base or a stride other than the last
    not 16-byte aligned, the last not 1. (The interpreter takes descriptors too.)"""
    if x.is_cuda and not configs.has_tma(x.device):
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
    that diagonal, j - i > zero_above - (cq-1) - (ck-1-pL), are written (mta/pre_conv.py
    makes the others), and x may hold only the slab's columns from x_col0 on (at most
    band_first_column(...), the first that those tiles read)."""
    if band and (zero_above is None or out is None):
        raise ValueError("band=True needs zero_above and out")
    if x_col0 and not (band and x_col0 <= band_first_column(zero_above, w.shape[1], w.shape[2], pad_key)):
        raise ValueError("x_col0 > 0 needs band=True and at most band_first_column(...)")
    return _conv(x, w, pad_key, False, zero_above, mask_output, precision, out=out, band=band, x_col0=x_col0)


def band_first_column(zero_above: int, cq: int, ck: int, pad_key: str) -> int:
    """The first slab column that key_query_conv(..., band=True) reads (0 or more): its tiles
    (configs.CONV's [BR, BC] at row 0 or below) hold an entry with j - i > zero_above - (cq-1) -
    (ck-1-pL), so none starts left of zero_above - (cq-1) - (ck-1-pL) - BC + 1, and each
    reads a halo left of its first column. Rounded down to a multiple of 16."""
    pl = left_pad(ck, pad_key)
    first = zero_above - (cq - 1) - (ck - 1 - pl) - configs.CONV["BC"] + 1 - _halo(ck, pl)
    return max(0, first // 16 * 16)


def key_query_conv_input_grad(grad: torch.Tensor, w: torch.Tensor, pad_key: str, zero_above=None,
                              mask_output=False, precision="ieee") -> torch.Tensor:
    """Gradient of key_query_conv with respect to x: the transposed conv of grad (B, H, R, L)."""
    return _conv(grad, w, pad_key, True, zero_above, mask_output, precision)


def _weight_grad_tiles(R, LC, ck, pad_key):
    """The weight-gradient kernels' row tile BR, halo, and partial-sum slots (row tiles times
    groups of TILES column tiles) for a (R, LC) plane: the slots never fall as R or LC grow."""
    halo = _halo(ck, left_pad(ck, pad_key))
    cfg = configs.WEIGHT_GRAD
    BR = min(cfg["BR"], max(16, next_pow2(R)))
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
    cfg = configs.WEIGHT_GRAD
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
    args = (out, *grad.stride(), *x.stride(), H, R, LC, NO_ZEROS if zero_above is None else zero_above,
            g_lo, g_hi, n_groups)
    common = dict(CQ=cq, CK=ck, CKP=next_pow2(ck), PL=pl, HALO=halo, BR=BR, TILES=cfg["TILES"],
                  PREC=operand_precision(grad, precision))
    strip = configs.WEIGHT_GRAD_STRIP
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

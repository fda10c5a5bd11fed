"""Argument checks shared by the reference and the fused kernels.

Every check raises ``TypeError`` (wrong kind of thing) or ``ValueError`` (wrong value or
shape) and names the offending argument, so a user sees what to fix.
"""
import math
import numbers
from dataclasses import dataclass

import torch

PAD_KEYS = ("both", "left", "right")
INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Problem:
    """Sizes of one validated call: q is (B, H, L, D), k and v are (B, Hkv, L, D) (or longer,
    for a query block at the end: ``validate(..., block=True)``)."""

    B: int
    H: int
    Hkv: int
    L: int
    D: int
    scale: float


def is_bool(x) -> bool:
    """A Python bool or a numpy bool (what indexing a numpy array of flags gives)."""
    return isinstance(x, bool) or (type(x).__module__ == "numpy" and type(x).__name__ in ("bool", "bool_"))


def left_pad(ck: int, pad_key: str) -> int:
    """Key positions the conv window reaches to the left of the current key (pL in the spec)."""
    if pad_key == "both":
        return (ck - 1) // 2
    if pad_key == "left":
        return ck - 1
    return 0


def _check_tensor(name, x, rank):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != rank:
        raise ValueError(f"{name} must have {rank} dimensions, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def _check_conv(name, w, H, pad_key, device):
    if w is None:
        return
    _check_tensor(name, w, 3)
    if w.shape[0] != H:
        raise ValueError(f"{name} must have shape (H={H}, cq, ck), got {tuple(w.shape)}")
    if pad_key == "both" and w.shape[2] % 2 == 0:
        raise ValueError(f"{name} has an even key size ck={w.shape[2]}; pad_key='both' needs an odd ck")
    if w.device != device:
        raise ValueError(f"{name} is on {w.device} but q is on {device}")


def _check_mix(name, w, H, device):
    if w is None:
        return
    _check_tensor(name, w, 3)
    G, ch_out, ch_in = w.shape
    if ch_out != ch_in:
        raise ValueError(f"{name} must have shape (G, ch, ch), got {tuple(w.shape)}")
    if G * ch_in != H:
        raise ValueError(f"{name} has G={G} groups of ch={ch_in} heads, which must multiply to H={H}")
    if w.device != device:
        raise ValueError(f"{name} is on {w.device} but q is on {device}")


def validate(q, k, v, pre_conv=None, pre_mix=None, post_conv=None, post_mix=None,
             causal=True, pad_key="both", scale=None, *, block=False) -> Problem:
    """Check every argument of ``mta_attention`` and return the problem sizes.

    block=True lets q be shorter than k and v (a query block at the end of the sequence,
    docs/spec.md section 8); ``validate_block`` then checks q_prev and seqlens."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, x, 4)
        if x.dtype not in INPUT_DTYPES:
            raise TypeError(f"{name} has dtype {x.dtype}; expected float16, bfloat16, float32 or float64")
    B, H, L, D = q.shape
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    Bk, Hkv, Lk, Dk = k.shape
    if Bk != B:
        raise ValueError(f"k has batch {Bk} but q has batch {B}")
    if block and Lk < L:
        raise ValueError(f"k has length {Lk} but q has length {L}; a query block must not be longer than its keys")
    if not block and Lk != L:
        raise ValueError(f"k has length {Lk} but q has length {L}; MTA is self-attention")
    if Dk != D:
        raise ValueError(f"k has head dim {Dk} but q has head dim {D}")
    if H % Hkv != 0:
        raise ValueError(f"q's heads H={H} must be a multiple of k's heads Hkv={Hkv}")
    if not is_bool(causal):
        raise TypeError(f"causal must be a bool, got {type(causal).__module__}.{type(causal).__qualname__}")
    if not isinstance(pad_key, str) or pad_key not in PAD_KEYS:
        raise ValueError(f"pad_key must be one of {PAD_KEYS}, got {pad_key!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    elif not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    _check_conv("pre_conv", pre_conv, H, pad_key, q.device)
    _check_conv("post_conv", post_conv, H, pad_key, q.device)
    _check_mix("pre_mix", pre_mix, H, q.device)
    _check_mix("post_mix", post_mix, H, q.device)
    return Problem(B=B, H=H, Hkv=Hkv, L=L, D=D, scale=float(scale))


def conv_row_halo(pre_conv=None, post_conv=None) -> int:
    """Query rows above an output row that it reads through the convs: (cq-1) + (cq'-1),
    0 without convs. pre_conv, post_conv: (H, cq, ck), (H, cq', ck') or None."""
    return sum(w.shape[1] - 1 for w in (pre_conv, post_conv) if w is not None)


def _check_lengths(name, x, device):
    """An int32/int64 tensor of lengths or offsets, on ``device`` or the CPU; returns its values."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32 or int64 tensor, got {x.dtype}")
    if x.dim() != 1:
        raise ValueError(f"{name} must have 1 dimension, got shape {tuple(x.shape)}")
    if x.device != device and x.device.type != "cpu":
        raise ValueError(f"{name} is on {x.device} but must be on q's device ({device}) or the CPU")
    return x.tolist()


def validate_block(q, k, pre_conv=None, post_conv=None, q_prev=None, seqlens=None):
    """Check the arguments of a query block at the end of the sequence (docs/spec.md, section 8),
    after ``validate(..., block=True)``; return seqlens as a list (None when not given).

    q: (B, H, Lq, D); k: (B, Hkv, Lk, D), Lq <= Lk. q_prev: (B, H, P, D), the queries just
    before the block, needed when the convs read rows above it and Lq < Lk: P >= conv_row_halo,
    or the number of positions above the block where that is fewer (the longest sequence's).
    seqlens: (B,) int32/int64, sequence b's number of keys, Lq <= seqlens[b] <= Lk.
    """
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    halo = conv_row_halo(pre_conv, post_conv)
    if q_prev is not None:
        if not isinstance(q_prev, torch.Tensor):
            raise TypeError(f"q_prev must be a torch.Tensor, got {type(q_prev).__name__}")
        if q_prev.dim() != 4:
            raise ValueError(f"q_prev must have 4 dimensions (B, H, P, D), got shape {tuple(q_prev.shape)}")
        if q_prev.dtype != q.dtype:
            raise TypeError(f"q_prev has dtype {q_prev.dtype} but q has {q.dtype}")
        if q_prev.device != q.device:
            raise ValueError(f"q_prev is on {q_prev.device} but q is on {q.device}")
        Bp, Hp, _, Dp = q_prev.shape
        if (Bp, Hp, Dp) != (B, H, D):
            raise ValueError(f"q_prev must have shape (B={B}, H={H}, P, D={D}), got {tuple(q_prev.shape)}")
    lens = None
    if seqlens is not None:
        lens = _check_lengths("seqlens", seqlens, q.device)
        if len(lens) != B:
            raise ValueError(f"seqlens must have length B={B}, got {len(lens)}")
        for b, n in enumerate(lens):
            if not Lq <= n <= Lk:
                raise ValueError(f"seqlens[{b}] = {n} must lie in [Lq={Lq}, Lk={Lk}]: the block of q's "
                                 f"{Lq} rows ends at the sequence's last key")
    # the rows above the block that exist: a block starting at position p < halo has p of them
    above = (max(lens) if lens else Lk) - Lq
    need = min(halo, above)
    P = 0 if q_prev is None else q_prev.shape[2]
    if P < need:
        got = "none" if q_prev is None else f"{P}"
        raise ValueError(f"q_prev must hold the {need} queries before the block, got {got}: q has length "
                         f"{Lq} but k has length {Lk}, and the convs read (cq-1) + (cq'-1) = {halo} "
                         f"rows above each query")
    return lens


def validate_packed(q, k, cu_seqlens, max_seqlen=None, q_prev=None, seqlens=None):
    """Check the arguments of packed documents (docs/spec.md, section 9), after ``validate``; return the
    documents' (start, end) offsets.

    q: (1, H, T, D); k: (1, Hkv, T, D). cu_seqlens: (N+1,) int32/int64 offsets, 0 first, T
    last, strictly increasing. max_seqlen: None or an int >= every document's length.
    """
    if q_prev is not None or seqlens is not None:
        raise ValueError("cu_seqlens cannot be combined with q_prev or seqlens: each packed document "
                         "is a whole sequence")
    if cu_seqlens is None:
        raise ValueError("max_seqlen is only meaningful with cu_seqlens")
    B, _, T, _ = q.shape
    offsets = _check_lengths("cu_seqlens", cu_seqlens, q.device)
    if B != 1:
        raise ValueError(f"cu_seqlens needs q, k, v of batch 1 (documents packed along the sequence), got B={B}")
    if k.shape[2] != T:
        raise ValueError(f"cu_seqlens needs k and v as long as q (T={T}), got k of length {k.shape[2]}")
    if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != T:
        raise ValueError(f"cu_seqlens must run from 0 to T={T} (N+1 offsets of N documents), got {offsets}")
    if any(e <= s for s, e in zip(offsets, offsets[1:])):
        raise ValueError(f"cu_seqlens must be strictly increasing (documents are not empty), got {offsets}")
    longest = max(e - s for s, e in zip(offsets, offsets[1:]))
    if max_seqlen is not None:
        if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, numbers.Integral):
            raise TypeError(f"max_seqlen must be an int or None, got {type(max_seqlen).__name__}")
        if max_seqlen < longest:
            raise ValueError(f"max_seqlen = {max_seqlen} is shorter than the longest document ({longest})")
    return list(zip(offsets, offsets[1:]))

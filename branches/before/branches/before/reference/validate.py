"""Argument checks shared by the reference and the fused kernels.

Every check raises ``TypeError`` (wrong kind of thing) or ``ValueError`` (wrong value or
shape) and names the offending argument, so a user sees what to fix.
"""
import math
from dataclasses import dataclass

import torch

PAD_KEYS = ("both", "left", "right")
INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Problem:
    """Sizes of one validated call: q is (B, H, L, D), k and v are (B, Hkv, L, D)."""

    B: int
    H: int
    Hkv: int
    L: int
    D: int
    scale: float


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
             causal=True, pad_key="both", scale=None) -> Problem:
    """Check every argument of ``mta_attention`` and return the problem sizes."""
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
    if Lk != L:
        raise ValueError(f"k has length {Lk} but q has length {L}; MTA is self-attention")
    if Dk != D:
        raise ValueError(f"k has head dim {Dk} but q has head dim {D}")
    if H % Hkv != 0:
        raise ValueError(f"q's heads H={H} must be a multiple of k's heads Hkv={Hkv}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
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

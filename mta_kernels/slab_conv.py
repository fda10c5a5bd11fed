"""Host side of conv_kernels.py: drop-in replacements for mta_reference's key-query conv and
its gradients (same signatures), for slabs of materialized scores (B, H, R, L)."""
import torch
import triton

from mta_reference.validate import left_pad

from .conv_kernels import kq_conv_kernel, kq_conv_weight_grad_kernel
from .forward import _next_pow2


def _blocks(R, LC):
    """Tile [BR, BC] and the launch grid's row/col tile counts for a (R, LC) plane."""
    BR = min(64, _next_pow2(R))
    BC = min(64, _next_pow2(LC))
    return BR, BC, triton.cdiv(R, BR), triton.cdiv(LC, BC)


# zero_above=None: no zero structure (any value beyond every column offset would do)
_NO_ZEROS = 2 ** 30


def _conv(x, w, pad_key, transpose, zero_above):
    B, H, R, LC = x.shape
    _, cq, ck = w.shape
    pl = left_pad(ck, pad_key)
    out = torch.empty(B, H, R, LC, device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    BR, BC, n_r, n_c = _blocks(R, LC)
    # how far above the diagonal (column minus row) a tap reads
    reach = (cq - 1) + (ck - 1 - pl) if transpose else pl
    kq_conv_kernel[(B * H, n_r, n_c)](
        x, w.to(x.dtype).contiguous(), out, *x.stride(), H, R, LC,
        _NO_ZEROS if zero_above is None else zero_above, reach,
        CQ=cq, CK=ck, PL=pl, TRANSPOSE=transpose, BR=BR, BC=BC)
    return out


def key_query_conv(x: torch.Tensor, w: torch.Tensor, pad_key: str, zero_above=None) -> torch.Tensor:
    """out[b, h, i, j] = sum_{a,t} w[h, a, t] x[b, h, i + a - (cq-1), j + t - pL]; x (B, H, R, L),
    w (H, cq, ck); zero outside x. Returns (B, H, R, L) in x's dtype. zero_above: an int Z
    such that x[..., i, j] == 0 whenever j - i > Z (a causal slab of rows lo.. has Z = lo),
    so that tiles reading only zeros are skipped; None if there is no such structure."""
    return _conv(x, w, pad_key, False, zero_above)


def key_query_conv_input_grad(grad: torch.Tensor, w: torch.Tensor, pad_key: str, zero_above=None) -> torch.Tensor:
    """Gradient of key_query_conv with respect to x: the transposed conv of grad (B, H, R, L);
    zero_above describes grad, as in key_query_conv."""
    return _conv(grad, w, pad_key, True, zero_above)


def key_query_conv_weight_grad(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, pad_key: str,
                               zero_above=None) -> torch.Tensor:
    """Gradient of key_query_conv(x, w) with respect to w: (H, cq, ck) in grad's dtype, summed
    over batch and positions in a fixed order (deterministic); zero_above describes grad, as
    in key_query_conv."""
    B, H, R, LC = x.shape
    _, cq, ck = w.shape
    if x.numel() == 0:
        return torch.zeros(H, cq, ck, device=x.device, dtype=grad.dtype)
    BR, BC, n_r, n_c = _blocks(R, LC)
    partial = torch.zeros(B, H, n_r * n_c, cq * ck, device=x.device, dtype=grad.dtype)
    kq_conv_weight_grad_kernel[(B * H, n_r, n_c)](
        grad, x, partial, *grad.stride(), *x.stride(), H, R, LC,
        _NO_ZEROS if zero_above is None else zero_above,
        CQ=cq, CK=ck, PL=left_pad(ck, pad_key), BR=BR, BC=BC)
    return partial.sum((0, 2)).view(H, cq, ck)

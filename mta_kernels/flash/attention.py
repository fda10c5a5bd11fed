"""Host side of plain attention: flash_fwd and flash_bwd (Triton), and sdpa (CUDA)."""
import functools
import inspect

import torch
import torch.nn.functional as F

from .. import configs
from ..utils import acc_dtype, cdiv, dot_precision, operand_precision, padded
from .kernels import flash_bwd_dkdv_kernel, flash_bwd_dq_kernel, flash_bwd_preprocess_kernel, flash_fwd_kernel


def _tiles(config, L):
    """config with one block of L rows rounded up (at least 16) for short sequences."""
    cfg = dict(config)
    if L <= 64:
        cfg["BM"] = cfg["BN"] = padded(L)
    return cfg


def lse_dtype(q: torch.Tensor) -> torch.dtype:
    """The flash lse's dtype: fp32 for 16-bit q, whose own rounding is far coarser; fp64 for fp32
    q, so that exp(S - lse) in the backward is the forward's P to fp32 precision at any logit."""
    return torch.float32 if q.element_size() == 2 else torch.float64


def flash_fwd(q, k, v, causal: bool, scale: float, q_offset=None):
    """Plain attention. q (B, H, Lq, D), its row r at position q_offset + r (default Lk - Lq:
    the block ends at the last key); k, v (B, Hkv, Lk, D). Returns (out (B, H, Lq, D) in q's
    dtype, lse (B, H, Lq) in lse_dtype(q): each row's natural-log log-sum-exp)."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    out = torch.empty(B, H, Lq, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, Lq, device=q.device, dtype=lse_dtype(q))
    cfg = dict(configs.FLASH_FWD)
    if Lq <= 64:
        cfg["BM"] = padded(Lq)
    if Lk <= 64:
        cfg["BN"] = padded(Lk)
    elif padded(D) > 128:   # the tiles of wide heads must fit shared memory
        cfg["BN"] = 32
    grid = (B * H, cdiv(Lq, cfg["BM"]))
    flash_fwd_kernel[grid](
        q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, H // k.shape[1], Lq, Lk, Lk - Lq if q_offset is None else q_offset, D, scale,
        CAUSAL=causal, DP=padded(D), PREC=operand_precision(q, dot_precision(q)), **cfg)
    return out, lse


def flash_bwd(grad_out, q, k, v, out, lse, causal: bool, scale: float):
    """Gradients of plain attention (Lq == Lk) from the forward's out and lse (B, H, L).
    Returns (dq, dk, dv) in the inputs' dtypes; dk, dv summed over the query heads of each kv
    head in a fixed order (deterministic)."""
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    DP = padded(D)
    dkdv_cfg = _tiles(configs.FLASH_BWD_DKDV, L)
    dq_cfg = _tiles(configs.FLASH_BWD_DQ, L)
    prec = operand_precision(q, dot_precision(q))
    dev = q.device
    delta = torch.empty(B, H, L, device=dev, dtype=acc_dtype(q))
    flash_bwd_preprocess_kernel[(cdiv(L, 64), B * H)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), H, L, D, BM=64, DP=DP)
    dq = torch.empty(B, H, L, D, device=dev, dtype=q.dtype)
    dk = torch.empty(B, Hkv, L, D, device=dev, dtype=k.dtype)
    dv = torch.empty(B, Hkv, L, D, device=dev, dtype=v.dtype)
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    flash_bwd_dkdv_kernel[(B * Hkv, cdiv(L, dkdv_cfg["BN"]))](
        q, k, v, grad_out, lse, delta, dk, dv, *strides, H, Hkv, L, D, scale,
        CAUSAL=causal, DP=DP, PREC=prec, **dkdv_cfg)
    flash_bwd_dq_kernel[(B * H, cdiv(L, dq_cfg["BM"]))](
        q, k, v, grad_out, lse, delta, dq, *strides, H, H // Hkv, L, D, scale,
        CAUSAL=causal, DP=DP, PREC=prec, **dq_cfg)
    return dq, dk, dv


def sdpa(q, k, v, causal: bool, scale: float):
    """Plain attention through torch's scaled_dot_product_attention (its own autograd), with
    the causal mask aligned to the last key where Lq < Lk, as flash_fwd's."""
    Lq, Lk = q.shape[2], k.shape[2]
    mask = None
    if causal and Lq != Lk:
        from torch.nn.attention.bias import causal_lower_right
        mask = causal_lower_right(Lq, Lk)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                          scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def sdpa_block(q, k, v, lens, causal: bool, scale: float):
    """Plain attention of a query block q (B, H, Lq, D) at the end of sequences of lens (B,) keys
    (a tensor on q's device) in k, v (B, Hkv, Lk, D), through SDPA with a (B, 1, Lq, Lk) mask
    made on the device: lens is never read on the host (a decode step stays capturable), and
    one call takes every length. Meant for short blocks: the mask holds Lq x Lk per sequence.
    With GQA the query heads of a kv head become rows of one call, so that SDPA neither copies
    k and v per query head nor leaves its fused kernels for the math one."""
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    keys = torch.arange(Lk, device=q.device)
    if causal:     # row r sits at position lens - Lq + r and sees the keys up to it
        last = lens[:, None] - Lq + torch.arange(Lq, device=q.device)       # (B, Lq)
        mask = keys <= last[:, :, None]
    else:
        mask = (keys < lens[:, None, None]).expand(-1, Lq, -1)
    rep = H // Hkv
    rows = q.reshape(B, Hkv, rep * Lq, D)                  # query head h = kv head h // rep
    mask = mask[:, None, None].expand(-1, -1, rep, -1, -1).reshape(B, 1, rep * Lq, Lk)
    out = F.scaled_dot_product_attention(rows, k, v, attn_mask=mask, scale=scale)
    return out.view(B, H, Lq, D)


@functools.lru_cache(maxsize=None)
def _varlen_api():
    """(torch's varlen_attn, the names of its parameters), or None where this torch has none:
    read once, since the signature moved between releases (is_causal in 2.10; window_size and
    scale after; enable_gqa later)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def sdpa_varlen(q, k, v, cu_seqlens, max_seqlen: int, causal: bool, scale: float):
    """Plain attention over documents packed along the sequence through torch's varlen flash
    attention (its own autograd): q (1, H, T, D), k, v (1, Hkv, T, D), cu_seqlens (N+1,) on
    q's device. Returns (1, H, T, D), or None where this torch cannot run the call (no
    ``torch.nn.attention.varlen``, GQA or a non-default scale it does not take, a dtype or
    head size its flash kernel lacks): the caller then batches the documents itself."""
    api = _varlen_api()
    if api is None:
        return None
    varlen_attn, params = api
    gqa = q.shape[1] != k.shape[1]
    D = q.shape[-1]
    if (q.dtype not in (torch.float16, torch.bfloat16) or D % 8 or D > 256 or (gqa and "enable_gqa" not in params)
            or (scale != D ** -0.5 and "scale" not in params)):
        return None
    kw = {}
    if "window_size" in params:
        kw["window_size"] = (-1, 0) if causal else (-1, -1)
    else:
        kw["is_causal"] = causal
    if "scale" in params:
        kw["scale"] = scale
    if gqa:
        kw["enable_gqa"] = True
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    tokens_first = [x[0].transpose(0, 1) for x in (q, k, v)]       # (T, heads, D) views
    out = varlen_attn(*tokens_first, cu, cu, max_seqlen, max_seqlen, **kw)
    return out.transpose(0, 1).unsqueeze(0)

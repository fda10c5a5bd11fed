"""Host side of the fused backward. So far: plain attention (no MTA part)."""
import torch
import triton

from .flash_kernels import flash_bwd_dkdv_kernel, flash_bwd_dq_kernel, flash_bwd_preprocess_kernel
from .forward import _next_pow2, _precision


def flash_backward(grad_out, q, k, v, out, lse, causal, scale):
    """Gradients of plain attention from the forward's out and lse (B, H, L) (natural log).
    Returns (dq, dk, dv) in the inputs' dtypes; dk, dv are summed over the query heads of
    each kv head in a fixed order, so the result is deterministic."""
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    DP = max(16, _next_pow2(D))
    BM = BN = 64 if L > 32 else max(16, _next_pow2(L))
    prec = _precision(q)
    dev = q.device
    delta = torch.empty(B, H, L, device=dev, dtype=torch.float32)
    flash_bwd_preprocess_kernel[(triton.cdiv(L, 64), B * H)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), H, L, D, BM=64, DP=DP)
    dq = torch.empty(B, H, L, D, device=dev, dtype=torch.float32)
    dk = torch.empty(B, Hkv, L, D, device=dev, dtype=torch.float32)
    dv = torch.empty(B, Hkv, L, D, device=dev, dtype=torch.float32)
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    flash_bwd_dkdv_kernel[(triton.cdiv(L, BN), B * Hkv)](
        q, k, v, grad_out, lse, delta, dk, dv, *strides, H, Hkv, L, D, scale,
        CAUSAL=causal, BM=BM, BN=BN, DP=DP, PREC=prec, num_warps=4, num_stages=2)
    flash_bwd_dq_kernel[(triton.cdiv(L, BM), B * H)](
        q, k, v, grad_out, lse, delta, dq, *strides, H, H // Hkv, L, D, scale,
        CAUSAL=causal, BM=BM, BN=BN, DP=DP, PREC=prec, num_warps=4, num_stages=2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)

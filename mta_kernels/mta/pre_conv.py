"""Host side of the pre-softmax conv as one matmul of inner width cq * D (pre_conv_kernels.py).

With w (H, cq, ck) the pre conv's weights and pL its left key padding,

    C[i, j] = scale * sum_a < q[i - (cq-1-a)], K~_a[j] >,    K~_a[j] = sum_t w[a, t] k[j + t - pL]

is the conv of the scores wherever the conv window reads no causal-future score; the slab
conv kernel makes the tiles nearer the diagonal (mta/conv.py, band=True).
"""
import torch
import triton.language as tl

from mta_reference.validate import left_pad

from .. import configs
from ..slabs.rows import NO_ZEROS
from ..utils import acc_dtype, cdiv, next_pow2, operand_precision, tl_acc_dtype
from .pre_conv_kernels import conv_keys_kernel, pre_conv_matmul_kernel


def conv_keys(k: torch.Tensor, w: torch.Tensor, pad_key: str, heads: int, dtype) -> torch.Tensor:
    """K~ of the module docstring: k (B, Hkv, L, D) (Hkv dividing ``heads``), w (heads, cq, ck).
    Returns (B, heads, L, cq, D) in ``dtype``."""
    B, Hkv, L, D = k.shape
    _, cq, ck = w.shape
    out = torch.empty(B, heads, L, cq, D, device=k.device, dtype=dtype)
    if out.numel() == 0:
        return out
    cqp, dp = next_pow2(cq), max(16, next_pow2(D))
    BL = max(2, min(16, configs.CONV_KEYS["elements"] // (cqp * dp)))
    conv_keys_kernel[(B * heads, cdiv(L, BL))](
        k, w.contiguous(), out, *k.stride(), heads, Hkv, L, D, CQ=cq, CQP=cqp, CK=ck, PL=left_pad(ck, pad_key),
        BL=BL, DP=dp, ACC=tl.float64 if dtype == torch.float64 else tl.float32, num_warps=configs.CONV_KEYS["num_warps"])
    return out


def pre_conv_matmul(q: torch.Tensor, kt: torch.Tensor, lo: int, hi: int, keys: int, scale: float,
                    zero_above=None, precision="ieee", dtype=torch.float32) -> torch.Tensor:
    """C of the module docstring on rows [lo, hi) and keys [0, keys): q (B, H, L, D) unscaled,
    kt = conv_keys(...) (B, H, L, cq, D) in q's dtype. Exact (up to K~'s rounding) where
    j - i <= zero_above - (cq-1) - (ck-1-pL); tiles entirely above the diagonal j - i =
    zero_above are zero (None: no such structure). Returns (B, H, hi - lo, keys) in ``dtype``
    (summed in fp32, or fp64 for fp64)."""
    B, H, L, D = q.shape
    cq = kt.shape[3]
    R = hi - lo
    out = torch.empty(B, H, R, keys, device=q.device, dtype=dtype)
    if out.numel() == 0:
        return out
    cfg = configs.PRE_CONV_MATMUL
    BM = min(cfg["BM"], max(16, next_pow2(R)))
    BN = min(cfg["BN"], max(16, next_pow2(keys)))
    BD = min(cfg["BD"], max(16, next_pow2(D)))
    pre_conv_matmul_kernel[(B * H, cdiv(R, BM), cdiv(keys, BN))](
        q, kt, out, torch.full((1,), scale, device=q.device, dtype=acc_dtype(q)), *q.stride(), H, R, keys, L, D, lo,
        NO_ZEROS if zero_above is None else zero_above,
        CQ=cq, BM=BM, BN=BN, BD=BD, PREC=operand_precision(q, precision),
        ACC=tl_acc_dtype(q),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def use_pre_conv_matmul(q: torch.Tensor, k: torch.Tensor, pre_conv, choice, budget: int) -> bool:
    """Whether the row-chunked paths make the pre conv as one matmul: ``choice`` (True/False)
    where the caller forced it, else for 16-bit inputs of a self-attention call whose K~
    (B, H, L, cq, D) fits the slab budget. Calls with a query block shorter than the keys take
    the slab conv."""
    if pre_conv is None or q.shape[2] != k.shape[2]:
        return False
    if choice is not None:
        return choice
    B, H, L, D = q.shape
    k_tilde_bytes = B * H * L * pre_conv.shape[1] * D * q.element_size()
    return q.dtype in (torch.float16, torch.bfloat16) and k_tilde_bytes <= budget


def pre_conv_operands(q, k, pre_conv, pad_key, scale):
    """slab_forward's ``pre_conv_operands``: (q, K~ = conv_keys(k, pre_conv), scale)."""
    return (q, conv_keys(k, pre_conv, pad_key, q.shape[1], q.dtype), scale)

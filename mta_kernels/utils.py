"""Small helpers every path shares: launch-grid arithmetic, dtypes and dot precision."""
import torch
import triton.language as tl


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) on plain Python ints (triton.cdiv unwraps constexprs: slower on the host)."""
    return -(-a // b)


def next_pow2(x: int) -> int:
    """The smallest power of two >= x (1 for x <= 1)."""
    return 1 << max(0, (x - 1).bit_length())


def padded(x: int) -> int:
    """x rounded up to a power of two, at least 16: tl.arange and tl.dot sizes."""
    return max(16, next_pow2(x))


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulators, statistics and weights inside the kernels: fp32, or fp64 for fp64 inputs
    (which exist for gradchecks)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def tl_acc_dtype(x: torch.Tensor):
    """acc_dtype(x) as a Triton dtype."""
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def dot_precision(x: torch.Tensor) -> str:
    """tl.dot's input precision for fp32 operands derived from inputs like x: tf32 beside
    16-bit inputs (their products are rounded far coarser by the 16-bit reference), exact
    fp32 otherwise."""
    return "tf32" if x.dtype in (torch.float16, torch.bfloat16) else "ieee"


def repeat_kv_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """x (B, Hkv, L, D) with each kv head repeated for the heads // Hkv query heads reading it
    (x itself without GQA)."""
    rep = heads // x.shape[1]
    return x.repeat_interleave(rep, dim=1) if rep > 1 else x


def flat_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, ...) -> (B * H, ...), a view where the strides allow one, else a copy."""
    return x.flatten(0, 1)

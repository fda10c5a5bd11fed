"""Small helpers every path shares: launch-grid arithmetic, dtypes, dot precision, graph capture."""
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


def captured_on_device(t) -> bool:
    """Whether t is a CUDA tensor while a CUDA graph is being captured: its values cannot be
    read on the host then."""
    return t is not None and t.is_cuda and torch.cuda.is_current_stream_capturing()


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulators, statistics and weights inside the kernels: fp32, or fp64 for fp64 inputs
    (which exist for gradchecks)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def tl_acc_dtype(x: torch.Tensor):
    """acc_dtype(x) as a Triton dtype."""
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def dot_precision(x: torch.Tensor) -> str:
    """tl.dot's input precision for fp32 operands derived from inputs like x. Beside bf16 inputs
    tf32 (10 mantissa bits against bf16's 7: the bf16 reference rounds its products far
    coarser); beside fp16 inputs tf32x3 (three tf32 dots, about fp32): tf32 rounds operands as
    coarsely as fp16 itself, and with that extra rounding the kernels' fp16 errors reached 2-3x
    the fp16 reference's on an H100. Exact fp32 otherwise."""
    if x.dtype == torch.bfloat16:
        return "tf32"
    return "tf32x3" if x.dtype == torch.float16 else "ieee"


def operand_precision(operand: torch.Tensor, precision: str) -> str:
    """tl.dot's input precision for operands of ``operand``'s dtype: ``precision`` for fp32,
    exact for fp64, and "tf32" for 16-bit operands, whose dots it does not change (tf32x3 does:
    it widened a 16-bit kernel's shared memory past an SM's)."""
    if operand.dtype == torch.float64:
        return "ieee"
    return "tf32" if operand.element_size() == 2 else precision


def repeat_kv_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """x (B, Hkv, L, D) with each kv head repeated for the heads // Hkv query heads reading it
    (x itself without GQA)."""
    rep = heads // x.shape[1]
    return x.repeat_interleave(rep, dim=1) if rep > 1 else x


def flat_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, ...) -> (B * H, ...), a view where the strides allow one, else a copy."""
    return x.flatten(0, 1)

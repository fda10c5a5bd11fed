"""``kernel_options``: what a caller (mostly a test or a benchmark) may force about how a call runs.

Every field is optional; a missing field means "let the package choose" (dispatch.py). The
choices are arguments of the call, never environment variables or module globals.
"""
from typing import NamedTuple, Optional, TypedDict

import torch

# The named paths of dispatch.py, in the order dispatch considers them.
PATHS = ("sdpa", "flash", "talking_heads", "chunked", "decode")

DEFAULT_CHUNK_BYTES = 1 << 30


class KernelOptions(TypedDict, total=False):
    """Options of ``mta_attention(..., kernel_options=...)``.

    path: one of PATHS, to run a call on that path where it applies (ValueError where not):
        'sdpa' (plain attention through torch SDPA, CUDA), 'flash' (plain attention, Triton),
        'talking_heads' (both head mixes of one group size, no conv), 'chunked' (any parts).
    chunk_rows: query rows per chunk of the row-chunked paths (default: the budget's).
    chunk_bytes: working-set budget of one chunk's slabs in bytes (default 1 GiB): more memory,
        fewer and taller chunks.
    slab_dtype: dtype of the row-chunked paths' slabs: torch.float32 (or float64 for fp64
        inputs) or q's 16-bit dtype (default: bf16 for bf16 inputs, else the accumulator dtype).
    pre_conv_matmul: make the pre conv as one matmul of width cq * D away from the causal
        diagonal (default: for 16-bit slabs while its K~ operand stays small).
    causal_matmuls: causal talking heads' scores and A V through the kernels that skip the
        causal future (default: where the operands allow tensor descriptors).
    """

    path: str
    chunk_rows: int
    chunk_bytes: int
    slab_dtype: torch.dtype
    pre_conv_matmul: bool
    causal_matmuls: bool


class Options(NamedTuple):
    """KernelOptions checked and filled in: path '' = dispatch decides, chunk_rows 0 = from the
    budget, None = the default for that call."""

    path: str = ""
    chunk_rows: int = 0
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    slab_dtype: Optional[torch.dtype] = None
    pre_conv_matmul: Optional[bool] = None
    causal_matmuls: Optional[bool] = None


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"kernel_options[{name!r}] must be a positive int, got {value!r}")
    return value


def _flag(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"kernel_options[{name!r}] must be a bool, got {type(value).__name__}")
    return value


def resolve(kernel_options) -> Options:
    """KernelOptions (a dict, or None) -> Options; unknown keys and bad values raise naming the key."""
    if kernel_options is None:
        return Options()
    if not isinstance(kernel_options, dict):
        raise TypeError(f"kernel_options must be a dict or None, got {type(kernel_options).__name__}")
    unknown = sorted(set(kernel_options) - set(KernelOptions.__annotations__))
    if unknown:
        raise ValueError(f"kernel_options has unknown keys {unknown}; known: {sorted(KernelOptions.__annotations__)}")
    o = dict(kernel_options)
    path = o.get("path", "")
    if path and path not in PATHS:
        raise ValueError(f"kernel_options['path'] must be one of {PATHS}, got {path!r}")
    slab_dtype = o.get("slab_dtype")
    if slab_dtype is not None and slab_dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise ValueError(f"kernel_options['slab_dtype'] must be a float dtype, got {slab_dtype!r}")
    return Options(
        path=path,
        chunk_rows=_positive_int("chunk_rows", o["chunk_rows"]) if "chunk_rows" in o else 0,
        chunk_bytes=_positive_int("chunk_bytes", o["chunk_bytes"]) if "chunk_bytes" in o else DEFAULT_CHUNK_BYTES,
        slab_dtype=slab_dtype,
        pre_conv_matmul=_flag("pre_conv_matmul", o["pre_conv_matmul"]) if "pre_conv_matmul" in o else None,
        causal_matmuls=_flag("causal_matmuls", o["causal_matmuls"]) if "causal_matmuls" in o else None,
    )

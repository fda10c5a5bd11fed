"""The public function: validate, pick the backend, and run the fused op."""
import os
from typing import Optional

import torch

from mta_reference.validate import validate

from .ops import MTAFunction, mta_fwd

# Triton decides at import time whether kernels are compiled or interpreted.
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_HEAD_DIM = 256


# The convs' halos must leave room for outputs in a kernel frame (forward.py's _frame).
MAX_ROW_HALO = 32   # (cq - 1) + (cq' - 1)
MAX_KEY_HALO = 64   # (ck - 1) + (ck' - 1)


def _check_conv_sizes(pre_conv, post_conv):
    convs = [w for w in (pre_conv, post_conv) if w is not None]
    row_halo = sum(w.shape[1] - 1 for w in convs)
    key_halo = sum(w.shape[2] - 1 for w in convs)
    if row_halo > MAX_ROW_HALO or key_halo > MAX_KEY_HALO:
        raise ValueError(
            f"pre_conv/post_conv sizes {[tuple(w.shape[1:]) for w in convs]} are too large for the fused "
            f"kernels: they support (cq-1)+(cq'-1) <= {MAX_ROW_HALO} and (ck-1)+(ck'-1) <= {MAX_KEY_HALO}")


def _check_backend(q: torch.Tensor, D: int):
    if q.device.type == "cpu" and not INTERPRETER:
        raise RuntimeError(
            "mta_kernels runs Triton kernels: CPU tensors need the Triton interpreter "
            "(set TRITON_INTERPRET=1 before importing mta_kernels), or use "
            "mta_reference.mta_attention for the plain-PyTorch path")
    if q.device.type not in ("cpu", "cuda"):
        raise ValueError(f"q is on {q.device}; mta_kernels supports CUDA (and CPU under the interpreter)")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"q has head dim D={D}; the fused kernels support D <= {MAX_HEAD_DIM}")


def mta_attention(q, k, v, pre_conv=None, pre_mix=None, post_conv=None, post_mix=None, *,
                  causal: bool = True, pad_key: str = "both",
                  scale: Optional[float] = None) -> torch.Tensor:
    """Multi-Token Attention through the fused Triton kernels.

    q: (B, H, L, D); k, v: (B, Hkv, L, D), H % Hkv == 0, any strides, fp16/bf16/fp32.
    pre_conv, post_conv: (H, cq, ck) key-query kernels (row cq-1 is the current query).
    pre_mix, post_mix: (G, ch, ch) head mixing, W[g, out, in], H = G * ch.
    Each part is optional; with none this is plain softmax attention.
    Returns (B, H, L, D) in q's dtype. See shared spec section 2 for the index-by-index math.
    Differentiable in q, k, v and every weight; mta_kernels/ops.py says which backward runs
    for which parts. Forward and backward are deterministic (bitwise identical run to run)
    by default; there is no non-deterministic mode. fp64 inputs are accepted too (fp64
    accumulators; for gradchecks).
    """
    p = validate(q, k, v, pre_conv, pre_mix, post_conv, post_mix, causal, pad_key, scale)
    _check_backend(q, p.D)
    _check_conv_sizes(pre_conv, post_conv)
    args = (q, k, v, pre_conv, pre_mix, post_conv, post_mix, causal, pad_key, p.scale)
    if torch.compiler.is_compiling():
        return mta_fwd(*args)[0]   # the custom op, which the compiler traces
    return MTAFunction.apply(*args)

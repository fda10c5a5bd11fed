"""Test harness: the Triton interpreter on CPU-only machines, and the GPU marker.

TRITON_INTERPRET must be set before ``mta_kernels`` (and so ``triton.jit``) is imported:
Triton decides at decoration time whether a kernel is compiled or interpreted.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _dots_rounded_once():
    """The interpreter's tl.dot through fp64 products and sums, rounded once to the
    accumulator's dtype. Its own goes through the CPU BLAS (np.matmul), whose fp32 rounding
    depends on where an element sits in the matrix (OpenBLAS's edge kernels differ by CPU:
    SkylakeX's gave the same bits, Haswell's and Zen's do not), so that a score recomputed in
    another tile position or orientation (the forward's two passes, the backward's K Q^T)
    differed from the first in its last bit; exp() of logits near 1e4 turns that into 1e-3
    errors. Tensor cores sum each tile the same way wherever it sits; fp64 sums rounded once
    do too, on every CPU. Other dtypes (8-bit floats, bf16) keep the interpreter's code."""
    import numpy as np
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    original = getattr(builder, "create_dot", None)
    if original is None:
        return
    exact = (np.float16, np.float32, np.float64)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.data.dtype.type not in exact or b.data.dtype.type not in exact:
            return original(self, a, b, d, input_precision, max_num_imprecise_acc)
        with np.errstate(all="ignore"):   # inf and NaN inputs (tests of them) give inf and NaN, as on a GPU
            product = np.matmul(a.data.astype(np.float64), b.data.astype(np.float64))
        return interpreter.TensorHandle(product.astype(d.data.dtype) + d.data, d.dtype.scalar)

    builder.create_dot = create_dot


if os.environ.get("TRITON_INTERPRET") == "1":
    _dots_rounded_once()

HAS_GPU = torch.cuda.is_available()
DEVICE = "cuda" if HAS_GPU else "cpu"


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return DEVICE

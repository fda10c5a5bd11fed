"""The correctness gate: a provider is timed only after its output (and, for modes with a
backward, every gradient) passed the spec's rule (section 4) on a small shape:

    max|out - ref| <= 2 * max|low - ref| + atol

ref: the reference in fp32 (fp64 for fp32 inputs) on the same inputs; low: the reference
in the input dtype; atol: one ulp of the input dtype at the scale of ref (mta_reference.numerics).
sdpa computes plain attention, so it is checked against the reference with op 'none'.
"""
import torch

import mta_reference
from mta_reference.numerics import rule_check

from .cases import Shape, make_inputs, make_weights

GATE_NOISE = 0.1  # stronger than the timing weights' 0.01, so a wrong conv or mix shows


def gate_shape(shape: Shape, on_gpu: bool) -> Shape:
    """Same heads and head dim as the timed shape; short L that is not a multiple of a block."""
    return Shape(2, shape.H, shape.Hkv, 200, shape.D) if on_gpu else Shape(1, shape.H, shape.Hkv, 48, shape.D)


def _rule(name, out, ref, low, dtype):
    """None if ``out`` passes, else a one-line reason."""
    ok, err, bound, _ = rule_check(out, ref, low, dtype)
    if ok:
        return None
    return f"{name}: non-finite values" if not torch.isfinite(out.double()).all() else \
        f"{name}: max err {err:.2e} > bound {bound:.2e}"


def _run(fn, leaves, grad_out):
    """Output and, when grad_out is given, the gradients of every leaf."""
    out = fn()
    if grad_out is None:
        return out.detach(), []
    grads = torch.autograd.grad(out, leaves, grad_out)
    return out.detach(), list(grads)


def check(fn, provider: str, op: str, shape: Shape, dtype, conv, device, with_grad: bool):
    """Run the gate for ``fn`` (built by providers.build). Returns None if it passes, else
    the reason. Exceptions from ``fn`` propagate: the caller records them as errors."""
    torch.manual_seed(1234)
    q, k, v = make_inputs(shape, dtype, device, with_grad)
    ref_op = "none" if provider == "sdpa" else op
    w = make_weights(ref_op, shape.H, conv, device, with_grad, noise=GATE_NOISE)
    leaves = [q, k, v] + [t for t in w.values() if t is not None]
    grad_out = torch.randn_like(q) if with_grad else None
    ref_dtype = torch.float64 if dtype == torch.float32 else torch.float32

    def reference(compute_dtype):
        return mta_reference.mta_attention(q, k, v, **w, causal=True, pad_key="both",
                                           compute_dtype=compute_dtype)

    got = _run(lambda: fn(q, k, v, w), leaves, grad_out)
    ref = _run(lambda: reference(ref_dtype), leaves, grad_out)
    low = _run(lambda: reference(dtype), leaves, grad_out)
    names = ["out"] + ["dq", "dk", "dv"] + [f"d{p}" for p, t in w.items() if t is not None]
    for name, o, r, lo in zip(names, [got[0]] + got[1], [ref[0]] + ref[1], [low[0]] + low[1]):
        reason = _rule(name, o, r, lo, dtype)
        if reason:
            return reason
    return None

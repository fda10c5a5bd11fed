"""The fused op as torch.library custom ops, so that autograd and torch.compile see it.

``mta_kernels::mta_fwd`` runs the Triton forward and returns (out, lse);
``mta_kernels::mta_bwd`` returns the seven gradients. Without MTA parts the backward is a
fused flash-attention backward (O(L) memory, deterministic); with head mixing alone
(talking heads, D <= 128 in 16 bits, 32 in fp32) a fused mixing backward
(``backward.FUSED_MIX_BACKWARD``, on by default), or for L = 2048 .. 16384 on CUDA the
row-chunked one of ``chunked_talking_heads``, which is faster there and reuses the chunked
forward's lse (``chunked_forward.prefer_chunked_talking_heads``).
With convs it is interim until fused conv backward kernels land:
``chunked_backward``, the reference backward one block of query rows at a time, with Triton
tensor-core kernels for the convs (exact; O(rows x L) memory, not O(L^2); 4x faster than
the materialized path at L=4096 on the H200, far from fused speed). Gradients are
returned only for inputs that require them (the others come back as empty tensors); the
paths with MTA weights also skip their work (frozen weights cost no weight-gradient
kernels or partials; launches for frozen q, k or v are skipped where they are separate).

Determinism: the backward is bitwise reproducible by default on every path, so it needs no
switch: no kernel uses atomics, and partial sums (weight gradients, GQA groups, key splits,
row chunks) are reduced in a fixed order. 50 repeated backward passes were checked on the
H200 for plain attention, talking heads and full MTA (tests/test_backward.py).

Eager calls skip the custom-op dispatch: ``MTAFunction``, a plain autograd.Function over
the same two implementations, costs a fraction of the host time per call (the custom op's
argument handling alone took ~30 us per call on a 2-core CPU, ~1 ms per talking-heads
forward+backward on the H200 machine's host). Under torch.compile the api calls the custom
ops, which the compiler can trace.
"""
import contextlib
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import backward
from . import chunked_forward as _chunked
from .backward import flash_backward
from .chunked_backward import chunked_backward
from .chunked_talking_heads import talking_heads_backward
from .forward import acc_dtype, mta_forward, uses_register_mixing
from .slabs import is_talking_heads


def _kernel_scale(q: Tensor, scale: float):
    """(q, scale) as the kernels should see them. Triton passes float arguments as fp32, so
    for fp64 inputs (gradchecks) the scale is folded into q instead; the caller undoes it
    in dq with _unfold_scale."""
    if q.dtype == torch.float64 and scale != 1.0:
        return q * scale, 1.0
    return q, scale


def _unfold_scale(dq: Tensor, scale: float, kernel_scale: float) -> Tensor:
    """dq with respect to q from dq with respect to the kernels' q (see _kernel_scale)."""
    return dq if kernel_scale == scale else dq * (scale / kernel_scale)


@contextlib.contextmanager
def _kernel_context(x: Tensor):
    """Run the implementations on x's device with autocast off. Triton launches on the
    current CUDA device, so make it x's; and the implementations choose their own dtypes
    (under an enclosing autocast the chunked paths' fp32 matmuls would come out in 16 bits
    and reach the conv kernels in the wrong dtype)."""
    device = torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
    with device, torch.autocast(x.device.type, enabled=False):
        yield


def forward_impl(q, k, v, pre_conv, pre_mix, post_conv, post_mix, causal, pad_key, scale):
    """(out (B, H, L, D) in q's dtype, lse (B, H, L) fp32; fp64 for fp64 inputs). The
    row-chunked forward where chunked_forward.prefer_chunked_forward says so (with convs, and
    talking heads at long lengths)."""
    if _chunked.prefer_chunked_forward(q, pre_conv, pre_mix, post_conv, post_mix):
        with _kernel_context(q):
            return _chunked.chunked_forward(q, k, v, pre_conv, pre_mix, post_conv, post_mix, causal=causal,
                                            pad_key=pad_key, scale=scale, compute_dtype=acc_dtype(q))
    q, scale = _kernel_scale(q, scale)
    with _kernel_context(q):
        return mta_forward(q, k, v, pre_conv, pre_mix, post_conv, post_mix, causal, pad_key, scale)


def backward_impl(grad_out, q, k, v, pre_conv, pre_mix, post_conv, post_mix, out, lse, causal, pad_key,
                  scale, needs_grad):
    """Gradients of (q, k, v, pre_conv, pre_mix, post_conv, post_mix); an empty tensor where
    needs_grad is False or the input is absent. out and lse are the forward's results."""
    inputs = (q, k, v, pre_conv, pre_mix, post_conv, post_mix)
    if not any(need and x is not None for need, x in zip(needs_grad, inputs)):
        return [q.new_empty(0) for _ in inputs]
    with _kernel_context(q):
        grads = _backward_grads(grad_out, q, k, v, pre_conv, pre_mix, post_conv, post_mix, out, lse,
                                causal, pad_key, scale, needs_grad)
    return [g.contiguous() if need and g is not None else q.new_empty(0)
            for g, need in zip(grads, needs_grad)]


@torch.library.custom_op("mta_kernels::mta_fwd", mutates_args=())
def mta_fwd(q: Tensor, k: Tensor, v: Tensor, pre_conv: Optional[Tensor], pre_mix: Optional[Tensor],
            post_conv: Optional[Tensor], post_mix: Optional[Tensor], causal: bool, pad_key: str,
            scale: float) -> Tuple[Tensor, Tensor]:
    """forward_impl as a custom op."""
    return forward_impl(q, k, v, pre_conv, pre_mix, post_conv, post_mix, causal, pad_key, scale)


@mta_fwd.register_fake
def _(q, k, v, pre_conv, pre_mix, post_conv, post_mix, causal, pad_key, scale):
    B, H, L, D = q.shape
    return q.new_empty(B, H, L, D), q.new_empty(B, H, L, dtype=acc_dtype(q))


@torch.library.custom_op("mta_kernels::mta_bwd", mutates_args=())
def mta_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, pre_conv: Optional[Tensor],
            pre_mix: Optional[Tensor], post_conv: Optional[Tensor], post_mix: Optional[Tensor],
            out: Tensor, lse: Tensor, causal: bool, pad_key: str, scale: float,
            needs_grad: List[bool]) -> List[Tensor]:
    """backward_impl as a custom op."""
    return backward_impl(grad_out, q, k, v, pre_conv, pre_mix, post_conv, post_mix, out, lse, causal,
                         pad_key, scale, needs_grad)


def _backward_grads(grad_out, q, k, v, pre_conv, pre_mix, post_conv, post_mix, out, lse, causal, pad_key, scale,
                    needs_grad):
    """The seven gradients (None for absent weights) from the fastest exact path available.
    The paths with mixing or convs compute only what needs_grad asks for (the conv weight
    gradients are a third of the chunked backward's time); plain attention's computes all."""
    inputs = (q, k, v, pre_conv, pre_mix, post_conv, post_mix)
    q_k, scale_k = _kernel_scale(q, scale)
    if all(w is None for w in inputs[3:]):
        dq, dk, dv = flash_backward(grad_out, q_k, k, v, out, lse, causal, scale_k)
        return _unfold_scale(dq, scale, scale_k), dk, dv, None, None, None, None
    if (backward.FUSED_MIX_BACKWARD
            and uses_register_mixing(pre_conv, pre_mix, post_conv, post_mix, q.shape[-1], q.element_size())
            and not _chunked.prefer_chunked_talking_heads(q, pre_conv, pre_mix, post_conv, post_mix)):
        needs_mix = [needs_grad[i] for i in (0, 1, 2, 4, 6)]   # q, k, v, pre_mix, post_mix
        dq, dk, dv, d_pre_mix, d_post_mix = backward.mix_backward(
            grad_out, q_k, k, v, pre_mix, post_mix, lse, causal, scale_k, needs=needs_mix)
        dq = None if dq is None else _unfold_scale(dq, scale, scale_k)
        return dq, dk, dv, None, d_pre_mix, None, d_post_mix
    if (_chunked.prefer_chunked_talking_heads(q, pre_conv, pre_mix, post_conv, post_mix)
            and is_talking_heads(pre_conv, pre_mix, post_conv, post_mix)):
        # the forward was chunked_forward's, whose lse (and scores) this backward reuses
        dq, dk, dv, d_pre_mix, d_post_mix = talking_heads_backward(
            grad_out, q, k, v, pre_mix, post_mix, lse, causal=causal, scale=scale, compute_dtype=acc_dtype(q),
            needs=[needs_grad[i] for i in (0, 1, 2, 4, 6)])
        return dq, dk, dv, None, d_pre_mix, None, d_post_mix
    return chunked_backward(grad_out, q, k, v, pre_conv, pre_mix, post_conv, post_mix,
                            causal=causal, pad_key=pad_key, scale=scale, compute_dtype=acc_dtype(q),
                            needs=needs_grad)


@mta_bwd.register_fake
def _(grad_out, q, k, v, pre_conv, pre_mix, post_conv, post_mix, out, lse, causal, pad_key, scale, needs_grad):
    inputs = (q, k, v, pre_conv, pre_mix, post_conv, post_mix)
    return [torch.empty_like(x, memory_format=torch.contiguous_format) if need and x is not None
            else q.new_empty(0) for x, need in zip(inputs, needs_grad)]


def _save_for_backward(ctx, inputs, out, lse):
    """What both autograd paths keep: the ten inputs (q .. scale) and the forward's results."""
    q, k, v, pre_conv, pre_mix, post_conv, post_mix, causal, pad_key, scale = inputs
    ctx.save_for_backward(q, k, v, pre_conv, pre_mix, post_conv, post_mix, out, lse)
    ctx.options = (causal, pad_key, scale)


def _input_grads(ctx, grad_out, backward_fn):
    """Gradients for the ten inputs from what _save_for_backward kept; ``backward_fn`` is
    mta_bwd (custom op) or backward_impl (eager), same signature."""
    q, k, v, pre_conv, pre_mix, post_conv, post_mix, out, lse = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:7]]
    grads = backward_fn(grad_out, q, k, v, pre_conv, pre_mix, post_conv, post_mix, out, lse,
                        *ctx.options, needs)
    return (*[g if need else None for g, need in zip(grads, needs)], None, None, None)


def _setup_context(ctx, inputs, output):
    out, lse = output
    _save_for_backward(ctx, inputs, out, lse)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    return _input_grads(ctx, grad_out, mta_bwd)


mta_fwd.register_autograd(_backward, setup_context=_setup_context)


class MTAFunction(torch.autograd.Function):
    """The eager path: forward_impl and backward_impl without the custom-op dispatch.
    apply(q, k, v, pre_conv, pre_mix, post_conv, post_mix, causal, pad_key, scale) -> out."""

    @staticmethod
    def forward(ctx, *inputs):
        out, lse = forward_impl(*inputs)
        _save_for_backward(ctx, inputs, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():
            # create_graph=True: the gradients would silently lack their own graph
            raise RuntimeError("mta_kernels.mta_attention has no double backward (create_graph=True); "
                               "use mta_reference.mta_attention where second derivatives are needed")
        return _input_grads(ctx, grad_out, backward_impl)

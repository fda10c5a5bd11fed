"""The op's forward and backward behind autograd: torch.library custom ops for torch.compile,
and a plain autograd.Function over the same implementations for eager calls.

``mta_kernels::mta_fwd`` returns (out, lse); ``mta_kernels::mta_bwd`` the seven gradients,
empty tensors where none was wanted. Eager calls skip the custom-op dispatch (its argument
handling costs host time on every call); under torch.compile the api calls the custom ops,
which the compiler traces. Both run forward_impl and backward_impl, so their bits agree.
"""
import contextlib
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .flash import flash_bwd, flash_fwd, lse_dtype
from .mta.backward import mta_chunked_bwd
from .mta.forward import mta_chunked_fwd
from .options import Options
from .talking_heads.backward import talking_heads_chunked_bwd
from .talking_heads.forward import talking_heads_chunked_fwd
from .utils import acc_dtype

# A tri-state option (None, False, True) as a custom op's int argument.
_TRI = {None: -1, False: 0, True: 1}
_TRI_BACK = {v: k for k, v in _TRI.items()}


def pack_options(o: Options) -> tuple:
    """Options as the custom ops' primitive arguments (chunk_rows, chunk_bytes, slab_dtype,
    pre_conv_matmul, causal_matmuls)."""
    return o.chunk_rows, o.chunk_bytes, o.slab_dtype, _TRI[o.pre_conv_matmul], _TRI[o.causal_matmuls]


def unpack_options(path, chunk_rows, chunk_bytes, slab_dtype, pre_conv_matmul, causal_matmuls) -> Options:
    return Options(path, chunk_rows, chunk_bytes, slab_dtype, _TRI_BACK[pre_conv_matmul], _TRI_BACK[causal_matmuls])


def flash_scale(q: Tensor, scale: float):
    """(q, scale) for the flash kernels, whose float arguments Triton passes as fp32: for fp64
    inputs (gradchecks) the scale goes into q instead (dq then takes it back)."""
    if q.dtype == torch.float64 and scale != 1.0:
        return q * scale, 1.0
    return q, scale


@contextlib.contextmanager
def _kernel_context(x: Tensor):
    """Launch on x's CUDA device with autocast off: the implementations choose their own dtypes."""
    device = torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
    with device, torch.autocast(x.device.type, enabled=False):
        yield


def forward_impl(q, k, v, weights, causal, pad_key, scale, options: Options):
    """(out (B, H, L, D) in q's dtype, lse (B, H, L)) on options.path: the lse in flash's
    lse_dtype(q) there, else in acc_dtype(q)."""
    with _kernel_context(q):
        if options.path == "flash":
            qk, sk = flash_scale(q, scale)
            return flash_fwd(qk, k, v, causal, sk)
        if options.path == "talking_heads":
            return talking_heads_chunked_fwd(q, k, v, weights[1], weights[3], causal=causal, scale=scale,
                                             options=options)
        return mta_chunked_fwd(q, k, v, weights, causal=causal, pad_key=pad_key, scale=scale, options=options)


def backward_impl(grad_out, q, k, v, weights, out, lse, causal, pad_key, scale, options: Options, needs):
    """Gradients of (q, k, v, pre_conv, pre_mix, post_conv, post_mix) on options.path; None where
    needs is False or the input is absent."""
    with _kernel_context(q):
        if options.path == "flash":
            qk, sk = flash_scale(q, scale)
            dq, dk, dv = flash_bwd(grad_out, qk, k, v, out, lse, causal, sk)
            if sk != scale:
                dq = dq * scale
            return dq, dk, dv, None, None, None, None
        if options.path == "talking_heads":
            dq, dk, dv, d_pre, d_post = talking_heads_chunked_bwd(
                grad_out, q, k, v, weights[1], weights[3], lse, causal=causal, scale=scale, options=options,
                needs=[needs[i] for i in (0, 1, 2, 4, 6)])
            return dq, dk, dv, None, d_pre, None, d_post
        return mta_chunked_bwd(grad_out, q, k, v, weights, causal=causal, pad_key=pad_key, scale=scale,
                               options=options, needs=needs)


def _grads_or_empty(q, grads, needs):
    """Contiguous gradients where wanted, empty tensors elsewhere (what mta_bwd returns)."""
    return [g.contiguous() if need and g is not None else q.new_empty(0) for g, need in zip(grads, needs)]


@torch.library.custom_op("mta_kernels::mta_fwd", mutates_args=())
def mta_fwd(q: Tensor, k: Tensor, v: Tensor, pre_conv: Optional[Tensor], pre_mix: Optional[Tensor],
            post_conv: Optional[Tensor], post_mix: Optional[Tensor], causal: bool, pad_key: str, scale: float,
            path: str, chunk_rows: int, chunk_bytes: int, slab_dtype: Optional[torch.dtype], pre_conv_matmul: int,
            causal_matmuls: int) -> Tuple[Tensor, Tensor]:
    """forward_impl as a custom op."""
    options = unpack_options(path, chunk_rows, chunk_bytes, slab_dtype, pre_conv_matmul, causal_matmuls)
    return forward_impl(q, k, v, (pre_conv, pre_mix, post_conv, post_mix), causal, pad_key, scale, options)


@mta_fwd.register_fake
def _(q, k, v, pre_conv, pre_mix, post_conv, post_mix, causal, pad_key, scale, path, *options):
    B, H, L, D = q.shape
    return q.new_empty(B, H, L, D), q.new_empty(B, H, L, dtype=lse_dtype(q) if path == "flash" else acc_dtype(q))


@torch.library.custom_op("mta_kernels::mta_bwd", mutates_args=())
def mta_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, pre_conv: Optional[Tensor],
            pre_mix: Optional[Tensor], post_conv: Optional[Tensor], post_mix: Optional[Tensor],
            out: Tensor, lse: Tensor, causal: bool, pad_key: str, scale: float, path: str, chunk_rows: int,
            chunk_bytes: int, slab_dtype: Optional[torch.dtype], pre_conv_matmul: int, causal_matmuls: int,
            needs_grad: List[bool]) -> List[Tensor]:
    """backward_impl as a custom op: the seven gradients, empty where not wanted."""
    options = unpack_options(path, chunk_rows, chunk_bytes, slab_dtype, pre_conv_matmul, causal_matmuls)
    weights = (pre_conv, pre_mix, post_conv, post_mix)
    grads = backward_impl(grad_out, q, k, v, weights, out, lse, causal, pad_key, scale, options, needs_grad)
    return _grads_or_empty(q, grads, needs_grad)


@mta_bwd.register_fake
def _(grad_out, q, k, v, pre_conv, pre_mix, post_conv, post_mix, out, lse, causal, pad_key, scale, path,
      chunk_rows, chunk_bytes, slab_dtype, pre_conv_matmul, causal_matmuls, needs_grad):
    inputs = (q, k, v, pre_conv, pre_mix, post_conv, post_mix)
    return [torch.empty_like(x, memory_format=torch.contiguous_format) if need and x is not None
            else q.new_empty(0) for x, need in zip(inputs, needs_grad)]


def _setup_context(ctx, inputs, output):
    out, lse = output
    ctx.save_for_backward(*inputs[:7], out, lse)
    ctx.rest = inputs[7:]       # causal, pad_key, scale and the packed options
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    *tensors, out, lse = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:7]]
    if not any(need and x is not None for need, x in zip(needs, tensors)):
        return (None,) * (7 + len(ctx.rest))
    grads = mta_bwd(grad_out, *tensors, out, lse, *ctx.rest, needs)
    return (*[g if need else None for g, need in zip(grads, needs)], *([None] * len(ctx.rest)))


mta_fwd.register_autograd(_backward, setup_context=_setup_context)


class MTAFunction(torch.autograd.Function):
    """The eager path: apply(q, k, v, pre_conv, pre_mix, post_conv, post_mix, causal, pad_key,
    scale, options) -> out, running forward_impl and backward_impl directly."""

    @staticmethod
    def forward(ctx, q, k, v, pre_conv, pre_mix, post_conv, post_mix, causal, pad_key, scale, options):
        weights = (pre_conv, pre_mix, post_conv, post_mix)
        out, lse = forward_impl(q, k, v, weights, causal, pad_key, scale, options)
        ctx.save_for_backward(q, k, v, *weights, out, lse)
        ctx.rest = (causal, pad_key, scale, options)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():
            # create_graph=True: the gradients would silently lack their own graph
            raise RuntimeError("mta_kernels.mta_attention has no double backward (create_graph=True); "
                               "use mta_reference.mta_attention where second derivatives are needed")
        q, k, v, *weights, out, lse = ctx.saved_tensors
        causal, pad_key, scale, options = ctx.rest
        needs = [bool(n) for n in ctx.needs_input_grad[:7]]
        if not any(need and x is not None for need, x in zip(needs, (q, k, v, *weights))):
            return (None,) * 11
        grads = backward_impl(grad_out, q, k, v, weights, out, lse, causal, pad_key, scale, options, needs)
        return (*[g if need else None for g, need in zip(grads, needs)], None, None, None, None)

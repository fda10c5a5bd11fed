"""Autograd glue for the fused op.

Interim backward (until the fused backward kernels land): it recomputes the forward with
the plain-PyTorch reference under autograd and differentiates that. It is exact, but it
materializes (B, H, L, L) tensors, so training memory is O(L^2) for now.
"""
import torch

import mta_reference
from .forward import mta_forward


class MTAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pre_conv, pre_mix, post_conv, post_mix, causal, pad_key, scale):
        out, lse = mta_forward(q, k, v, pre_conv, pre_mix, post_conv, post_mix, causal, pad_key, scale)
        ctx.save_for_backward(q, k, v, pre_conv, pre_mix, post_conv, post_mix)
        ctx.options = (causal, pad_key, scale)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        inputs = ctx.saved_tensors
        causal, pad_key, scale = ctx.options
        needs = ctx.needs_input_grad[:7]
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_(need) if x is not None else None
                      for x, need in zip(inputs, needs)]
            out = mta_reference.mta_attention(*leaves, causal=causal, pad_key=pad_key, scale=scale)
            wrt = [x for x, need in zip(leaves, needs) if need and x is not None]
            grads = iter(torch.autograd.grad(out, wrt, grad_out)) if wrt else iter(())
        result = [next(grads) if need and x is not None else None for x, need in zip(leaves, needs)]
        return (*result, None, None, None)

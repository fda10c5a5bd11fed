"""Gradients of the reference MTA written out as in docs/spec.md section 3 (materialized, O(L^2)).

The chain, per batch element and head: dA = dO v^T; post_mix^T; post conv^T on dA1
zeroed on F, then zeroed on F; dZ = P * (dP - Delta) with Delta = rowsum(P * dP) (not
rowsum(dO * O): O is not P v); pre_mix^T; pre conv^T, zeroed on F; dq = scale dS k,
dk = scale dS^T q. It is the non-autograd twin of ``mta_attention`` and is checked against
autograd in the tests.
"""
import torch
import torch.nn.functional as F

from .mta import forward_intermediates
from .validate import left_pad


def _conv_layout(w, pad_key):
    """(pads for F.pad, the conv2d weight (H, 1, cq, ck)) of ``key_query_conv``."""
    H, cq, ck = w.shape
    pL = left_pad(ck, pad_key)
    return (pL, ck - 1 - pL, cq - 1, 0), w[:, None]


def key_query_conv_input_grad(grad, w, pad_key):
    """Gradient of ``key_query_conv(x, w, pad_key)`` w.r.t. x (B, H, L, L): the transposed
    conv, which reads rows below and keys on the other side."""
    pads, w4 = _conv_layout(w, pad_key)
    B, H, Lq, Lk = grad.shape
    padded_shape = (B, H, Lq + pads[2], Lk + pads[0] + pads[1])
    dpadded = torch.nn.grad.conv2d_input(padded_shape, w4.to(grad.dtype), grad, groups=H)
    return dpadded[..., pads[2]:pads[2] + Lq, pads[0]:pads[0] + Lk]


def key_query_conv_weight_grad(grad, x, w, pad_key):
    """Gradient of ``key_query_conv(x, w, pad_key)`` w.r.t. w (H, cq, ck)."""
    pads, w4 = _conv_layout(w, pad_key)
    return torch.nn.grad.conv2d_weight(F.pad(x, pads), w4.shape, grad, groups=w.shape[0])[:, 0]


def key_query_conv_backward(grad, x, w, pad_key):
    """Gradients of ``key_query_conv(x, w, pad_key)``: (dx (B, H, L, L), dw (H, cq, ck))."""
    return key_query_conv_input_grad(grad, w, pad_key), key_query_conv_weight_grad(grad, x, w, pad_key)


def mix_heads_backward(grad, x, w):
    """Gradients of ``mix_heads(x, w)``: (dx (B, H, L, L), dw (G, ch, ch))."""
    B, H, Lq, Lk = x.shape
    G, ch, _ = w.shape
    g5 = grad.reshape(B, G, ch, Lq, Lk)
    x5 = x.reshape(B, G, ch, Lq, Lk)
    dx = torch.einsum("goc,bgoij->bgcij", w.to(x.dtype), g5).reshape(B, H, Lq, Lk)
    dw = torch.einsum("bgoij,bgcij->goc", g5, x5)
    return dx, dw


def _sum_kv_groups(x, Hkv):
    B, H, L, D = x.shape
    return x.reshape(B, Hkv, H // Hkv, L, D).sum(2)


def mta_attention_backward(grad_out, q, k, v, pre_conv=None, pre_mix=None, post_conv=None,
                           post_mix=None, *, causal=True, pad_key="both", scale=None,
                           compute_dtype=torch.float32):
    """Returns (dq, dk, dv, d_pre_conv, d_pre_mix, d_post_conv, d_post_mix), each in its input's
    dtype, None for an absent weight. grad_out: (B, H, L, D); the rest as ``mta_attention``."""
    t = forward_intermediates(q, k, v, pre_conv, pre_mix, post_conv, post_mix, causal=causal,
                              pad_key=pad_key, scale=scale, compute_dtype=compute_dtype)
    p, future, probs = t.problem, t.future, t.probs
    dout = grad_out.to(compute_dtype)

    # backward
    dv = torch.matmul(t.a.transpose(-1, -2), dout)
    da = torch.matmul(dout, t.v.transpose(-1, -2))
    d_post_mix = d_post_conv = d_pre_mix = d_pre_conv = None
    if post_mix is not None:
        da, d_post_mix = mix_heads_backward(da, t.a1, post_mix)
    dp = da
    if post_conv is not None:
        dp, d_post_conv = key_query_conv_backward(da.masked_fill(future, 0.0), probs, post_conv, pad_key)
        dp = dp.masked_fill(future, 0.0)
    delta = (probs * dp).sum(-1, keepdim=True)
    dm = probs * (dp - delta)
    dc = dm
    if pre_mix is not None:
        dc, d_pre_mix = mix_heads_backward(dm, t.c, pre_mix)
    ds = dc
    if pre_conv is not None:
        ds, d_pre_conv = key_query_conv_backward(dc, t.s0, pre_conv, pad_key)
        ds = ds.masked_fill(future, 0.0)
    dq = torch.matmul(ds, t.k) * p.scale
    dk = torch.matmul(ds.transpose(-1, -2), t.q) * p.scale

    def like(g, x):
        return None if x is None else g.to(x.dtype)

    return (dq.to(q.dtype), _sum_kv_groups(dk, p.Hkv).to(k.dtype), _sum_kv_groups(dv, p.Hkv).to(v.dtype),
            like(d_pre_conv, pre_conv), like(d_pre_mix, pre_mix), like(d_post_conv, post_conv),
            like(d_post_mix, post_mix))

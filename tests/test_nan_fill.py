"""Every fresh tensor filled with NaN (as fla's tests do): a tile a kernel forgets to write, or a
read of memory nothing wrote, then shows up as NaN in the output or a gradient instead of
passing silently on zero-filled memory. Each path, forward and backward, several chunks."""
import pytest
import torch

import mta_kernels
import mta_reference
from cases import Case, make_inputs
from tolerance import check_rule

NAMES = ("q", "k", "v", "pre_conv", "pre_mix", "post_conv", "post_mix")


@pytest.fixture
def nan_fill(monkeypatch):
    """torch.empty, torch.empty_like and Tensor.new_empty hand out NaN-filled floating tensors."""
    def filled(make):
        def fn(*args, **kwargs):
            t = make(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t
        return fn
    monkeypatch.setattr(torch, "empty", filled(torch.empty))
    monkeypatch.setattr(torch, "empty_like", filled(torch.empty_like))
    monkeypatch.setattr(torch.Tensor, "new_empty", filled(torch.Tensor.new_empty))


CASES = [
    (Case(B=2, H=4, Hkv=2, L=45, D=16), "flash"),
    (Case(B=2, H=4, L=45, D=16, pre_mix=4, post_mix=4), "talking_heads"),
    (Case(B=2, H=4, L=45, D=16, pre_mix=4, post_mix=4, causal=False), "talking_heads"),
    (Case(B=2, H=4, Hkv=2, L=45, D=16, pre_conv=(3, 5), pre_mix=2, post_conv=(2, 3), post_mix=4), "chunked"),
    (Case(H=4, L=45, D=16, post_conv=(3, 5), causal=False, pad_key="left"), "chunked"),
]


@pytest.mark.parametrize("case, path", CASES, ids=lambda x: x.id if isinstance(x, Case) else x)
def test_nan_filled_allocations_never_reach_results(case, path, nan_fill):
    q, k, v, *w = make_inputs(case, torch.float32, "cpu")
    inputs = [x if x is None else x.requires_grad_() for x in (q, k, v, *w)]
    present = [x for x in inputs if x is not None]
    opts = dict(causal=case.causal, pad_key=case.pad_key)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(5))

    def run(fn, **kw):
        out = fn(*inputs, **opts, **kw)
        return [out, *torch.autograd.grad(out, present, grad)]
    got = run(mta_kernels.mta_attention, kernel_options={"path": path, "chunk_rows": 16})
    ref = run(mta_reference.mta_attention, compute_dtype=torch.float64)
    low = run(mta_reference.mta_attention)
    names = ["out"] + [f"d{n}" for n, x in zip(NAMES, inputs) if x is not None]
    for name, g, r, lo in zip(names, got, ref, low):
        check_rule(name, g, r, lo, torch.float32)


def test_nan_filled_allocations_decode(nan_fill):
    case = Case(B=2, H=4, L=40, D=16, pre_conv=(3, 5), pre_mix=4, post_conv=(2, 3), post_mix=4)
    q, k, v, *w = make_inputs(case, torch.float32, "cpu")
    with torch.no_grad():
        for Lq in (1, 3):
            blk = dict(q_prev=q[:, :, :-Lq])
            got = mta_kernels.mta_attention(q[:, :, -Lq:], k, v, *w, **blk, kernel_options={"path": "decode"})
            ref = mta_reference.mta_attention(q[:, :, -Lq:], k, v, *w, **blk, compute_dtype=torch.float64)
            check_rule(f"decode {Lq}", got, ref, mta_reference.mta_attention(q[:, :, -Lq:], k, v, *w, **blk),
                       torch.float32)

"""Mixing groups of one head and a single head: every part against the reference.

A group of one head makes the mix a per-head scale, on each path that takes the call. The
output is checked as well as the gradients: a forward that loses the post mix's result is
invisible to the backward, which recomputes and never reads the forward's output.
"""
import pytest
import torch

import mta_kernels
import mta_reference
from cases import Case, make_inputs
from tolerance import check_rule

NAMES = ("q", "k", "v", "pre_conv", "pre_mix", "post_conv", "post_mix")

SMALL_GROUP_CASES = [
    Case(H=1, L=24, D=16, post_mix=1),
    Case(H=1, L=24, D=16, pre_mix=1),
    Case(H=1, L=24, D=16, pre_mix=1, post_mix=1),
    Case(H=1, L=24, D=16, pre_conv=(3, 5), pre_mix=1, post_conv=(2, 3), post_mix=1),
    Case(H=1, L=24, D=16, pre_conv=(3, 5)),
    Case(H=1, L=24, D=16, post_conv=(2, 3)),
    Case(H=2, L=20, D=16, post_mix=1),
    Case(H=2, L=20, D=16, pre_mix=1, post_mix=1),
    Case(H=2, L=20, D=16, post_conv=(2, 3), post_mix=1),
    Case(H=2, L=20, D=16, pre_conv=(3, 5), pre_mix=1, post_conv=(2, 3), post_mix=1),
    Case(H=4, L=20, D=16, pre_mix=1, post_mix=2),
    Case(B=2, H=2, Hkv=1, L=20, D=16, pre_mix=2, post_mix=1, causal=False),
]
FP16_CASES = [SMALL_GROUP_CASES[i] for i in (2, 3, 7, 11)]


def paths(case):
    """The paths that can run a case: both for talking heads, else the chunked one."""
    talking_heads = not (case.pre_conv or case.post_conv) and case.pre_mix and case.pre_mix == case.post_mix
    return ["talking_heads", "chunked"] if talking_heads else ["chunked"]


def params(cases, dtype, first_path_only=False):
    return [pytest.param(case, path, dtype, id=f"{case.id}-{path}-{str(dtype)[6:]}")
            for case in cases for path in (paths(case)[:1] if first_path_only else paths(case))]


def _scaled_mix(case, w):
    """Group-of-one mixes as plain scales away from 1, so a dropped mix cannot pass."""
    return None if w is None else (0.5 + torch.rand(w.shape, generator=torch.Generator().manual_seed(3))).to(w)


@pytest.mark.parametrize("case, path, dtype", params(SMALL_GROUP_CASES, torch.float32)
                         + params(FP16_CASES, torch.float16, first_path_only=True))
def test_small_groups_forward_and_gradients(case, path, dtype, device):
    q, k, v, pre_conv, pre_mix, post_conv, post_mix = make_inputs(case, dtype, device)
    if case.pre_mix == 1:
        pre_mix = _scaled_mix(case, pre_mix)
    if case.post_mix == 1:
        post_mix = _scaled_mix(case, post_mix)
    inputs = [x if x is None else x.detach().requires_grad_() for x in (q, k, v, pre_conv, pre_mix, post_conv, post_mix)]
    present = [x for x in inputs if x is not None]
    opts = dict(causal=case.causal, pad_key=case.pad_key)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(5)).to(device, dtype)

    def run(fn, **kw):
        out = fn(*inputs, **opts, **kw)
        return (out, *torch.autograd.grad(out, present, grad))

    got = run(mta_kernels.mta_attention, kernel_options={"path": path})
    ref = run(mta_reference.mta_attention, compute_dtype=torch.float64)
    low = run(mta_reference.mta_attention, compute_dtype=dtype)
    assert got[0].abs().max() > 0.1 * ref[0].abs().max(), "the output lost most of its size"
    names = ["out"] + [f"d{n}" for n, x in zip(NAMES, inputs) if x is not None]
    for name, g, r, lo in zip(names, got, ref, low):
        check_rule(name, g, r, lo, dtype)

"""Talking heads (pre_mix + post_mix over all heads) on the GPU through both paths: the
register-mixing kernels (mix_kernels.py, mix_bwd_kernels.py) and the row-chunked slabs
(chunked_forward.py with the post mix in the softmax's kernel, chunked_backward.py). First
the chunked paths against the reference under the spec's rule (bf16), then medians of fwd and
of fwd+bwd through the register kernels, the chunked ones, and the register forward with the
chunked backward (MTA_KERNELS_FUSED_MIX_BACKWARD=0), alternating, in one process. (Before
5705dce the switch chose each direction separately; notes/thpaths_h200_1ef2392.log also has
the chunked forward with the register backward.)

Usage: python scripts/talking_heads_paths.py [L ...]   (default 2048 4096 8192; "check": the checks
alone, which also run on the CPU under the interpreter with MTA_DEVICE=cpu MTA_DTYPE=float16)
"""
import os
import sys

import torch
import triton

import mta_reference as R
from mta_kernels import api, backward, chunked_forward
from tolerance import check_rule

torch.manual_seed(0)
B, H, D = 1, 16, 128
dev = os.environ.get("MTA_DEVICE", "cuda")
dtype = getattr(torch, os.environ.get("MTA_DTYPE", "bfloat16"))
mix = lambda: (R.identity_mix(H, H, device=dev) + 0.01 * torch.randn(1, H, H, device=dev)).requires_grad_()
pre_mix, post_mix = mix(), mix()


def run(q, k, v):
    return api.mta_attention(q, k, v, None, pre_mix, None, post_mix, causal=True)


def set_paths(fwd, bwd):
    """Both directions chunked, or the register forward with either backward."""
    chunked_forward.CHUNKED_TALKING_HEADS = "1" if fwd == "chunked" else "0"
    backward.FUSED_MIX_BACKWARD = bwd == "register"
    assert fwd == "register" or bwd == "chunked", "the chunked forward comes with the chunked backward"


# exactness on the GPU: both chunked paths against the fp64 reference, with the bf16 one's error
L = 1000 if dev == "cuda" else 100
q, k, v, do = (torch.randn(B, H, L, D, device=dev, dtype=dtype).requires_grad_() for _ in range(4))
set_paths("chunked", "chunked")
out = run(q, k, v)
grads = torch.autograd.grad(out, (q, k, v, pre_mix, post_mix), do)
w = (None, pre_mix.detach(), None, post_mix.detach())
ref = R.mta_attention(q.detach(), k.detach(), v.detach(), *w, compute_dtype=torch.float64)
low = R.mta_attention(q.detach(), k.detach(), v.detach(), *w, compute_dtype=dtype)


def check(what, name, got, ref, low):
    try:
        err, bound = check_rule(name, got, ref, low, dtype)
        print(f"L={L} chunked {what}: {name} error {err:.2e} <= {bound:.2e}", flush=True)
    except AssertionError as e:
        print(f"L={L} chunked {what}: FAILED {e}", flush=True)


check("forward", "out", out, ref, low)
ref_g = R.mta_attention_backward(do.detach(), q.detach(), k.detach(), v.detach(), *w, compute_dtype=torch.float64)
low_g = R.mta_attention_backward(do.detach(), q.detach(), k.detach(), v.detach(), *w, compute_dtype=dtype)
ref_g = [g for g in ref_g if g is not None]
low_g = [g for g in low_g if g is not None]
for name, g, r, lo in zip(("dq", "dk", "dv", "d_pre_mix", "d_post_mix"), grads, ref_g, low_g):
    check("backward", name, g, r, lo)

for L in ([] if sys.argv[1:] == ["check"] else [int(x) for x in sys.argv[1:]] or [2048, 4096, 8192]):
    q, k, v, do = (torch.randn(B, H, L, D, device=dev, dtype=dtype).requires_grad_() for _ in range(4))
    for rnd in (1, 2):
        for fwd in ("register", "chunked"):
            set_paths(fwd, fwd)
            with torch.no_grad():
                t = triton.testing.do_bench(lambda: run(q, k, v), warmup=5, rep=50, return_mode="median")
            print(f"round {rnd} L={L} fwd {fwd}: {t:.3f} ms", flush=True)
        for fwd, bwd in (("register", "register"), ("register", "chunked"), ("chunked", "chunked")):
            set_paths(fwd, bwd)
            torch.cuda.reset_peak_memory_stats()
            t = triton.testing.do_bench(lambda: torch.autograd.grad(run(q, k, v), (q, k, v, pre_mix, post_mix), do),
                                        warmup=2, rep=50, return_mode="median")
            peak = torch.cuda.max_memory_allocated() / 2 ** 30
            print(f"round {rnd} L={L} fwd+bwd {fwd} forward, {bwd} backward: {t:.3f} ms, peak {peak:.2f} GiB",
                  flush=True)

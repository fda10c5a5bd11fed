"""Talking heads' forward at L=4096 (B=1, H=16, D=128, bf16, causal, all 16 heads mixed) under
in-process variants of the chunked path: cuBLAS or causal_matmul scores, the mix-softmax's
pre mix in two 16-bit dots (MIX16), its rows longest first, its block and warps. Each timed eager
(as the bench does) and as a replayed CUDA graph (the GPU alone), two rounds.
`python scripts/th_forward_variants.py [fwd+bwd]` (the second: forward and backward,
with the one-chunk and two-chunk forwards only)."""
import sys

import torch
import triton

import mta_reference as R
from mta_kernels import chunked_forward, mta_attention, slab_softmax

torch.manual_seed(0)
B, H, L, D = 1, 16, 4096, 128
q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
mix = R.identity_mix(H, H, device="cuda") + 0.01 * torch.randn(1, H, H, device="cuda")
fwd_bwd = sys.argv[1:] == ["fwd+bwd"]
if fwd_bwd:
    for t in (q, k, v, mix):
        t.requires_grad_()
    grad_out = torch.randn_like(q)

    def fn():
        for t in (q, k, v, mix):
            t.grad = None
        out = mta_attention(q, k, v, pre_mix=mix, post_mix=mix, causal=True)
        out.backward(grad_out)
        return q.grad
else:
    fn = lambda: mta_attention(q, k, v, pre_mix=mix, post_mix=mix, causal=True)
with torch.enable_grad() if fwd_bwd else torch.no_grad():
    ref = fn()
committed = dict(slab_softmax.MIX_SOFTMAX_CONFIG)
ALL = dict(mix16=True, longest=True, post16=True, exp2=True)
variants = {
    "cublas (session 19)": dict(causal=False, slab_bytes=False),
    "causal matmuls, 2 chunks": dict(slab_bytes=False),
    "all four, 2 chunks": dict(ALL, slab_bytes=False),
    "all four, 1 chunk": dict(ALL),
    "all four, 1 chunk, cuBLAS scores": dict(ALL, scores=False),
    "all four, 1 chunk, 4 stages": dict(ALL, cfg=dict(num_stages=4)),
}
if fwd_bwd:
    variants = {name: variants[name] for name in ("cublas (session 19)", "all four, 2 chunks", "all four, 1 chunk")}
for round in range(2):
    for name, var in variants.items():
        chunked_forward.CAUSAL_MATMULS = "auto" if var.get("causal", True) else "0"
        chunked_forward.CAUSAL_SCORES = var.get("scores", True)
        chunked_forward.SKIPPING_COUNTS_SLAB_BYTES = var.get("slab_bytes", True)
        slab_softmax.MIX16 = var.get("mix16", False)
        slab_softmax.LONGEST_FIRST = var.get("longest", False)
        slab_softmax.POST16 = var.get("post16", False)
        slab_softmax.EXP2 = var.get("exp2", False)
        slab_softmax.MIX_SOFTMAX_CONFIG = dict(committed, **var.get("cfg", {}))
        with torch.enable_grad() if fwd_bwd else torch.no_grad():
            out = fn()
            err = (out.float() - ref.float()).abs().max().item()
            eager = triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
            graph = triton.testing.do_bench_cudagraph(fn, rep=300, return_mode="median")
        print(f"round {round} {name:26s} eager {eager:.3f} ms, graph {graph:.3f} ms (max diff {err:.1e})", flush=True)

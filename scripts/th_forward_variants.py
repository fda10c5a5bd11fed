"""Talking heads' forward at L=4096 (B=1, H=16, D=128, bf16, causal, all 16 heads mixed) under
in-process variants of the chunked path: cuBLAS or causal_matmul scores, the mix-softmax's
pre mix in two 16-bit dots (MIX16), its rows longest first, its block and warps. Each timed eager
(as the bench does) and as a replayed CUDA graph (the GPU alone), two rounds.
`python scripts/th_forward_variants.py`."""
import torch
import triton

import mta_reference as R
from mta_kernels import chunked_forward, mta_attention, slab_softmax, slabs

torch.manual_seed(0)
B, H, L, D = 1, 16, 4096, 128
q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
mix = R.identity_mix(H, H, device="cuda") + 0.01 * torch.randn(1, H, H, device="cuda")
fn = lambda: mta_attention(q, k, v, pre_mix=mix, post_mix=mix, causal=True)
ref = fn()
committed = dict(slab_softmax.MIX_SOFTMAX_CONFIG)
ML = dict(mix16=True, longest=True)
variants = {
    "cublas (session 19)": dict(causal=False),
    "causal matmuls": dict(),
    "mix16 + longest first": ML,
    "+ post16": dict(ML, post16=True),
    "+ exp2": dict(ML, exp2=True),
    "+ post16 + exp2": dict(ML, post16=True, exp2=True),
    "+ both, cuBLAS scores": dict(ML, post16=True, exp2=True, scores=False),
    "+ both, 8192 elements": dict(ML, post16=True, exp2=True, cfg=dict(elements_16bit=8192)),
    "+ both, 2048 elements": dict(ML, post16=True, exp2=True, cfg=dict(elements_16bit=2048)),
    "+ both, 2 stages": dict(ML, post16=True, exp2=True, cfg=dict(num_stages=2)),
    "+ both, 4 stages": dict(ML, post16=True, exp2=True, cfg=dict(num_stages=4)),
}
for round in range(2):
    for name, var in variants.items():
        chunked_forward.CAUSAL_MATMULS = "auto" if var.get("causal", True) else "0"
        slabs.CAUSAL_SCORES = var.get("scores", True)
        slab_softmax.MIX16 = var.get("mix16", False)
        slab_softmax.LONGEST_FIRST = var.get("longest", False)
        slab_softmax.POST16 = var.get("post16", False)
        slab_softmax.EXP2 = var.get("exp2", False)
        slab_softmax.MIX_SOFTMAX_CONFIG = dict(committed, **var.get("cfg", {}))
        with torch.no_grad():
            out = fn()
            err = (out.float() - ref.float()).abs().max().item()
            eager = triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
            graph = triton.testing.do_bench_cudagraph(fn, rep=300, return_mode="median")
        print(f"round {round} {name:26s} eager {eager:.3f} ms, graph {graph:.3f} ms (max diff {err:.1e})", flush=True)

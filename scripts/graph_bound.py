"""How much of a call is the host's: each op's fwd and fwd+bwd timed as the bench times it (eager,
back to back) and as one CUDA graph replayed (no Python, no launch cost: the GPU's own time with
the same kernels), with SDPA's in the same process for ratios. B=1, H=16, L=4096, D=128, bf16,
causal, paper weights, all 16 heads mixed. `python scripts/graph_bound.py [L] [ops]`, ops
comma-separated (default all)."""
import sys

import torch
import torch.nn.functional as F
import triton

import mta_reference as R
from mta_kernels import mta_attention

torch.manual_seed(0)
L = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
B, H, D = 1, 16, 128
q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
conv = (R.identity_conv(H, 6, 11, device="cuda") + 0.01 * torch.randn(H, 6, 11, device="cuda")).requires_grad_()
mix = (R.identity_mix(H, H, device="cuda") + 0.01 * torch.randn(1, H, H, device="cuda")).requires_grad_()
grad_out = torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16)
all_ops = {
    "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    "none": lambda: mta_attention(q, k, v, causal=True),
    "talking_heads": lambda: mta_attention(q, k, v, pre_mix=mix, post_mix=mix, causal=True),
    "full": lambda: mta_attention(q, k, v, conv, mix, conv, mix, causal=True, pad_key="both"),
}
ops = {name: all_ops[name] for name in (sys.argv[2].split(",") if len(sys.argv) > 2 else all_ops)}


def steps(fn):
    def fwd():
        with torch.no_grad():
            fn()

    def fwd_bwd():
        for t in (q, k, v, conv, mix):
            t.grad = None
        fn().backward(grad_out)
    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def graphed(step):
    """step captured once in a CUDA graph (after warm-up runs on a side stream); its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


tag = " ".join(sys.argv[2:]) + " " if len(sys.argv) > 2 else ""
for round in range(2):
    for name, fn in ops.items():
        for mode, step in steps(fn).items():
            eager = triton.testing.do_bench(step, warmup=5, rep=200, return_mode="median")
            try:
                replay = graphed(step)
                graph = triton.testing.do_bench(replay, warmup=5, rep=200, return_mode="median")
                text = f"graph {graph:.3f} ms"
            except Exception as error:     # a host sync or an allocation the capture refuses
                text = f"graph failed: {type(error).__name__}: {str(error)[:200]}"
            print(f"{tag}round {round} {name:14s} {mode:8s} eager {eager:.3f} ms, {text}", flush=True)

"""Talking heads at B=1, H=16, L=4096 (or the first argument), D=128, bf16, causal: the register
kernels against the row-chunked paths in one process, timed as the benchmark times them
(bench.timing.measure, the README's method), alternating over three rounds after a full-MTA
warm-up; then each path's host time per call (launches only, the GPU idle at the start) against
its GPU time, and the chunked paths' top kernels (torch.profiler)."""
import statistics
import sys
import time

import torch

from bench.cases import Shape, make_inputs, make_weights
from bench.timing import measure
from mta_kernels import api, backward, chunked_forward

L = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
shape = Shape(B=1, H=16, Hkv=16, L=L, D=128)
torch.manual_seed(0)


def call(w, q, k, v):
    return api.mta_attention(q, k, v, **w, causal=True, pad_key="both")


def set_path(path):
    chunked_forward.CHUNKED_TALKING_HEADS = "1" if path == "chunked" else "0"
    backward.FUSED_MIX_BACKWARD = True


def steps(op, with_grad):
    """(step, leaves) as bench.runner times fwd (with_grad False) or fwd+bwd."""
    q, k, v = make_inputs(shape, torch.bfloat16, "cuda", with_grad)
    w = make_weights(op, shape.H, (6, 11), "cuda", with_grad)
    if not with_grad:
        return (lambda: call(w, q, k, v)), []
    grad = torch.randn_like(q)
    return (lambda: call(w, q, k, v).backward(grad)), [q, k, v] + [t for t in w.values() if t is not None]


full_step, full_leaves = steps("full", True)
print(f"warm-up full MTA fwd+bwd: {measure(full_step, full_leaves, True)['median_ms']:.2f} ms", flush=True)
for rnd in (1, 2, 3):
    for mode, with_grad in (("fwd", False), ("fwd+bwd", True)):
        for path in ("register", "chunked"):
            set_path(path)
            step, leaves = steps("talking_heads", with_grad)
            r = measure(step, leaves, True)
            print(f"round {rnd} L={L} talking heads {mode} {path}: {r['median_ms']:.3f} ms "
                  f"[{r['p20_ms']:.3f}, {r['p80_ms']:.3f}], peak {r['peak_mem_gib']:.3f} GiB", flush=True)

for mode, with_grad in (("fwd", False), ("fwd+bwd", True)):
    for path in ("register", "chunked"):
        set_path(path)
        step, leaves = steps("talking_heads", with_grad)
        step()
        host = []
        for _ in range(20):
            for t in leaves:
                t.grad = None
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            host.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
        print(f"host time per call, talking heads {mode} {path}: {statistics.median(host):.3f} ms", flush=True)

set_path("chunked")
for mode, with_grad in (("fwd", False), ("fwd+bwd", True)):
    step, leaves = steps("talking_heads", with_grad)
    step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(f"chunked talking heads {mode}:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60), flush=True)

"""Why full MTA's fwd+bwd time jumps between bench processes (10.5 against 13.4 ms at L=4096 on the
H200, kernels unchanged): each of N calls timed alone with CUDA events (GPU time) and the wall clock
(host time to issue it, then to finish), with Python's garbage collector on and off, and the CUDA
caching allocator's counters (cudaMalloc calls, retries) around each batch. B=1, H=16, L=4096,
D=128, bf16, causal, paper weights; `python scripts/bwd_jitter.py [L] [ops]`."""
import gc
import statistics
import sys
import time

import torch

import mta_reference as R
from mta_kernels import mta_attention

torch.manual_seed(0)
L = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
ops = sys.argv[2].split(",") if len(sys.argv) > 2 else ["full", "talking_heads"]
B, H, D = 1, 16, 128
q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
conv = (R.identity_conv(H, 6, 11, device="cuda") + 0.01 * torch.randn(H, 6, 11, device="cuda")).requires_grad_()
mix = (R.identity_mix(H, H, device="cuda") + 0.01 * torch.randn(1, H, H, device="cuda")).requires_grad_()
weights = {"full": dict(pre_conv=conv, pre_mix=mix, post_conv=conv, post_mix=mix),
           "talking_heads": dict(pre_mix=mix, post_mix=mix)}
grad_out = torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16)


def step(w):
    for t in (q, k, v, *w.values()):
        t.grad = None
    mta_attention(q, k, v, **w, causal=True, pad_key="both").backward(grad_out)


def batch(w, n, collect):
    """GPU, issue and wall times (ms) of n calls, each alone; allocator counter deltas."""
    (gc.enable if collect else gc.disable)()
    before = torch.cuda.memory_stats()
    gpu, issue, wall = [], [], []
    for _ in range(n):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        step(w)
        end.record()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        gpu.append(start.elapsed_time(end))
        issue.append((t1 - t0) * 1e3)
        wall.append((t2 - t0) * 1e3)
    after = torch.cuda.memory_stats()
    gc.enable()
    counters = {key: after.get(key, 0) - before.get(key, 0)
                for key in ("num_alloc_retries", "segment.all.allocated", "num_device_alloc", "num_sync_all_streams")}
    return gpu, issue, wall, counters


def spread(x):
    return f"median {statistics.median(x):.2f} [min {min(x):.2f}, max {max(x):.2f}]"


for op in ops:
    w = weights[op]
    step(w)
    for round in range(3):
        for collect in (True, False):
            gpu, issue, wall, counters = batch(w, 15, collect)
            print(f"{op} L={L} round {round} gc {'on' if collect else 'off'}: GPU {spread(gpu)}; "
                  f"issue {spread(issue)}; wall {spread(wall)}; allocator {counters}", flush=True)
            print(f"{op}   GPU times: {' '.join(f'{t:.2f}' for t in gpu)}", flush=True)

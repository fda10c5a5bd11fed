"""Where the host (Python) time of a fused call goes, function by function (cProfile), for the
calls whose GPU time is close to their host time: talking heads through the row-chunked paths
and plain attention, B=1, H=16, L=4096 (or the first argument), D=128, bf16, causal, paper
weights. For each: the host time per call (launches only, the GPU idle at the start), then
cProfile's top functions by own and by cumulative time over 10 calls. GPU only. step() and
host_ms() serve scripts/talking_heads_ab.py too."""
import cProfile
import io
import pstats
import statistics
import sys
import time

import torch

from bench.cases import Shape, make_inputs, make_weights
from mta_kernels import api, chunked_forward


def step(op, with_grad, L):
    """(closure, leaves) of one forward (with_grad False) or forward+backward of ``op`` at
    B=1, H=16, D=128, bf16, as bench.runner times them; leaves: what needs .grad reset."""
    shape = Shape(B=1, H=16, Hkv=16, L=L, D=128)
    q, k, v = make_inputs(shape, torch.bfloat16, "cuda", with_grad)
    w = make_weights(op, shape.H, (6, 11), "cuda", with_grad)
    call = lambda: api.mta_attention(q, k, v, **w, causal=True, pad_key="both")
    if not with_grad:
        return call, []
    grad = torch.randn_like(q)
    return (lambda: call().backward(grad)), [q, k, v] + [t for t in w.values() if t is not None]


def host_ms(fn, leaves, n=20):
    """Median host time of one call started on an idle GPU."""
    times = []
    for _ in range(n):
        for t in leaves:
            t.grad = None
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def main(L):
    torch.manual_seed(0)
    chunked_forward.CHUNKED_TALKING_HEADS = "1"
    for op in ("talking_heads", "none"):
        for mode, with_grad in (("fwd", False), ("fwd+bwd", True)):
            fn, leaves = step(op, with_grad, L)
            fn()
            print(f"host time per call, L={L} {op} {mode}: {host_ms(fn, leaves):.3f} ms", flush=True)
            profile = cProfile.Profile()
            for _ in range(10):
                for t in leaves:
                    t.grad = None
                torch.cuda.synchronize()
                profile.enable()
                fn()
                profile.disable()
            torch.cuda.synchronize()
            text = io.StringIO()
            stats = pstats.Stats(profile, stream=text)
            stats.sort_stats("tottime").print_stats(25)
            stats.sort_stats("cumulative").print_stats(30)
            print(f"cProfile, 10 calls, L={L} {op} {mode}:\n{text.getvalue()}", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 4096)

"""Talking heads at B=1, H=16, L=4096 (or the first argument), D=128, bf16, causal: the register
kernels against the row-chunked paths in one process, timed as the benchmark times them
(bench.timing.measure, the README's method), alternating over three rounds after a full-MTA
warm-up; then each path's host time per call (launches only, the GPU idle at the start) against
its GPU time, and the chunked paths' top kernels (torch.profiler)."""
import sys

import torch

from bench.timing import measure
from host_profile import host_ms, step
from mta_kernels import backward, chunked_forward

L = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
torch.manual_seed(0)


def set_path(path):
    chunked_forward.CHUNKED_TALKING_HEADS = "1" if path == "chunked" else "0"
    backward.FUSED_MIX_BACKWARD = True


steps = lambda op, with_grad: step(op, with_grad, L)
full_step, full_leaves = steps("full", True)
print(f"warm-up full MTA fwd+bwd: {measure(full_step, full_leaves, True)['median_ms']:.2f} ms", flush=True)
for rnd in (1, 2, 3):
    for mode, with_grad in (("fwd", False), ("fwd+bwd", True)):
        for path in ("register", "chunked"):
            set_path(path)
            fn, leaves = steps("talking_heads", with_grad)
            r = measure(fn, leaves, True)
            print(f"round {rnd} L={L} talking heads {mode} {path}: {r['median_ms']:.3f} ms "
                  f"[{r['p20_ms']:.3f}, {r['p80_ms']:.3f}], peak {r['peak_mem_gib']:.3f} GiB", flush=True)

for mode, with_grad in (("fwd", False), ("fwd+bwd", True)):
    for path in ("register", "chunked"):
        set_path(path)
        fn, leaves = steps("talking_heads", with_grad)
        fn()
        host = host_ms(fn, leaves)
        print(f"host time per call, talking heads {mode} {path}: {host:.3f} ms", flush=True)

set_path("chunked")
for mode, with_grad in (("fwd", False), ("fwd+bwd", True)):
    fn, leaves = steps("talking_heads", with_grad)
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    print(f"chunked talking heads {mode}:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60), flush=True)

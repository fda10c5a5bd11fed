"""Where the row-chunked forward and backward (the paths for calls with convs) spend their time
on the GPU: torch.profiler over one call of each at B=1, H=16, L=4096, D=128 (or `python
scripts/profile_chunked.py B L D`), bf16, paper weights; prints each call's median time and its
top CUDA kernels."""
import sys

import torch
import triton

import mta_reference as R
from mta_kernels import slabs
from mta_kernels.chunked_backward import chunked_backward
from mta_kernels.chunked_forward import chunked_forward

torch.manual_seed(0)
B, L, D = (int(x) for x in sys.argv[1:4]) if len(sys.argv) > 3 else (1, 4096, 128)
H = 16
print(f"B={B} H={H} L={L} D={D}")
q, k, v, do = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
conv = R.identity_conv(H, 6, 11, device="cuda") + 0.01 * torch.randn(H, 6, 11, device="cuda")
mix = R.identity_mix(H, H, device="cuda") + 0.01 * torch.randn(1, H, H, device="cuda")
w = (conv, mix, conv, mix)
scale = D ** -0.5


def backward():
    return chunked_backward(do, q, k, v, *w, causal=True, pad_key="both", scale=scale)


def forward():
    return chunked_forward(q, k, v, *w, causal=True, pad_key="both", scale=scale)


for tf32 in (False, True):
    slabs.TF32_MATMULS = tf32
    t = triton.testing.do_bench(backward, warmup=2, rep=20, return_mode="median")
    print(f"chunked backward, TF32 matmuls {tf32}: {t:.1f} ms", flush=True)
for name, fn in (("chunked forward", forward), ("chunked backward", backward)):
    t = triton.testing.do_bench(fn, warmup=2, rep=20, return_mode="median")
    print(f"{name}: {t:.2f} ms", flush=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70), flush=True)

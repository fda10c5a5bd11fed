"""Where the row-chunked backward (the path for calls with convs) spends its time on the GPU:
torch.profiler over one call at B=1, H=16, L=4096, D=128 (or `python scripts/profile_chunked.py
B L D`), bf16, paper weights; prints the top CUDA kernels and the wall time of each stage."""
import sys

import torch
import triton

import mta_reference as R
from mta_kernels import slabs
from mta_kernels.chunked_backward import chunked_backward
from mta_reference.mta import forward_intermediates

torch.manual_seed(0)
B, L, D = (int(x) for x in sys.argv[1:4]) if len(sys.argv) > 3 else (1, 4096, 128)
H = 16
print(f"B={B} H={H} L={L} D={D}")
q, k, v, do = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
conv = R.identity_conv(H, 6, 11, device="cuda") + 0.01 * torch.randn(H, 6, 11, device="cuda")
mix = R.identity_mix(H, H, device="cuda") + 0.01 * torch.randn(1, H, H, device="cuda")
w = (conv, mix, conv, mix)
scale = D ** -0.5


def run():
    return chunked_backward(do, q, k, v, *w, causal=True, pad_key="both", scale=scale)


for tf32 in (False, True):
    slabs.TF32_MATMULS = tf32
    t = triton.testing.do_bench(run, warmup=2, rep=20, return_mode="median")
    print(f"chunked backward, TF32 matmuls {tf32}: {t:.1f} ms", flush=True)
rows = 256
t_fwd = triton.testing.do_bench(lambda: forward_intermediates(q, k, v, *w, causal=True, pad_key="both", scale=scale,
                                                              compute_dtype=torch.float32, row_range=(0, rows)),
                                warmup=2, rep=20, return_mode="median")
print(f"chunked backward {t:.1f} ms; forward_intermediates on {rows} rows {t_fwd:.2f} ms", flush=True)
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    run()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70))

"""Where talking heads' row-chunked forward and backward (chunked_forward, chunked_talking_heads)
spend their GPU time: torch.profiler over each at B=1, H=16, L=4096, D=128 (or `python
scripts/profile_talking_heads.py L`), bf16, all 16 heads mixed; prints each one's median time
and its top CUDA kernels."""
import sys

import torch
import triton

import mta_reference as R
from mta_kernels.chunked_forward import chunked_forward
from mta_kernels import chunked_talking_heads
from mta_kernels.chunked_talking_heads import talking_heads_backward

torch.manual_seed(0)
B, H, D = 1, 16, 128
L = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
q, k, v, do = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
pre, post = (R.identity_mix(H, H, device="cuda") + 0.01 * torch.randn(1, H, H, device="cuda") for _ in range(2))
scale = D ** -0.5
_, lse = chunked_forward(q, k, v, None, pre, None, post, causal=True, pad_key="both", scale=scale)
calls = {
    "forward": lambda: chunked_forward(q, k, v, None, pre, None, post, causal=True, pad_key="both", scale=scale),
    "backward": lambda: talking_heads_backward(do, q, k, v, pre, post, lse, causal=True, scale=scale),
}
# dA in bf16 (the default) against fp32, alternating
for _ in range(3):
    for bf16_da in (True, False):
        chunked_talking_heads.BF16_DA = bf16_da
        t = triton.testing.do_bench(calls["backward"], warmup=3, rep=30, return_mode="median")
        print(f"talking heads backward, L={L}, BF16_DA={bf16_da}: {t:.3f} ms", flush=True)
chunked_talking_heads.BF16_DA = True
for name, fn in calls.items():
    t = triton.testing.do_bench(fn, warmup=3, rep=30, return_mode="median")
    print(f"talking heads {name}, L={L}: {t:.3f} ms", flush=True)
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=70), flush=True)

"""Host (CPU) cost per call of the fused op against SDPA, and whether it shows in GPU timings:
enqueue time of N calls without synchronising (small L, so the GPU keeps up), and do_bench
medians of the talking-heads forward with 1, 2 and 4 key splits through mix_forward and
through mta_attention, alternated over three rounds (GPU only)."""
import time

import torch
import torch.nn.functional as F
import triton

import mta_reference as R
from mta_kernels import mta_attention
from mta_kernels.forward import mix_forward

dev = "cuda"
H, D = 16, 128
mix = R.identity_mix(H, H, device=dev) + 0.01 * torch.randn(1, H, H, device=dev)
conv = R.identity_conv(H, 6, 11, device=dev) + 0.01 * torch.randn(H, 6, 11, device=dev)
OPS = {"sdpa": None, "none": {}, "talking_heads": dict(pre_mix=mix, post_mix=mix),
       "full": dict(pre_conv=conv, pre_mix=mix, post_conv=conv, post_mix=mix)}


def enqueue_us(fn, n=50):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return host


L = 256
q, k, v = (torch.randn(1, H, L, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
for name, w in OPS.items():
    fwd = (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)) if w is None else (lambda: mta_attention(q, k, v, **w))
    with torch.no_grad():
        t_f = enqueue_us(fwd)
    t_fb = enqueue_us(lambda: fwd().sum().backward())
    print(f"L={L} {name}: host {t_f:.0f} us per forward, {t_fb:.0f} us per forward+backward", flush=True)

# where the host time of a talking-heads forward+backward goes, op by op
w = OPS["talking_heads"]
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    for _ in range(20):
        mta_attention(q, k, v, **w).sum().backward()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60), flush=True)

L = 2048
q, k, v = (torch.randn(1, H, L, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
scale = D ** -0.5
for rnd in range(2):
    for splits in (1, 2, 4):
        t_k = triton.testing.do_bench(lambda: mix_forward(q, k, v, mix, mix, True, scale, dict(splits=splits)), return_mode="median")
        print(f"round {rnd} L={L} talking heads fwd, {splits} splits: mix_forward {t_k:.3f} ms", flush=True)
    t_api = triton.testing.do_bench(lambda: mta_attention(q, k, v, pre_mix=mix, post_mix=mix), return_mode="median")
    t_raw = triton.testing.do_bench(lambda: mta_attention(q, k, v, pre_mix=mix, post_mix=mix), return_mode="median")
    print(f"round {rnd} L={L} talking heads fwd, default splits: mta_attention {t_api:.3f} / {t_raw:.3f} ms", flush=True)

"""Full MTA's chunked forward and backward (B=1, H=16, L=4096 or argv[1], D=128, bf16, causal, paper
weights) with slab conv configurations alternating in one process: each round times every
configuration's forward and backward (do_bench medians), the host time of one call started on an
idle GPU (launches only: host-bound where it nears the GPU time), and the GPU kernels' sum.

    python scripts/conv_config_ab.py 4096 "TILES=8" "TILES=8 tma=1 maxnreg=128"

Each argument after the length is one configuration: KEY=VALUE pairs over the committed
slab_conv.CONV_CONFIG (integers; maxnreg=0 no cap)."""
import statistics
import sys
import time

import torch
import triton

import mta_reference as R
from mta_kernels import slab_conv
from mta_kernels.chunked_backward import chunked_backward
from mta_kernels.chunked_forward import chunked_forward


def config(text):
    cfg = dict(slab_conv.CONV_CONFIG)
    for pair in text.split():
        key, value = pair.split("=")
        cfg[key] = int(value)
    return cfg


def host_ms(fn, n=10):
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def gpu_sum_ms(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.device_time_total for e in prof.key_averages()) / 1e3


def main(L, texts):
    torch.manual_seed(0)
    B, H, D = 1, 16, 128
    q, k, v, do = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    conv = R.identity_conv(H, 6, 11, device="cuda") + 0.01 * torch.randn(H, 6, 11, device="cuda")
    mix = R.identity_mix(H, H, device="cuda") + 0.01 * torch.randn(1, H, H, device="cuda")
    w, scale = (conv, mix, conv, mix), D ** -0.5
    calls = {"forward": lambda: chunked_forward(q, k, v, *w, causal=True, pad_key="both", scale=scale),
             "backward": lambda: chunked_backward(do, q, k, v, *w, causal=True, pad_key="both", scale=scale)}
    for round_ in range(3):
        for text in texts:
            slab_conv.CONV_CONFIG = config(text)
            for name, fn in calls.items():
                fn()
                t = triton.testing.do_bench(fn, warmup=5, rep=100, return_mode="median")
                print(f"round {round_} L={L} [{text}] {name}: {t:.3f} ms, host {host_ms(fn):.3f} ms, "
                      f"GPU kernels {gpu_sum_ms(fn):.3f} ms", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2:])

"""Kernel-by-kernel profile of one mta_attention call (torch.profiler): each kernel's total
GPU time and count, the launches per call, and the host's and the GPU's time per call.

    python scripts/profile_path.py --op full --shape 1,16,4096,128 --mode fwd+bwd [--path chunked]
"""
import argparse
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from time_paths import weights  # noqa: E402


def main(argv):
    ap = argparse.ArgumentParser()
    ap.add_argument("--op", default="full")
    ap.add_argument("--shape", default="1,16,4096,128")
    ap.add_argument("--mode", default="fwd+bwd")
    ap.add_argument("--path", default=None)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args(argv)
    from mta_kernels import mta_attention
    B, H, L, D = (int(x) for x in args.shape.split(","))
    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    ws = weights(args.op, H, "cuda")
    kw = dict(kernel_options={"path": args.path}) if args.path else {}

    def call():
        with torch.set_grad_enabled(args.mode != "fwd"):
            o = mta_attention(q, k, v, **ws, **kw)
            if args.mode == "fwd+bwd":
                o.backward(do)

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    call()
    host_ms = (time.perf_counter() - t0) * 1e3      # until the host has issued everything
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1e3
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        call()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_us = sum(e.self_device_time_total for e in kernels)
    launches = sum(e.count for e in kernels)
    print(f"== {args.op} {args.mode} B{B} H{H} L{L} D{D} path={args.path or 'auto'}: {launches} kernel launches, "
          f"GPU busy {gpu_us / 1e3:.3f} ms, host issue {host_ms:.3f} ms, wall {wall_ms:.3f} ms")
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:args.top]:
        print(f"{e.self_device_time_total / 1e3:9.3f} ms {e.count:5d}x  {e.key[:110]}")


if __name__ == "__main__":
    main(sys.argv[1:])

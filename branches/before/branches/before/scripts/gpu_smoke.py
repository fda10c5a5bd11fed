"""Quick GPU check used during development: correctness at one shape per op, then timings
of the fused forward against SDPA (same run, medians of triton.testing.do_bench)."""
import torch
import torch.nn.functional as F
import triton

import mta_kernels
import mta_reference as R

torch.manual_seed(0)
dev = "cuda"


def weights(H, op):
    w = {}
    if op in ("full",):
        w["pre_conv"] = R.identity_conv(H, 6, 11, device=dev) + 0.01 * torch.randn(H, 6, 11, device=dev)
        w["post_conv"] = R.identity_conv(H, 6, 11, device=dev) + 0.01 * torch.randn(H, 6, 11, device=dev)
    if op in ("full", "talking"):
        w["pre_mix"] = R.identity_mix(H, H, device=dev) + 0.01 * torch.randn(1, H, H, device=dev)
        w["post_mix"] = R.identity_mix(H, H, device=dev) + 0.01 * torch.randn(1, H, H, device=dev)
    return w


def check(B, H, L, D, op, dtype=torch.bfloat16):
    q, k, v = (torch.randn(B, H, L, D, device=dev, dtype=dtype) for _ in range(3))
    w = weights(H, op)
    out = mta_kernels.mta_attention(q, k, v, **w)
    ref = R.mta_attention(q, k, v, **w, compute_dtype=torch.float32)
    low = R.mta_attention(q, k, v, **w, compute_dtype=dtype)
    err = (out.float() - ref).abs().max().item()
    base = (low.float() - ref).abs().max().item()
    print(f"check {op:8s} L={L} D={D}: err {err:.3e} low-dtype err {base:.3e} {'OK' if err <= 2 * base + 1e-6 else 'FAIL'}", flush=True)


def bench(B, H, L, D, op, dtype=torch.bfloat16):
    q, k, v = (torch.randn(B, H, L, D, device=dev, dtype=dtype) for _ in range(3))
    w = weights(H, op)
    t_fused = triton.testing.do_bench(lambda: mta_kernels.mta_attention(q, k, v, **w), return_mode="median")
    t_sdpa = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), return_mode="median")
    print(f"time {op:8s} B={B} H={H} L={L} D={D}: fused {t_fused:.3f} ms, sdpa {t_sdpa:.3f} ms, ratio {t_fused / t_sdpa:.1f}x", flush=True)


if __name__ == "__main__":
    for op in ("none", "talking", "full"):
        check(1, 16, 1024, 128, op)
    for op in ("none", "talking", "full"):
        bench(1, 16, 4096, 128, op)

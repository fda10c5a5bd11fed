"""Where the general kernel's time goes: time it with one MTA part at a time, then all of
them (B=1, H=16, L=4096, D=128, bf16, paper sizes), each forced through the general kernel
and checked against the reference on a shorter sequence first. The differences between
rows place the cost of each stage without hardware counters."""
import torch
import torch.nn.functional as F
import triton

import mta_reference as R
from mta_kernels.forward import mta_forward

torch.manual_seed(0)
B, H, L, D = 1, 16, 4096, 128
q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
scale = D ** -0.5
conv = R.identity_conv(H, 6, 11, device="cuda") + 0.01 * torch.randn(H, 6, 11, device="cuda")
mix = R.identity_mix(H, H, device="cuda") + 0.01 * torch.randn(1, H, H, device="cuda")
t_sdpa = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), return_mode="median")
print(f"sdpa {t_sdpa:.3f} ms", flush=True)
variants = {
    "none": {}, "pre_conv": dict(pre_conv=conv), "post_conv": dict(post_conv=conv),
    "pre_mix": dict(pre_mix=mix), "post_mix": dict(post_mix=mix), "both mixes": dict(pre_mix=mix, post_mix=mix),
    "both convs": dict(pre_conv=conv, post_conv=conv), "full": dict(pre_conv=conv, pre_mix=mix, post_conv=conv, post_mix=mix),
}
runs = [(name, parts, {"general": True}) for name, parts in variants.items()]
# key splits (1 = the row blocks alone) and row-frame heights for the full op
runs += [(f"full RF={rf} splits={sp}", variants["full"], {"general": True, "RF": rf, "splits": sp})
         for rf in (32, 64) for sp in (1, 2, 4, 8)]
runs += [(f"full RF=64 splits=4 8 warps", variants["full"], {"general": True, "RF": 64, "splits": 4, "num_warps": 8})]
runs += [(f"both convs splits={sp}", variants["both convs"], {"general": True, "splits": sp}) for sp in (1, 2)]
for name, parts, cfg in runs:
    w = [parts.get(n) for n in ("pre_conv", "pre_mix", "post_conv", "post_mix")]
    short = [x[:, :, :512] for x in (q, k, v)]
    out, _ = mta_forward(*short, *w, True, "both", scale, cfg)
    err = (out.float() - R.mta_attention(*short, *w).float()).abs().max().item()
    t = triton.testing.do_bench(lambda: mta_forward(q, k, v, *w, True, "both", scale, cfg),
                                warmup=25, rep=200, return_mode="median")
    print(f"general kernel, {name:28s}: {t:8.3f} ms = {t / t_sdpa:6.1f}x sdpa (max err at L=512 {err:.1e})", flush=True)

"""A short check of the row-chunked backward on the GPU: its gradients against the reference
under the spec's rule (bf16, paper weights, several chunks, causal), then its time at B=1,
H=16, D=128, L=2048 and 4096 (bf16, causal). For device calls with little time left."""
import torch
import triton

import mta_reference as R
from mta_kernels.chunked_backward import chunked_backward
from tolerance import check_rule

torch.manual_seed(0)
H, D = 16, 128
conv = R.identity_conv(H, 6, 11, device="cuda") + 0.05 * torch.randn(H, 6, 11, device="cuda")
mix = R.identity_mix(H, H, device="cuda") + 0.05 * torch.randn(1, H, H, device="cuda")
w = (conv, mix, conv, mix)
names = ("dq", "dk", "dv", "d_pre_conv", "d_pre_mix", "d_post_conv", "d_post_mix")

L = 700
q, k, v, do = (torch.randn(1, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
got = chunked_backward(do, q, k, v, *w, causal=True, pad_key="both", scale=D ** -0.5, rows=128)
ref = R.mta_attention_backward(do, q, k, v, *w, compute_dtype=torch.float64)
low = R.mta_attention_backward(do, q, k, v, *w, compute_dtype=torch.bfloat16)
for name, g, r, lo in zip(names, got, ref, low):
    err, bound = check_rule(name, g, r, lo, torch.bfloat16)
    print(f"L={L}, 128-row chunks: {name} error {err:.2e} <= {bound:.2e}", flush=True)

for L in (2048, 4096):
    q, k, v, do = (torch.randn(1, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    t = triton.testing.do_bench(lambda: chunked_backward(do, q, k, v, *w, causal=True, pad_key="both",
                                                         scale=D ** -0.5), warmup=2, rep=20, return_mode="median")
    print(f"chunked backward B=1 H=16 L={L} D=128 bf16: {t:.2f} ms", flush=True)

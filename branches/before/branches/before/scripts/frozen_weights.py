"""What frozen inputs save in backward on the GPU: forward+backward of full MTA and of talking
heads through mta_attention with every input requiring grad, with the MTA weights frozen,
and with only the weights trainable (B=1, H=16, D=128, bf16, causal, paper weights; L from
argv, default 2048 and 4096). Medians of triton.testing.do_bench, ms."""
import sys

import torch
import triton

import mta_kernels
import mta_reference as R

torch.manual_seed(0)
H, D = 16, 128
conv = R.identity_conv(H, 6, 11, device="cuda") + 0.01 * torch.randn(H, 6, 11, device="cuda")
mix = R.identity_mix(H, H, device="cuda") + 0.01 * torch.randn(1, H, H, device="cuda")
OPS = {"full": (conv, mix, conv, mix), "talking heads": (None, mix, None, mix)}
SETTINGS = {"all": (True, True), "weights frozen": (True, False), "only weights": (False, True)}

for L in [int(x) for x in sys.argv[1:]] or [2048, 4096]:
    q, k, v, do = (torch.randn(1, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    for op, weights in OPS.items():
        for setting, (train_qkv, train_w) in SETTINGS.items():
            qkv = [x.clone().requires_grad_(train_qkv) for x in (q, k, v)]
            w = [None if x is None else x.clone().requires_grad_(train_w) for x in weights]
            wanted = [x for x in (*qkv, *w) if x is not None and x.requires_grad]

            def step():
                out = mta_kernels.mta_attention(*qkv, *w)
                return torch.autograd.grad(out, wanted, do)

            t = triton.testing.do_bench(step, warmup=2, rep=20, return_mode="median")
            print(f"L={L} {op} fwd+bwd, {setting} requiring grad: {t:.2f} ms", flush=True)

"""Time a query block of one row at the end of long contexts on the paths that can take it:
the fused decode step ('decode') and the row-chunked forward ('chunked'), for full MTA and
talking heads, against SDPA over the same cache, and check that the two paths agree.

    python scripts/time_decode_paths.py        # on a GPU; with TRITON_INTERPRET=1 on the CPU, only the check
"""
import os
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.cases import make_weights
from mta_kernels import mta_attention
H, D = 16, 128
dev = "cuda" if torch.cuda.is_available() else "cpu"
dt = torch.bfloat16 if dev == "cuda" else torch.float32
ctxs = [(1, 8192), (8, 8192), (1, 131072), (8, 32768)] if dev == "cuda" else [(1, 64)]
for B, ctx in ctxs:
    k, v = (torch.randn(B, H, ctx, D, device=dev, dtype=dt) for _ in range(2))
    q = torch.randn(B, H, 1, D, device=dev, dtype=dt)
    qp = torch.randn(B, H, 10, D, device=dev, dtype=dt)
    calls = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v)}
    for op in ("full", "talking_heads"):
        ws = make_weights(op, H, (6, 11), dev, requires_grad=False)
        for p in ("decode", "chunked"):
            calls[f"{op}:{p}"] = lambda ws=ws, p=p: mta_attention(q, k, v, **ws, q_prev=qp, kernel_options={"path": p})
    with torch.no_grad():
        ref = calls["full:chunked"]()
        print("full decode vs chunked max diff", (calls["full:decode"]() - ref).abs().max().item(), flush=True)
        if dev != "cuda":
            continue
        t = {n: do_bench(fn, warmup=3, rep=20, return_mode="median") for n, fn in calls.items()}
    print(f"B={B} ctx={ctx} " + " ".join(f"{n}={ms:.3f}ms({ms / t['sdpa']:.1f}x)" for n, ms in t.items()), flush=True)
    del k, v
    torch.cuda.empty_cache() if dev == "cuda" else None

"""Talking heads' causal matmuls (mta_kernels/causal_matmul.py, tensor descriptors) against cuBLAS
over the whole rectangle, per chunk of L=4096 in two (rows 0..2048 with keys 0..2048, rows
2048..4096 with all keys; `one` as the argument: all rows in one chunk), for several tile
configs; and the mix-softmax writing A's future as zeros or leaving it. H200, B=1, H=16, D=128,
bf16. `python scripts/causal_matmul_tune.py [one]`."""
import sys

import torch
import triton

import mta_reference as R
from mta_kernels import causal_matmul as cm, slab_softmax

torch.manual_seed(0)
H, L, D = 16, 4096, 128
q, k, v = (torch.randn(H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
w = (R.identity_mix(H, H, device="cuda") + 0.01 * torch.randn(1, H, H, device="cuda")).contiguous()
bench = lambda fn: triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")

one = sys.argv[1:] == ["one"]
for lo in ((0,) if one else (0, 2048)):
    R_ = L if one else 2048
    K = lo + R_
    s_ref = torch.bmm(q[:, lo:lo + R_], k[:, :K].transpose(1, 2))
    past = torch.arange(K, device="cuda")[None, :] <= torch.arange(R_, device="cuda")[:, None] + lo
    print(f"lo={lo}: cuBLAS scores {bench(lambda: torch.bmm(q[:, lo:lo + R_], k[:, :K].transpose(1, 2))):.4f} ms", flush=True)
    out = cm.scores_buffer(H, R_, K, torch.bfloat16, "cuda")
    committed = dict(cm.SCORES_CONFIG)
    for cfg in [dict(), dict(TILES=2), dict(TILES=4), dict(TILES=8), dict(TILES=32), dict(TILES=4, num_stages=2),
                dict(TILES=8, num_stages=2), dict(TILES=32, num_stages=2), dict(TILES=8, num_stages=3),
                dict(TILES=8, num_stages=2, num_warps=8), dict(TILES=8, BN=64, num_stages=2),
                dict(TILES=8, BM=64, num_stages=2)]:
        cm.SCORES_CONFIG = dict(committed, **cfg)
        fn = lambda: cm.causal_scores(q, k, out, row0=lo, zero_above=lo, precision="tf32")
        fn()
        err = (out.float() - s_ref.float())[:, past].abs().max().item()
        print(f"lo={lo} scores {cm.SCORES_CONFIG}: {bench(fn):.4f} ms (max err {err:.1e})", flush=True)
    cm.SCORES_CONFIG = committed
    a = cm.scores_buffer(H, R_, K, torch.bfloat16, "cuda")
    a.copy_(torch.rand(H, R_, K, device="cuda").masked_fill(~past, float("nan")))
    o_ref = torch.bmm(a.nan_to_num(0.0), v[:, :K])
    a0 = a.nan_to_num(0.0)
    print(f"lo={lo}: cuBLAS pv {bench(lambda: torch.bmm(a0, v[:, :K])):.4f} ms", flush=True)
    o = torch.empty(H, R_, D, device="cuda", dtype=torch.bfloat16)
    committed = dict(cm.PV_CONFIG)
    for cfg in [dict(), dict(num_stages=3), dict(num_stages=5), dict(BM=64, num_warps=4, num_stages=3),
                dict(BM=64, num_warps=4, num_stages=4), dict(BM=64, num_warps=4, num_stages=6),
                dict(BM=64, BN=128, num_warps=4, num_stages=3), dict(BN=128, num_stages=3)]:
        cm.PV_CONFIG = dict(committed, **cfg)
        fn = lambda: cm.causal_pv(a, v, o, zero_above=lo, precision="tf32")
        fn()
        err = (o.float() - o_ref.float()).abs().max().item()
        print(f"lo={lo} pv {cm.PV_CONFIG}: {bench(fn):.4f} ms (max err {err:.1e})", flush=True)
    cm.PV_CONFIG = committed
    s16 = s_ref.masked_fill(~past, 0.0)[None]
    for future in (True, False):
        dst = cm.scores_buffer(H, R_, K, torch.bfloat16, "cuda")[None]
        fn = lambda: slab_softmax.mix_softmax_rows(s16, w * D ** -0.5, lo, want_lse=True, precision="tf32", post_mix=w,
                                                   out=dst, write_future=future)
        print(f"lo={lo} mix softmax write_future={future}: {bench(fn):.4f} ms", flush=True)

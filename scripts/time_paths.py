"""Time mta_attention on each path (or on whatever a tree's own switches pick) over the
benchmark grid, with SDPA in the same process, eager medians: the measurements behind the
dispatch table and behind deleting a path.

    python scripts/time_paths.py --label chunked --path chunked --ops talking_heads --out paths.csv
    MTA_KERNELS_CHUNKED_TALKING_HEADS=0 PYTHONPATH=old_tree python scripts/time_paths.py --label old-register ...

--path passes kernel_options={'path': ...} (trees without kernel_options: leave it out and
choose with their own switches). Rows: label, op, mode, B, H, L, D, ms, sdpa_ms, ratio.
"""
import argparse
import csv
import os
import sys
import time

import torch
import torch.nn.functional as F
from triton.testing import do_bench

import mta_reference as R

GRID = [(1, 16, 4096, 128), (4, 16, 2048, 96), (8, 16, 2048, 64), (8, 16, 2048, 128), (8, 16, 1024, 64),
        (2, 16, 8192, 128), (1, 16, 16384, 128), (1, 16, 32768, 128), (1, 16, 131072, 128)]
OPS = {"none": (), "talking_heads": ("pre_mix", "post_mix"), "full": ("pre_conv", "pre_mix", "post_conv", "post_mix"),
       "pre_conv": ("pre_conv",), "post_conv": ("post_conv",)}


def weights(op, H, device):
    make = dict(pre_conv=lambda: R.identity_conv(H, 6, 11, device=device),
                post_conv=lambda: R.identity_conv(H, 6, 11, device=device),
                pre_mix=lambda: R.identity_mix(H, H, device=device), post_mix=lambda: R.identity_mix(H, H, device=device))
    out = {}
    for part in OPS[op]:
        w = make[part]()
        out[part] = (w + 0.01 * torch.randn_like(w)).requires_grad_()
    return out


def time_call(fn, grads, max_ms):
    """Median ms of fn (eager do_bench), or None when one call takes longer than max_ms; a call
    over 500 ms is timed three times with the wall clock instead."""
    for g in grads:
        g.grad = None
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    one = (time.perf_counter() - t0) * 1e3
    if one > max_ms:
        return None
    if one > 500:
        samples = []
        for _ in range(3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            samples.append((time.perf_counter() - t0) * 1e3)
        return sorted(samples)[1]
    return do_bench(fn, warmup=25, rep=min(max(100.0, 5 * one), 2000.0), grad_to_none=list(grads),
                    return_mode="median")


def main(argv):
    ap = argparse.ArgumentParser()
    ap.add_argument("--label", required=True)
    ap.add_argument("--path", default=None)
    ap.add_argument("--ops", default="talking_heads,full,pre_conv,post_conv")
    ap.add_argument("--modes", default="fwd,fwd+bwd")
    ap.add_argument("--max-l", type=int, default=131072)
    ap.add_argument("--max-ms", type=float, default=3000.0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    from mta_kernels import mta_attention
    kw = dict(kernel_options={"path": args.path}) if args.path else {}
    new_file = not os.path.exists(args.out)
    with open(args.out, "a", newline="") as f:
        w = csv.writer(f)
        if new_file:
            w.writerow(["label", "gpu", "op", "mode", "B", "H", "L", "D", "ms", "sdpa_ms", "ratio"])
        for B, H, L, D in GRID:
            if L > args.max_l:
                continue
            q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3))
            do = torch.randn_like(q)
            for mode in args.modes.split(","):
                def sdpa():
                    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                    if mode == "fwd+bwd":
                        o.backward(do)
                with torch.set_grad_enabled(mode != "fwd"):
                    base = time_call(sdpa, (q, k, v), args.max_ms)
                for op in args.ops.split(","):
                    ws = weights(op, H, "cuda")

                    def fused():
                        o = mta_attention(q, k, v, **ws, **kw)
                        if mode == "fwd+bwd":
                            o.backward(do)
                    try:
                        with torch.set_grad_enabled(mode != "fwd"):
                            ms = time_call(fused, (q, k, v, *ws.values()), args.max_ms)
                    except Exception as e:       # noqa: BLE001 - record and go on
                        print(f"{args.label} {op} {mode} {B},{H},{L},{D}: {type(e).__name__}: {e}"[:300], flush=True)
                        ms = None
                        torch.cuda.empty_cache()
                    ratio = None if ms is None or base is None else ms / base
                    row = [args.label, torch.cuda.get_device_name(), op, mode, B, H, L, D,
                           None if ms is None else round(ms, 4), None if base is None else round(base, 4),
                           None if ratio is None else round(ratio, 2)]
                    w.writerow(row)
                    f.flush()
                    print(" ".join(str(x) for x in row), flush=True)
            del q, k, v, do
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main(sys.argv[1:])

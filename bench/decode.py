"""python -m bench.decode: the cost of decoding with MTA against plain attention.

1. One decode step of the attention op: a new query row over a KV cache of context 2k, 8k,
   32k, 128k, batch 1 and 8, H=16, D=128, bf16, for full MTA (6x11 convs, all heads mixed:
   the op reads the last 10 queries too) and talking heads, against SDPA over the same cache.
   Eager and replayed as a CUDA graph; with --paths decode,chunked each block path forced in turn.
2. generate() tokens/s of the paper's 830M model (MTA) against the same model with plain
   attention (baseline), both decoding with their cache, random weights and prompts, eager
   and with each step replayed from a CUDA graph (generate(cuda_graph=True)).

Rows go to a CSV of the run in bench/runs/ (git-ignored), each as it is measured; --record
appends them to bench/results/results.csv (bench 'decode').
Needs a GPU.
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench, do_bench_cudagraph

from .cases import make_weights
from .report import RunRows

ROOT = Path(__file__).resolve().parent
CONTEXTS = (2048, 8192, 32768, 131072)
BATCHES = (1, 8)
OPS = ("full", "talking_heads")


def _time(fn, graphs):
    fn()
    torch.cuda.synchronize()
    if graphs:
        return do_bench_cudagraph(fn, rep=100, return_mode="median")
    return do_bench(fn, warmup=10, rep=100, return_mode="median")


def op_steps(rows, paths=(None,), contexts=CONTEXTS, H=16, D=128):
    """One decode step of each op on each of ``paths`` (None: the default, 'decode' or 'chunked'
    forced through kernel_options) against SDPA, eager and graphed, appended to rows."""
    from mta_kernels import mta_attention
    for ctx in contexts:
        for B in BATCHES:
            k, v = (torch.randn(B, H, ctx, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16)
            q_prev = torch.randn(B, H, 10, D, device="cuda", dtype=torch.bfloat16)
            calls = {("none", None): lambda: F.scaled_dot_product_attention(q, k, v)}
            for op in OPS:
                ws = make_weights(op, H, (6, 11), "cuda", requires_grad=False)
                for path in paths:
                    opts = {"path": path} if path else None
                    calls[(op, path)] = lambda ws=ws, opts=opts: mta_attention(q, k, v, **ws, q_prev=q_prev,
                                                                               kernel_options=opts)
            for graphs in (False, True):
                with torch.no_grad():
                    times = {key: _time(fn, graphs) for key, fn in calls.items()}
                sdpa_ms = times[("none", None)]
                for (op, path), ms in times.items():
                    rows.append(dict(mode="decode_step", op=op, provider="sdpa" if op == "none" else "fused",
                                     options=f"path={path}" if path else None, B=B, H=H, Hkv=H, L=ctx, D=D,
                                     dtype="bf16", timing="cuda_graph" if graphs else "eager", median_ms=ms,
                                     status="ok"))
                    name = "sdpa" if op == "none" else f"{op}:{path}" if path else op
                    print(f"step {name:22s} B={B} ctx={ctx:6d} {'graph' if graphs else 'eager'}: {ms:.4f} ms "
                          f"({ms / sdpa_ms:.2f}x sdpa)", flush=True)
            del k, v
            torch.cuda.empty_cache()


def model_tokens_per_s(rows, prompt=512, new=128, batches=(1, 8)):
    from mta_kernels.nn import MTATransformer, MTATransformerConfig
    for variant in ("baseline", "mta"):
        model = MTATransformer(MTATransformerConfig.paper("830M", variant, vocab_size=32000)).cuda().to(torch.bfloat16)
        for B in batches:
            ids = torch.randint(0, 32000, (B, prompt), device="cuda")
            for graph in (False, True):
                model.generate(ids, 4, cuda_graph=graph)      # compiles
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = model.generate(ids, new, cuda_graph=graph)
                torch.cuda.synchronize()
                seconds = time.perf_counter() - t0
                tps = B * (int(out.lengths.min()) - prompt) / seconds
                timing = "cuda_graph" if graph else "eager"
                rows.append(dict(mode="generate", op=variant, provider="fused", model="830M", B=B, H=16, Hkv=16,
                                 L=prompt + new, D=96, dtype="bf16", timing=timing, median_ms=seconds * 1e3,
                                 tokens_per_s=tps, status="ok"))
                print(f"generate {variant:8s} B={B} {timing:10s}: {tps:.1f} tokens/s", flush=True)
        del model
        torch.cuda.empty_cache()


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.decode")
    ap.add_argument("--record", action="store_true", help="append to bench/results/results.csv")
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--contexts", help=f"comma-separated cache lengths of the op steps (default {CONTEXTS})")
    ap.add_argument("--paths", help="comma-separated block paths to force (decode, chunked) instead of the default")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.decode needs a GPU")
    rows = RunRows("decode", on_gpu=True, to_results=args.record, out_dir=ROOT / "runs")
    contexts = tuple(int(c) for c in args.contexts.split(",")) if args.contexts else CONTEXTS
    op_steps(rows, tuple(args.paths.split(",")) if args.paths else (None,), contexts)
    if not args.skip_model:
        model_tokens_per_s(rows)
    for r in (r for r in rows if r["mode"] == "generate" and r["op"] == "mta"):
        base = next(x for x in rows if x["mode"] == "generate" and x["op"] == "baseline" and x["B"] == r["B"]
                    and x["timing"] == r["timing"])
        print(f"generate B={r['B']} {r['timing']}: MTA {r['tokens_per_s'] / base['tokens_per_s']:.2f}x "
              f"the baseline's tokens/s")
    print(f"wrote {rows.close()}")

if __name__ == "__main__":
    sys.exit(main())

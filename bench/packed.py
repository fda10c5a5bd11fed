"""python -m bench.packed: packed documents (cu_seqlens) against the same documents run alone.

T tokens (16384 on a GPU) in documents of random lengths 64..4096, H=16, D=128, bf16, causal,
the paper's weights, for full MTA, talking heads and plain attention; fwd and fwd+bwd. Three
providers per op:

  packed     one call with cu_seqlens over the (1, H, T, D) batch
  separate   one call per document, in a loop (what the packed call must cost about as much as)
  dense      one call over T tokens as a single sequence (what packing must stay far below)

Eager and CUDA-graph timings, peak memory and launches per call, from bench/timing.py; the
summary compares eager times, since a packed call reads its document offsets on the host and
cannot be captured in a CUDA graph (its graph rows hold that error). Without a GPU: a tiny case runs once under the
Triton interpreter (timing 'none'), and the packed output is checked against the separate calls.

    python -m bench.packed [--record] [--tokens T] [--seed S]

Rows go to a CSV of the run in bench/runs/ (git-ignored); --record appends them to
bench/results/results.csv (bench 'packed', options 'docs=N').
"""
import argparse
import sys
from pathlib import Path

import torch

from . import timing
from .cases import DTYPES, make_weights
from .report import RunRows

ROOT = Path(__file__).resolve().parent
OPS = ("full", "talking_heads", "none")
PROVIDERS = ("packed", "separate", "dense")
MODES = ("fwd", "fwd+bwd")
# (tokens, heads, head dim, shortest and longest document, conv) on a GPU and under the interpreter
GPU_CASE = dict(T=16384, H=16, D=128, min_len=64, max_len=4096, conv=(6, 11), dtype=torch.bfloat16)
CPU_CASE = dict(T=96, H=2, D=16, min_len=3, max_len=40, conv=(3, 5), dtype=torch.float32)
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
WEIGHT_NOISE = 0.05


def document_offsets(T: int, min_len: int, max_len: int, generator: torch.Generator) -> torch.Tensor:
    """cu_seqlens (N+1,) int32 of documents of random lengths min_len..max_len filling T tokens
    (the last cut to fit)."""
    offsets, end = [0], 0
    while end < T:
        n = int(torch.randint(min_len, max_len + 1, (1,), generator=generator))
        end = min(T, end + n)
        offsets.append(end)
    return torch.tensor(offsets, dtype=torch.int32)


def calls(op, provider, q, k, v, ws, cu_seqlens):
    """The provider's closure: the op over the packed tokens, returning one output per call
    (a list of per-document outputs for 'separate')."""
    from mta_kernels import mta_attention
    if provider == "packed":
        return lambda: [mta_attention(q, k, v, **ws, cu_seqlens=cu_seqlens)]
    if provider == "dense":
        return lambda: [mta_attention(q, k, v, **ws)]
    bounds = cu_seqlens.tolist()
    spans = list(zip(bounds[:-1], bounds[1:]))
    return lambda: [mta_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], **ws) for s, e in spans]


def run(case: dict, seed: int, on_gpu: bool, rows: list):
    """Every (op, mode, provider) of one packed batch, appended to ``rows`` as CSV rows (without
    run info) as each is measured. Returns rows."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)         # the weights' noise (make_weights draws from the global generator)
    device = "cuda" if on_gpu else "cpu"
    T, H, D, dtype = case["T"], case["H"], case["D"], case["dtype"]
    cu = document_offsets(T, case["min_len"], case["max_len"], g)
    cu_dev = cu.to(device)
    q, k, v = (torch.randn(1, H, T, D, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    grad = torch.randn(1, H, T, D, generator=g).to(device, dtype)
    for op in OPS:
        ws = make_weights(op, H, case["conv"], device, requires_grad=True, noise=WEIGHT_NOISE)
        leaves = [q, k, v, *(w for w in ws.values() if w is not None)]
        for mode in MODES:
            for provider in PROVIDERS:
                fn = calls(op, provider, q, k, v, ws, cu_dev)
                row = dict(op=op, mode=mode, provider=provider, B=1, H=H, Hkv=H, L=T, D=D,
                           dtype=DTYPE_NAMES[dtype],
                           conv="%dx%d" % case["conv"], options=f"docs={len(cu) - 1}")
                try:
                    result = timing.measure(_backward_closure(fn, mode, grad), leaves, on_gpu,
                                            timings=timing.TIMINGS if on_gpu else ("none",))
                except Exception as exc:
                    rows.append(dict(row, timing="eager", status=timing.error_status(exc)))
                    timing.free_memory(on_gpu)
                    continue
                for t, times in result["times"].items():
                    rows.append(dict(row, timing=t, peak_mem_gib=result["peak_mem_gib"],
                                     launches=result["launches"], **times))
                timing.free_memory(on_gpu)
        if not on_gpu:
            _check_packed_equals_separate(op, q, k, v, ws, cu)
    return rows


def _backward_closure(fn, mode, grad):
    """One call of fn (a list of outputs), with mode 'fwd+bwd' each output's backward against
    grad's rows at the output's place (documents of 'separate' in order)."""
    if mode == "fwd":
        def call():
            with torch.no_grad():
                fn()
        return call

    def call():
        outs = fn()
        start, grads = 0, []
        for o in outs:
            grads.append(grad[:, :, start:start + o.shape[2]])
            start += o.shape[2]
        torch.autograd.backward(outs, grads)
    return call


def _check_packed_equals_separate(op, q, k, v, ws, cu):
    """The packed output equals the documents run alone (under the interpreter, fp32)."""
    with torch.no_grad():
        packed = calls(op, "packed", q, k, v, ws, cu)()[0]
        separate = torch.cat(calls(op, "separate", q, k, v, ws, cu)(), dim=2)
    err = (packed - separate).abs().max().item()
    if not err <= 1e-5 * max(1.0, separate.abs().max().item()):
        raise SystemExit(f"{op}: packed output differs from the documents run alone by {err:.3e}")
    print(f"{op}: packed equals the documents run alone (max difference {err:.1e})", flush=True)


def summary(rows) -> list:
    """Lines: per op and mode, packed against separate and dense, eager (a packed call reads its
    document offsets on the host, so it cannot be captured in a CUDA graph)."""
    times = {(r["op"], r["mode"], r["provider"]): r.get("median_ms") for r in rows if r["timing"] == "eager"}
    lines = ["| op | mode | packed ms | separate ms | dense ms | packed / separate | packed / dense |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for op in OPS:
        for mode in MODES:
            p, s, d = (times.get((op, mode, x)) for x in PROVIDERS)
            if p is None:
                continue
            ratio = lambda a, b: f"{a / b:.2f}" if a and b else "-"
            fmt = lambda x: f"{x:.3g}" if x else "-"
            lines.append(f"| {op} | {mode} | {fmt(p)} | {fmt(s)} | {fmt(d)} | {ratio(p, s)} | {ratio(p, d)} |")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.packed", description=__doc__.split("\n\n")[0])
    ap.add_argument("--record", action="store_true", help="GPU: append to bench/results/results.csv")
    ap.add_argument("--tokens", type=int, help="T (default 16384 on a GPU, 96 on the CPU)")
    ap.add_argument("--seed", type=int, default=0, help="the documents' lengths and the inputs")
    ap.add_argument("--out", type=Path, default=ROOT / "runs", help="folder of the run's CSV (without --record)")
    args = ap.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    if args.record and not on_gpu:
        raise SystemExit("--record needs a GPU: without one nothing is measured")
    case = dict(GPU_CASE if on_gpu else CPU_CASE)
    if args.tokens:
        case["T"] = args.tokens
    rows = RunRows("packed", on_gpu, to_results=args.record, out_dir=args.out)
    run(case, args.seed, on_gpu, rows)
    if on_gpu:
        print("\n".join(summary(rows)))
    print(f"wrote {rows.close()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

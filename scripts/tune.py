"""Time one op over combinations of launch-configuration values (GPU): each combination sets
fields of the dicts in mta_kernels/configs.py, checks the op against the reference on a small
shape, then times it at the given shape (eager median, triton.testing.do_bench).

    python scripts/tune.py --op full --shape 1,16,4096,128 --mode fwd+bwd \\
        --set CONV.BR=32,64 --set STRIP_CONV.TILES=4,8

Prints one line per combination, fastest last. Copy the winner into configs.py and record the
measurement in docs/performance.md.
"""
import argparse
import itertools
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import mta_reference  # noqa: E402
from mta_kernels import configs, mta_attention  # noqa: E402
from time_paths import weights  # noqa: E402


def parse_set(text):
    """'CONV.BR=32,64' -> ('CONV', 'BR', [32, 64])."""
    name, _, values = text.partition("=")
    table, _, field = name.partition(".")
    vals = [int(v) if v.lstrip("-").isdigit() else v for v in values.split(",")]
    if not hasattr(configs, table) or field not in getattr(configs, table):
        raise SystemExit(f"no configs.{table}[{field!r}]")
    return table, field, vals


def main(argv):
    ap = argparse.ArgumentParser()
    ap.add_argument("--op", default="full")
    ap.add_argument("--shape", default="1,16,4096,128")
    ap.add_argument("--mode", default="fwd+bwd", choices=("fwd", "fwd+bwd"))
    ap.add_argument("--set", action="append", default=[], type=parse_set)
    args = ap.parse_args(argv)
    B, H, L, D = (int(x) for x in args.shape.split(","))
    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    ws = weights(args.op, H, "cuda")
    small = [x.detach()[:1, :, :200].clone() for x in (q, k, v)]
    results = []
    for combo in itertools.product(*[vals for _, _, vals in args.set]):
        for (table, field, _), value in zip(args.set, combo):
            getattr(configs, table)[field] = value
        label = " ".join(f"{t}.{f}={v}" for (t, f, _), v in zip(args.set, combo))
        out = mta_attention(*small, **{n: w.detach() for n, w in ws.items()})
        ref = mta_reference.mta_attention(*small, **{n: w.detach() for n, w in ws.items()})
        if not torch.allclose(out.float(), ref.float(), atol=3e-2, rtol=3e-2):
            print(f"{label}: WRONG (max err {(out.float() - ref.float()).abs().max().item():.3e})", flush=True)
            continue

        def call():
            with torch.set_grad_enabled(args.mode != "fwd"):
                o = mta_attention(q, k, v, **ws)
                if args.mode == "fwd+bwd":
                    o.backward(do)
        ms = do_bench(call, warmup=25, rep=200, grad_to_none=[q, k, v, *ws.values()], return_mode="median")
        results.append((ms, label))
        print(f"{ms:8.3f} ms  {label}", flush=True)
    for ms, label in sorted(results, reverse=True):
        print(f"{ms:8.3f} ms  {label}")


if __name__ == "__main__":
    main(sys.argv[1:])

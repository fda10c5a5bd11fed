"""python -m bench: benchmark fused MTA against naive MTA and SDPA. See bench/README.md."""
import os

import torch

# Triton decides when a kernel is decorated whether it is compiled or interpreted, so
# the interpreter must be switched on before anything imports mta_kernels.
ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

from . import env, report  # noqa: E402
from .cases import DTYPES, FLOP_FORMULA, MODES, OPS, SHAPE_SETS, SWEEP_L, Shape, shape_set  # noqa: E402
from .providers import PROVIDERS  # noqa: E402
from .runner import Config, ContextLost, Runner, case_key, plan  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MAX_RESUMES = 20  # new processes after CUDA context losses, per run

# What runs when a flag is not given: (GPU, CPU) x (standard, --quick).
DEFAULTS = {
    ("gpu", False): dict(ops=tuple(OPS), modes=MODES, providers=PROVIDERS, shapes="all"),
    ("gpu", True): dict(ops=("full", "talking_heads", "none"), modes=("fwd", "fwd+bwd"),
                        providers=("fused", "naive", "sdpa"),
                        shapes=[Shape(1, 16, 16, 2048, 128), Shape(1, 16, 16, 4096, 128)]),
    ("cpu", False): dict(ops=tuple(OPS), modes=MODES, providers=("fused", "naive", "sdpa"),
                         shapes="tiny"),
    ("cpu", True): dict(ops=("full", "none"), modes=("fwd", "fwd+bwd"),
                        providers=("fused", "naive", "sdpa"), shapes=[Shape(1, 4, 4, 64, 32)]),
}


def _csv_list(choices):
    def parse(text):
        items = tuple(x.strip() for x in text.split(",") if x.strip())
        if items == ("all",):
            return tuple(choices)
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(choices)} (or all)")
        return items
    return parse


def _conv(text):
    m = re.fullmatch(r"(\d+)x(\d+)", text)
    if not m or int(m.group(2)) % 2 == 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected CQxCK with an odd CK, e.g. 6x11")
    return int(m.group(1)), int(m.group(2))


def _ints(text):
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers")


def parse_args(argv):
    ap = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark fused MTA (mta_kernels) against naive MTA and SDPA. On a GPU the "
                    "standard suite; without one, a tiny fp32 run under the Triton interpreter "
                    "(correctness gate + harness check; its timings are not performance numbers).")
    ap.add_argument("--ops", type=_csv_list(tuple(OPS)), help=f"comma list of {', '.join(OPS)} or all")
    ap.add_argument("--modes", type=_csv_list(MODES), help="comma list of fwd, bwd, fwd+bwd or all")
    ap.add_argument("--providers", type=_csv_list(PROVIDERS), help=f"comma list of {', '.join(PROVIDERS)} or all")
    ap.add_argument("--shapes", choices=SHAPE_SETS,
                    help="paper: the 4 paper layers at L=2048, B=8; sweep: B=1 H=16 D=128 over L; "
                         "all: both (GPU default); tiny: CPU default")
    ap.add_argument("--lengths", type=_ints, help="L values of the sweep (default 512..65536)")
    ap.add_argument("--dtype", choices=tuple(DTYPES), help="input dtype (default bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--conv", type=_conv, help="conv size CQxCK (default 6x11 on GPU, 3x5 on CPU)")
    ap.add_argument("--quick", action="store_true", help="a small subset (about a minute on a GPU)")
    ap.add_argument("--max-naive-gib", type=float, default=100.0,
                    help="skip naive providers whose estimated memory exceeds this (default 100)")
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"results folder (default {RESULTS})")
    ap.add_argument("--no-plots", action="store_true", help="write the CSV and markdown only")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="GPU only: time every provider's calls replayed from one CUDA graph "
                         "(triton.testing.do_bench_cudagraph), the GPU's time without the host's")
    ap.add_argument("--resume", type=Path, metavar="CSV",
                    help="append to this run's CSV, skipping the cases it already holds (give the "
                         "same selection flags as the first run)")
    return ap.parse_args(argv)


def make_config(args) -> Config:
    if args.cuda_graphs and not ON_GPU:
        raise SystemExit("--cuda-graphs needs a GPU: CUDA graphs time CUDA kernels (this machine has none)")
    d = DEFAULTS[("gpu" if ON_GPU else "cpu", args.quick)]
    shapes = args.shapes or d["shapes"]
    if isinstance(shapes, str):
        shapes = shape_set(shapes, args.lengths or SWEEP_L)
    dtype_name = args.dtype or ("bf16" if ON_GPU else "fp32")
    return Config(ops=args.ops or d["ops"], modes=args.modes or d["modes"],
                  providers=args.providers or d["providers"], shapes=tuple(shapes),
                  dtype=DTYPES[dtype_name], dtype_name=dtype_name,
                  conv=args.conv or ((6, 11) if ON_GPU else (3, 5)), on_gpu=ON_GPU,
                  max_naive_gib=args.max_naive_gib, cuda_graphs=args.cuda_graphs)


def header_comments(cfg: Config, argv) -> list:
    cq, ck = cfg.conv
    timing = ("times: triton.testing.do_bench median / 20% / 80% quantiles, ms" if cfg.on_gpu
              else "times: time.perf_counter median / 20% / 80% over a few calls, ms. " + report.CPU_WARNING)
    if cfg.cuda_graphs:
        timing = ("times: triton.testing.do_bench_cudagraph median / 20% / 80% quantiles of 10 replays, ms: "
                  "calls captured in one CUDA graph, so the GPU's time without the host's launch time "
                  "(no L2 flush between calls)")
    return [
        "MTA benchmark: python -m bench " + " ".join(argv),
        f"TFLOP/s: {FLOP_FORMULA}",
        f"ops: full = pre_conv + pre_mix + post_conv + post_mix; talking_heads = pre_mix + post_mix; "
        f"convs {cq}x{ck} (cq x ck), pad_key 'both'; mixes over all H heads; causal",
        "weights: identity + 0.01*randn, fp32; q, k, v ~ N(0, 1) in the input dtype",
        "sdpa: F.scaled_dot_product_attention, plain causal attention (no MTA), recorded under op 'none'",
        timing,
        "peak_mem_gib: torch.cuda.max_memory_allocated during one call, minus memory allocated "
        "before it (the inputs; for mode bwd also the forward graph kept for backward)",
        f"naive and naive-compiled skipped when their estimated memory exceeds {cfg.max_naive_gib:g} GiB",
        "a provider is timed only after passing a correctness gate against the reference on a small "
        "shape (max|out-ref| <= 2*max|low-ref| + 4 ulp; output, and every gradient for bwd modes)",
        "switches: " + env.kernel_switches(),
    ]


def _without_resume(argv):
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--resume":
            skip = True
        elif not a.startswith("--resume="):
            out.append(a)
    return out


def _resume_in_new_process(argv, csv_path: Path):
    """After a CUDA context loss, the rest of the run goes on in a fresh process. exec, not a
    child: the broken context's GPU memory must be released before the next case.
    Returns only when MAX_RESUMES is used up."""
    resumes = int(os.environ.get("BENCH_RESUMES", "0")) + 1
    if resumes > MAX_RESUMES:
        print(f"CUDA context lost {resumes} times: stopping; continue with --resume {csv_path}", flush=True)
        return
    print(f"CUDA context lost: resuming in a new process ({resumes}/{MAX_RESUMES})", flush=True)
    cmd = [sys.executable, "-m", "bench", *_without_resume(argv), "--resume", str(csv_path)]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, cmd, dict(os.environ, BENCH_RESUMES=str(resumes)))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    cfg = make_config(args)
    info = env.run_info(cfg.on_gpu)
    if args.resume:
        csv_path = args.resume
        done = {case_key(r) for r in report.read_csv(csv_path)[1]}
    else:
        stamp = info["date"].replace(":", "").replace("T", "_")
        graphs = "_cuda-graphs" if cfg.cuda_graphs else ""
        csv_path = args.out / f"{stamp}_{re.sub(r'[^A-Za-z0-9]+', '-', info['gpu']).strip('-')}{graphs}.csv"
        done = set()
    if not cfg.on_gpu:
        print(f"NOTE: no GPU. {report.CPU_WARNING}", flush=True)
    cases = plan(cfg)
    print(f"{len(cases)} cases ({len(done)} already in the CSV), {info['gpu']}, torch {info['torch']}, "
          f"triton {info['triton']}, commit {info['commit']}, dtype {cfg.dtype_name}, "
          f"conv {cfg.conv[0]}x{cfg.conv[1]} -> {csv_path}", flush=True)
    log = report.CsvLog(csv_path, header_comments(cfg, argv), append=bool(args.resume))
    runner = Runner(cfg, info, log)
    try:
        runner.run(cases, done)
    except ContextLost:
        log.close()
        _resume_in_new_process(argv, csv_path)  # the new process goes on and writes the summary
    except KeyboardInterrupt:
        print(f"interrupted: summary of the cases run so far; continue with --resume {csv_path}", flush=True)
    finally:
        log.close()
    written = [csv_path] + report.write_summary(csv_path, make_plots=not args.no_plots)
    _, rows = report.read_csv(csv_path)
    counts = Counter(r["status"].split(":")[0] for r in rows)
    print("status counts: " + ", ".join(f"{k} {n}" for k, n in counts.items()))
    for path in written:
        print(f"wrote {path}")
    if not cfg.on_gpu:
        print(f"NOTE: {report.CPU_WARNING}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

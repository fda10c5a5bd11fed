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
from pathlib import Path  # noqa: E402

from . import env, report  # noqa: E402
from .cases import (DTYPES, GRID_MODES, GRID_OPS, GRID_PROVIDERS, MODES, OPS, SHAPE_SETS, Shape,  # noqa: E402
                    shape_set)
from .providers import PROVIDERS  # noqa: E402
from .runner import Config, ContextLost, Runner, case_key, plan  # noqa: E402
from .timing import TIMINGS  # noqa: E402

RUNS = Path(__file__).resolve().parent / "runs"
MAX_RESUMES = 20  # new processes after CUDA context losses, per run

# What runs when a flag is not given: (GPU, CPU) x (standard, --quick), and the grid.
DEFAULTS = {
    ("gpu", False): dict(ops=tuple(OPS), modes=MODES, providers=PROVIDERS, shapes="all"),
    ("gpu", True): dict(ops=("full", "talking_heads", "none"), modes=("fwd", "fwd+bwd"),
                        providers=("fused", "naive", "sdpa"),
                        shapes=[Shape(1, 16, 16, 2048, 128), Shape(1, 16, 16, 4096, 128)]),
    ("cpu", False): dict(ops=tuple(OPS), modes=MODES, providers=("fused", "naive", "sdpa"),
                         shapes="tiny"),
    ("cpu", True): dict(ops=("full", "none"), modes=("fwd", "fwd+bwd"),
                        providers=("fused", "naive", "sdpa"), shapes=[Shape(1, 4, 4, 64, 32)]),
    "grid": dict(ops=GRID_OPS, modes=GRID_MODES, providers=GRID_PROVIDERS, shapes="grid"),
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
                    "standard suite; without one, a correctness check of every case under the Triton "
                    "interpreter (nothing is timed).")
    ap.add_argument("--ops", type=_csv_list(tuple(OPS)), help=f"comma list of {', '.join(OPS)} or all")
    ap.add_argument("--modes", type=_csv_list(MODES), help="comma list of fwd, bwd, fwd+bwd or all")
    ap.add_argument("--providers", type=_csv_list(PROVIDERS), help=f"comma list of {', '.join(PROVIDERS)} or all")
    ap.add_argument("--shapes", choices=SHAPE_SETS,
                    help="paper: the 4 paper layers at L=2048, B=8; sweep: B=1 H=16 D=128 over L; "
                         "all: both (GPU default); grid: the GPU gate (bench/README.md); tiny: CPU default")
    ap.add_argument("--lengths", type=_ints, help="L values of the sweep (default 512..65536); for other "
                                                  "shape sets, keep only these L")
    ap.add_argument("--max-l", type=int, help="keep only shapes with L <= this")
    ap.add_argument("--paths", action="store_true",
                    help="also time fused once per forced path (kernel_options={'path': p}) for ops with "
                         "several paths; provider 'fused:<path>'")
    ap.add_argument("--dtype", choices=tuple(DTYPES), help="input dtype (default bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--conv", type=_conv, help="conv size CQxCK (default 6x11 on GPU, 3x5 on CPU)")
    ap.add_argument("--timing", type=_csv_list(TIMINGS),
                    help="GPU: eager (do_bench), cuda_graph (do_bench_cudagraph) or both (default)")
    ap.add_argument("--quick", action="store_true", help="a small subset (about a minute on a GPU)")
    ap.add_argument("--max-naive-gib", type=float, default=100.0,
                    help="skip naive providers whose estimated memory exceeds this (default 100)")
    ap.add_argument("--out", type=Path, default=RUNS,
                    help=f"folder of the run's CSV, summary and plot (default {RUNS}, git-ignored)")
    ap.add_argument("--record", action="store_true",
                    help=f"GPU: append the rows to {report.RESULTS_CSV} instead of a CSV of the run's own")
    ap.add_argument("--no-plots", action="store_true", help="no plot")
    ap.add_argument("--resume", metavar="RUN",
                    help="go on with this run id, skipping the cases its CSV already holds (give the "
                         "same flags as the first run)")
    return ap.parse_args(argv)


def make_config(args, on_gpu: bool = ON_GPU) -> Config:
    if args.record and not on_gpu:
        raise SystemExit("--record needs a GPU: without one nothing is measured, so there is nothing to record")
    if args.shapes == "grid" and not on_gpu:
        raise SystemExit("--shapes grid needs a GPU (L >= 1024 under the Triton interpreter would take hours)")
    if args.timing and not on_gpu:
        raise SystemExit("--timing needs a GPU: without one nothing is timed")
    d = DEFAULTS["grid"] if args.shapes == "grid" else DEFAULTS[("gpu" if on_gpu else "cpu", args.quick)]
    shapes = args.shapes or d["shapes"]
    if isinstance(shapes, str):
        shapes = shape_set(shapes, args.lengths, args.max_l)
    elif args.max_l:
        shapes = [s for s in shapes if s.L <= args.max_l]
    if not shapes:
        raise SystemExit("no shapes left after --lengths / --max-l")
    dtype_name = args.dtype or ("bf16" if on_gpu else "fp32")
    return Config(ops=args.ops or d["ops"], modes=args.modes or d["modes"],
                  providers=args.providers or d["providers"], shapes=tuple(shapes),
                  dtype=DTYPES[dtype_name], dtype_name=dtype_name,
                  conv=args.conv or ((6, 11) if on_gpu else (3, 5)), on_gpu=on_gpu,
                  max_naive_gib=args.max_naive_gib, paths=args.paths,
                  timings=(args.timing or TIMINGS) if on_gpu else ("none",))


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


def _resume_in_new_process(argv, run: str):
    """After a CUDA context loss, the rest of the run goes on in a fresh process. exec, not a
    child: the broken context's GPU memory must be released before the next case.
    Returns only when MAX_RESUMES is used up."""
    resumes = int(os.environ.get("BENCH_RESUMES", "0")) + 1
    if resumes > MAX_RESUMES:
        print(f"CUDA context lost {resumes} times: stopping; continue with --resume {run}", flush=True)
        return
    print(f"CUDA context lost: resuming in a new process ({resumes}/{MAX_RESUMES})", flush=True)
    cmd = [sys.executable, "-m", "bench", *_without_resume(argv), "--resume", run]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, cmd, dict(os.environ, BENCH_RESUMES=str(resumes)))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    cfg = make_config(args)
    info = env.run_info(cfg.on_gpu)
    run = info["run"] = args.resume or info["run"]
    csv_path = report.RESULTS_CSV if args.record else args.out / f"{run}.csv"
    done = set()
    if args.resume and csv_path.exists():
        done = {case_key(r) for r in report.read_csv(csv_path) if r["run"] == run}
    cases = plan(cfg)
    if not cfg.on_gpu:
        print("no GPU: every case runs once under the Triton interpreter after its provider's "
              f"correctness gate; {report.NOT_PERFORMANCE}.", flush=True)
    print(f"run {run}: {len(cases)} cases ({len(done)} already in the CSV), {info['gpu']}, torch {info['torch']}, "
          f"triton {info['triton']}, commit {info['commit']}, dtype {cfg.dtype_name}, "
          f"conv {cfg.conv[0]}x{cfg.conv[1]} -> {csv_path}", flush=True)
    log = report.CsvLog(csv_path)
    try:
        Runner(cfg, info, log).run(cases, done)
    except ContextLost:
        log.close()
        _resume_in_new_process(argv, run)  # the new process goes on and writes the summary
    except KeyboardInterrupt:
        print(f"interrupted: summary of the cases run so far; continue with --resume {run}", flush=True)
    finally:
        log.close()
    rows = [r for r in report.read_csv(csv_path) if r["run"] == run]
    if not cfg.on_gpu:
        print(report.cpu_summary(rows))
        print(f"wrote {csv_path}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    md = args.out / f"{run}.md"
    md.write_text(report.markdown(rows))
    written = [csv_path, md]
    png = args.out / f"{run}_time.png"
    try:
        if not args.no_plots and report.plot(rows, png):
            written.append(png)
    except ImportError as exc:
        print(f"no plot: {exc} (pip install -e '.[bench]')")
    table = report.grid_table(rows)
    if table:
        print("\n" + "\n".join(table) + "\n")
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

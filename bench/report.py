"""Results on disk and what is made from them: the CSV (one row per case and timing, appended
as a run goes), a run's markdown summary, the summary against SDPA over a grid of shapes, and
a plot of time (or memory) against L.

    python -m bench.report --run RUN --plot time.png --grid-table grid.md
    python -m bench.report --commit abc1234 --markdown summary.md
"""
import argparse
import csv
import math
import statistics
import sys
from collections import OrderedDict
from pathlib import Path

from .cases import OPS, shape_label

RESULTS = Path(__file__).resolve().parent / "results"
RESULTS_CSV = RESULTS / "results.csv"
# One dataset for every benchmark: `bench` says which wrote a row ('kernels': python -m bench,
# 'train': bench.train, B the batch and L the sequence; 'decode': bench.decode; 'packed':
# bench.packed, L the packed tokens); the last
# columns are the training and decoding benchmarks' own, empty on kernel rows.
COLUMNS = ("bench", "run", "gpu", "torch", "triton", "commit", "date", "B", "H", "Hkv", "L", "D", "dtype",
           "conv", "op", "mode", "provider", "options", "timing", "median_ms", "p20_ms", "p80_ms",
           "peak_mem_gib", "launches", "tflops", "status",
           "model", "layers", "vocab", "steps", "warmup", "round", "tokens_per_s", "step_ms", "params_m", "loss")
INT_COLUMNS = ("B", "H", "Hkv", "L", "D", "launches", "layers", "vocab", "steps", "warmup", "round")
FLOAT_COLUMNS = ("median_ms", "p20_ms", "p80_ms", "peak_mem_gib", "tflops", "tokens_per_s", "step_ms", "params_m",
                 "loss")
MODE_ORDER = ("fwd", "bwd", "fwd+bwd")
TIMING_NAMES = {"eager": "eager", "cuda_graph": "graph"}
COLORS = {"fused": "tab:blue", "naive": "tab:orange", "naive-compiled": "tab:red", "sdpa": "tab:green"}
NOT_PERFORMANCE = ("timings under the interpreter are not performance numbers and are not reported")


class CsvLog:
    """Appends rows to a CSV (writing the header first if the file is new), flushed row by row;
    ``bench`` fills the column of that name where a row leaves it out."""

    def __init__(self, path: Path, columns=COLUMNS, bench: str = "kernels"):
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists() or path.stat().st_size == 0
        if not new:
            with open(path, newline="") as f:
                header = tuple(next(csv.reader(f), ()))
            if header != tuple(columns):
                raise SystemExit(f"{path} has columns {header}, expected {tuple(columns)}: not appending")
        self.path = path
        self.columns = columns
        self.bench = bench
        self._file = open(path, "a", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=columns, lineterminator="\n")
        if new:
            self._writer.writeheader()
            self._file.flush()

    def write(self, row: dict):
        row = {"bench": self.bench, **row}
        self._writer.writerow({c: _fmt_csv(row.get(c)) for c in self.columns})
        self._file.flush()

    def close(self):
        self._file.close()


class RunRows(list):
    """A benchmark run's rows, each written as it is appended, stamped with the run (env.run_info,
    the run id suffixed with the bench's name): to RESULTS_CSV when ``to_results``, else to
    out_dir/<run>.csv. A run stopped by a time limit keeps what it measured."""

    def __init__(self, bench: str, on_gpu: bool, to_results: bool, out_dir: Path):
        super().__init__()
        from . import env
        self.info = env.run_info(on_gpu)
        self.info["run"] = f"{self.info['run']}_{bench}"
        self.path = RESULTS_CSV if to_results else out_dir / f"{self.info['run']}.csv"
        self._log = CsvLog(self.path, COLUMNS, bench=bench)

    def append(self, row: dict):
        super().append(row)
        self._log.write({**self.info, **row})

    def close(self) -> Path:
        self._log.close()
        return self.path


def _fmt_csv(x):
    if x is None:
        return ""
    if isinstance(x, float):
        return "" if math.isnan(x) else f"{x:.5g}"
    return x


def read_csv(path: Path, int_columns=INT_COLUMNS, float_columns=FLOAT_COLUMNS, bench: str = "kernels") -> list:
    """The rows one benchmark wrote (the bench column; every row for None), as dicts with
    numbers parsed ('' -> None)."""
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if bench is None or r.get("bench", "kernels") == bench]
    for row in rows:
        for c in int_columns:
            row[c] = int(row[c]) if row.get(c) else None
        for c in float_columns:
            row[c] = float(row[c]) if row.get(c) else None
    return rows


def _commit_matches(commit: str, want: str) -> bool:
    if commit == want:
        return True
    return "+" not in commit + want and min(len(commit), len(want)) >= 7 and \
        (commit.startswith(want) or want.startswith(commit))


def select(rows, run=None, commit=None) -> list:
    """The rows of one run, or of one commit (every run of it); by default the last run."""
    if commit:
        return [r for r in rows if _commit_matches(r["commit"], commit)]
    run = run or (rows[-1]["run"] if rows else None)
    return [r for r in rows if r["run"] == run]


def latest(rows) -> list:
    """One row per (shape, dtype, op, mode, provider, timing): the last one."""
    out = OrderedDict()
    for r in rows:
        out[_key(r) + (r["op"], r["mode"], r["provider"], r["timing"])] = r
    return list(out.values())


# ---------------------------------------------------------------- summaries

def _key(r):
    return (r["B"], r["H"], r["Hkv"], r["L"], r["D"], r["dtype"])


def _ok(r):
    return r is not None and r["status"] == "ok" and r["median_ms"] is not None


def _fmt_ms(x):
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def _cell(r):
    if r is None:
        return "-"
    if _ok(r):
        return _fmt_ms(r["median_ms"])
    return "OOM" if r["status"] == "oom" else r["status"].split(":")[0]


def _ratio(a, b):
    return f"{a['median_ms'] / b['median_ms']:.3g}" if _ok(a) and _ok(b) else "-"


def _order(names, first):
    return [p for p in first if p in names] + sorted(p for p in names if p not in first)


def _header(rows) -> list:
    first = rows[0]
    commits = list(OrderedDict.fromkeys(r["commit"] for r in rows))
    runs = list(OrderedDict.fromkeys(r["run"] for r in rows))
    return [f"{first['gpu']}, torch {first['torch']}, triton {first['triton']}, commit {', '.join(commits)}, "
            f"run {', '.join(runs)}; causal, convs {first.get('conv') or '?'}.", ""]


def markdown(rows) -> str:
    """Per timing and mode: medians in ms per shape, op and provider, fused/sdpa and
    naive/fused, peak memory and kernel launches of fused."""
    rows = latest(rows)
    if not rows:
        return "no rows\n"
    index = {(_key(r), r["op"], r["mode"], r["provider"], r["timing"]): r for r in rows}
    shapes = list(OrderedDict.fromkeys(_key(r) for r in rows))
    mta = _order({r["provider"] for r in rows} - {"sdpa"}, ("fused", "naive", "naive-compiled"))
    has_sdpa = any(r["provider"] == "sdpa" for r in rows)
    out = ["# MTA benchmark", ""] + _header(rows)
    out += ["Medians in ms. sdpa: plain causal attention (no MTA), the bar for every op; fused/sdpa: how "
            "many times its time fused MTA takes; naive/fused: fused's speed-up over naive. Peak: GiB "
            "allocated above the inputs. Launches: CUDA kernels per call.", ""]
    for timing in _order({r["timing"] for r in rows}, TIMING_NAMES):
        for mode in _order({r["mode"] for r in rows}, MODE_ORDER):
            cols = mta + (["sdpa"] if has_sdpa else [])
            ratios = [(a, b) for a, b in (("fused", "sdpa"), ("naive", "fused")) if a in cols and b in cols]
            extra = [c for c in ("fused", "naive") if c in mta and any(
                r["peak_mem_gib"] is not None for r in rows if r["provider"] == c)]
            launches = "fused" in mta and any(r["launches"] is not None for r in rows)
            out += [f"## {mode}, {TIMING_NAMES.get(timing, timing)}", "",
                    "| shape | op | " + " | ".join(cols + [f"{a}/{b}" for a, b in ratios]
                                                  + [f"peak {c}" for c in extra]
                                                  + (["launches fused"] if launches else [])) + " |",
                    "|---|---|" + "---:|" * (len(cols) + len(ratios) + len(extra) + launches)]
            for sk in shapes:
                sdpa = index.get((sk, "none", mode, "sdpa", timing))
                for op in OPS:
                    got = {p: index.get((sk, op, mode, p, timing)) for p in mta}
                    if not any(got.values()):
                        continue
                    got["sdpa"] = sdpa
                    cells = [_cell(got[c]) for c in cols] + [_ratio(got[a], got[b]) for a, b in ratios]
                    cells += [f"{got[c]['peak_mem_gib']:.2f}" if _ok(got[c]) and got[c]["peak_mem_gib"] is not None
                              else "-" for c in extra]
                    if launches:
                        f = got["fused"]
                        cells.append(str(f["launches"]) if f is not None and f["launches"] is not None else "-")
                    out.append(f"| {shape_label(*sk[:5])} | {op} | " + " | ".join(cells) + " |")
            out.append("")
    table = grid_table(rows)
    if table:
        out += ["## Against SDPA over the shapes", ""] + table + [""]
    not_ok = OrderedDict()
    for r in rows:
        if r["status"] != "ok":
            not_ok[(r["provider"], r["status"])] = not_ok.get((r["provider"], r["status"]), 0) + 1
    if not_ok:
        out += ["## Not timed", "", "| provider | status | rows |", "|---|---|---:|"]
        out += [f"| {p} | {s.replace('|', '/')} | {n} |" for (p, s), n in not_ok.items()]
        out.append("")
    return "\n".join(out)


def grid_table(rows) -> list:
    """Markdown lines: per op, mode and MTA provider, the geometric mean and the worst of its
    time over SDPA's at the same shape, over the shapes where both ran, per timing."""
    rows = latest(rows)
    index = {(_key(r), r["op"], r["mode"], r["provider"], r["timing"]): r for r in rows}
    timings = _order({r["timing"] for r in rows if _ok(r)}, TIMING_NAMES)
    if not any(r["provider"] == "sdpa" and _ok(r) for r in rows):
        return []
    groups = OrderedDict()
    for op in OPS:
        for mode in MODE_ORDER:
            for p in _order({r["provider"] for r in rows if r["op"] == op and r["mode"] == mode} - {"sdpa"},
                            ("fused",)):
                groups[(op, mode, p)] = None
    out = ["| op | mode | provider | " + " | ".join(f"{TIMING_NAMES.get(t, t)}: geomean | {TIMING_NAMES.get(t, t)}: "
                                                  f"worst" for t in timings) + " |",
           "|---|---|---|" + "---:|---:|" * len(timings)]
    for op, mode, p in groups:
        cells = []
        for t in timings:
            ratios = []
            for r in rows:
                if (r["op"], r["mode"], r["provider"], r["timing"]) == (op, mode, p, t):
                    sdpa = index.get((_key(r), "none", mode, "sdpa", t))
                    if _ok(r) and _ok(sdpa):
                        ratios.append((r["median_ms"] / sdpa["median_ms"], _key(r)))
            if ratios:
                geo = math.exp(statistics.fmean(math.log(x) for x, _ in ratios))
                worst, wk = max(ratios)
                cells += [f"{geo:.3g}x (n={len(ratios)})", f"{worst:.3g}x ({shape_label(*wk[:5])})"]
            else:
                cells += ["-", "-"]
        out.append(f"| {op} | {mode} | {p} | " + " | ".join(cells) + " |")
    return out


def cpu_summary(rows) -> str:
    """What a run under the interpreter shows: which providers x ops passed the gate and ran."""
    pairs = OrderedDict()
    for r in rows:
        pairs.setdefault((r["provider"], r["op"]), []).append(r["status"])
    passed = [k for k, s in pairs.items() if all(x == "ok" for x in s)]
    lines = [f"correctness gate: {len(passed)} of {len(pairs)} providers x ops passed and ran every "
             f"case ({len(rows)} cases); {NOT_PERFORMANCE}."]
    for (p, op), statuses in pairs.items():
        bad = [s for s in statuses if s != "ok"]
        if bad:
            lines.append(f"  {p} {op}: {bad[0]} ({len(bad)} of {len(statuses)} cases)")
    return "\n".join(lines)


# ---------------------------------------------------------------- plot

def plot(rows, path: Path, metric: str = "median_ms") -> bool:
    """``metric`` against L for the (B, H, Hkv, D, dtype) family with the most L values: one
    panel per op and mode, one line per provider and timing (sdpa in every panel). Returns
    False (and writes nothing) when no family has 2 or more L."""
    rows = [r for r in latest(rows) if _ok(r) and r[metric] is not None]
    families = OrderedDict()
    for r in rows:
        families.setdefault((r["B"], r["H"], r["Hkv"], r["D"], r["dtype"]), []).append(r)
    best = max(families.values(), key=lambda rs: len({r["L"] for r in rs}), default=[])
    if len({r["L"] for r in best}) < 2:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = [op for op in OPS if any(r["op"] == op and r["provider"] != "sdpa" for r in best)] or ["none"]
    modes = _order({r["mode"] for r in best}, MODE_ORDER)
    lines = list(OrderedDict.fromkeys((r["provider"], r["timing"]) for r in best))
    fig, axes = plt.subplots(len(modes), len(ops), figsize=(3.4 * len(ops), 2.9 * len(modes)),
                             squeeze=False, sharex=True)
    for i, mode in enumerate(modes):
        for j, op in enumerate(ops):
            ax = axes[i][j]
            for provider, timing in lines:
                want = "none" if provider == "sdpa" else op
                pts = sorted((r["L"], r[metric]) for r in best if (r["op"], r["mode"], r["provider"],
                                                                   r["timing"]) == (want, mode, provider, timing))
                if pts:
                    color = COLORS.get(provider)   # path variants: matplotlib's next color
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], "--" if timing == "cuda_graph" else "-",
                            marker="o", ms=3, color=color, label=f"{provider} {TIMING_NAMES.get(timing, timing)}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{op}, {mode}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            if i == len(modes) - 1:
                ax.set_xlabel("L")
            if j == 0:
                ax.set_ylabel({"median_ms": "median ms", "peak_mem_gib": "peak GiB above inputs"}.get(metric, metric))
            if ax.has_data():
                ax.legend(fontsize=6)
    r0 = best[0]
    commits = ", ".join(OrderedDict.fromkeys(r["commit"] for r in best))
    what = {"median_ms": "time", "peak_mem_gib": "peak memory"}[metric]
    fig.suptitle(f"{what} vs L: B{r0['B']} H{r0['H']} Hkv{r0['Hkv']} D{r0['D']} {r0['dtype']}, {r0['gpu']}, "
                 f"commit {commits} (sdpa = plain attention)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _write(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.report",
                                 description="Tables and plots from a bench CSV, for one run or one commit.")
    ap.add_argument("--csv", type=Path, default=RESULTS_CSV, help=f"default {RESULTS_CSV}")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--run", help="a run id (the CSV's run column); default: the CSV's last run")
    which.add_argument("--commit", help="every run of this commit (the latest row of each case wins)")
    ap.add_argument("--gpu", help="keep only rows of this GPU (the gpu column)")
    ap.add_argument("--plot", type=Path, metavar="PNG", help="write the plot of --metric against L here")
    ap.add_argument("--metric", choices=("median_ms", "peak_mem_gib"), default="median_ms")
    ap.add_argument("--grid-table", type=Path, metavar="MD", help="write the summary against SDPA here")
    ap.add_argument("--markdown", type=Path, metavar="MD", help="write the full summary here")
    args = ap.parse_args(argv)
    rows = read_csv(args.csv)
    if args.gpu:
        rows = [r for r in rows if r["gpu"] == args.gpu]
    rows = select(rows, args.run, args.commit)
    if not rows:
        raise SystemExit(f"no rows in {args.csv} for run {args.run} / commit {args.commit} / gpu {args.gpu}")
    table = "\n".join(_header(rows) + grid_table(rows)) + "\n"
    print(table)
    if args.grid_table:
        _write(args.grid_table, table)
        print(f"wrote {args.grid_table}")
    if args.markdown:
        _write(args.markdown, markdown(rows))
        print(f"wrote {args.markdown}")
    if args.plot:
        print(f"wrote {args.plot}" if plot(rows, args.plot, args.metric) else
              "no plot: no shape family (B, H, Hkv, D, dtype) has 2 or more L")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Results on disk: the CSV (written row by row while the run goes), and the markdown
summary and PNG plots made from a CSV.

Regenerate the summary and plots of an existing run:  python -m bench.report RESULTS.csv
"""
import argparse
import csv
import math
import sys
from collections import Counter, OrderedDict
from pathlib import Path

from .cases import OPS, shape_label

COLUMNS = ("gpu", "torch", "triton", "commit", "date", "op", "mode", "provider", "B", "H", "Hkv",
           "L", "D", "dtype", "median_ms", "p20_ms", "p80_ms", "peak_mem_gib", "tflops", "status")
INT_COLUMNS = ("B", "H", "Hkv", "L", "D")
FLOAT_COLUMNS = ("median_ms", "p20_ms", "p80_ms", "peak_mem_gib", "tflops")
PROVIDER_ORDER = ("fused", "naive", "naive-compiled", "sdpa")
COLORS = {"fused": "tab:blue", "naive": "tab:orange", "naive-compiled": "tab:red", "sdpa": "tab:green"}
MODE_ORDER = ("fwd", "bwd", "fwd+bwd")
CPU_WARNING = ("CPU run under the Triton interpreter: these timings are NOT performance numbers; "
               "they only show that the harness and the correctness gate work.")


class CsvLog:
    """One CSV per run: '#' comment lines, the header, then one flushed row per case."""

    def __init__(self, path: Path, comments, append: bool = False, columns=COLUMNS):
        """append: add rows to an existing run's CSV (its comments and header stay)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.columns = columns
        self._file = open(path, "a" if append else "w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=columns)
        if not append:
            for line in comments:
                self._file.write(f"# {line}\n")
            self._writer.writeheader()
            self._file.flush()

    def write(self, row: dict):
        self._writer.writerow({c: _fmt_csv(row.get(c)) for c in self.columns})
        self._file.flush()

    def close(self):
        self._file.close()


def _fmt_csv(x):
    if x is None:
        return ""
    if isinstance(x, float):
        return "" if math.isnan(x) else f"{x:.5g}"
    return x


def read_csv(path: Path, int_columns=INT_COLUMNS, float_columns=FLOAT_COLUMNS):
    """(comment lines without '# ', rows as dicts with numbers parsed; '' -> None)."""
    comments, lines = [], []
    with open(path, newline="") as f:
        for line in f:
            if line.startswith("#"):
                comments.append(line[1:].strip())
            else:
                lines.append(line)
    rows = []
    for row in csv.DictReader(lines):
        for c in int_columns:
            row[c] = int(row[c]) if row.get(c) else None
        for c in float_columns:
            row[c] = float(row[c]) if row.get(c) else None
        rows.append(row)
    return comments, rows


# ---------------------------------------------------------------- markdown summary

def _shape_key(r):
    return (r["B"], r["H"], r["Hkv"], r["L"], r["D"], r["dtype"])


def _ok(r):
    return r is not None and r["status"] == "ok"


def _short_status(r):
    if r is None:
        return "-"
    s = r["status"]
    if s == "ok":
        return _fmt_ms(r["median_ms"])
    if s == "oom":
        return "OOM"
    return s.split(":")[0]  # 'skipped', 'gate failed', 'error'


def _fmt_ms(x):
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def _ratio(a, b):
    return f"{a['median_ms'] / b['median_ms']:.3g}" if _ok(a) and _ok(b) else "-"


def _peak(r):
    return f"{r['peak_mem_gib']:.2f}" if _ok(r) and r["peak_mem_gib"] is not None else "-"


def _commits(rows) -> str:
    """'commit X', or for a run resumed across commits each commit with its row count."""
    counts = Counter(r.get("commit") for r in rows)
    if len(counts) <= 1:
        return f"commit {next(iter(counts), None)}"
    listed = ", ".join(f"{c} ({n} rows)" for c, n in counts.items())
    return (f"rows from {len(counts)} commits, resumed run by run ({listed}; dates "
            f"{rows[0].get('date')} to {rows[-1].get('date')}; the CSV's commit column gives each row's)")


def markdown(rows, comments) -> str:
    index = {(_shape_key(r), r["op"], r["mode"], r["provider"]): r for r in rows}
    first = rows[0] if rows else {}
    dtypes = sorted({r["dtype"] for r in rows})
    out = [f"# MTA benchmark: {first.get('gpu', '?')}, {first.get('date', '?')}", ""]
    out.append(f"torch {first.get('torch')}, triton {first.get('triton')}, {_commits(rows)}, "
               f"dtype {', '.join(dtypes)}, causal.")
    out.append("")
    if first.get("gpu") == "cpu":
        out += [f"**{CPU_WARNING}**", ""]
    if comments:
        out += [f"- {c}" for c in comments] + [""]
    out += ["Medians in ms. sdpa is plain causal attention (no MTA), the same bar for every op. "
            "fused/sdpa: how many times plain attention's time fused MTA takes; naive/fused: speed-up "
            "of the fused kernel over naive. Peak: GiB allocated above the inputs.", ""]
    shapes = list(OrderedDict.fromkeys(_shape_key(r) for r in rows))
    many_dtypes = len(dtypes) > 1
    only_sdpa = all(r["provider"] == "sdpa" for r in rows)
    for mode in [m for m in MODE_ORDER if any(r["mode"] == m for r in rows)]:
        out += [f"## {mode}", "",
                "| shape | op | fused | naive | naive-compiled | sdpa | fused/sdpa | naive/fused "
                "| peak fused | peak naive |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for sk in shapes:
            label = shape_label(*sk[:5]) + (f" {sk[5]}" if many_dtypes else "")
            sdpa = index.get((sk, "none", mode, "sdpa"))
            for op in OPS:
                got = {p: index.get((sk, op, mode, p)) for p in ("fused", "naive", "naive-compiled")}
                if not any(got.values()) and not (only_sdpa and op == "none" and sdpa):
                    continue  # sdpa alone has its column in every row
                f, n = got["fused"], got["naive"]
                out.append(f"| {label} | {op} | {_short_status(f)} | {_short_status(n)} | "
                           f"{_short_status(got['naive-compiled'])} | {_short_status(sdpa)} | "
                           f"{_ratio(f, sdpa)} | {_ratio(n, f)} | {_peak(f)} | {_peak(n)} |")
        out.append("")
    not_ok = OrderedDict()
    for r in rows:
        if r["status"] != "ok":
            key = (r["provider"], r["status"])
            not_ok[key] = not_ok.get(key, 0) + 1
    if not_ok:
        out += ["## Not timed", "", "| provider | status | cases |", "|---|---|---:|"]
        out += [f"| {p} | {s.replace('|', '/')} | {n} |" for (p, s), n in not_ok.items()]
        out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------- plots

def _sweep_rows(rows):
    """Rows of the (B, H, Hkv, D, dtype) family with the most distinct L (at least 2), or []."""
    families = OrderedDict()
    for r in rows:
        families.setdefault((r["B"], r["H"], r["Hkv"], r["D"], r["dtype"]), []).append(r)
    best = max(families.values(), key=lambda rs: len({r["L"] for r in rs}), default=[])
    return best if len({r["L"] for r in best}) >= 2 else []


def _series(rows, op, mode, provider, value):
    pts = sorted((r["L"], value(r)) for r in rows
                 if (r["op"], r["mode"], r["provider"]) == (op, mode, provider) and _ok(r)
                 and value(r) is not None)
    return [p[0] for p in pts], [p[1] for p in pts]


def plots(rows, stem: Path):
    """time vs L, speed-up over naive vs L, peak memory vs L for the sweep family.
    Returns the PNG paths written."""
    sweep = _sweep_rows(rows)
    if not sweep:
        return []
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = [op for op in OPS if any(r["op"] == op and r["provider"] != "sdpa" for r in sweep)] or ["none"]
    modes = [m for m in MODE_ORDER if any(r["mode"] == m for r in sweep)]
    r0 = sweep[0]
    family = f"B{r0['B']} H{r0['H']} Hkv{r0['Hkv']} D{r0['D']} {r0['dtype']}, {r0['gpu']}"
    median = lambda r: r["median_ms"]  # noqa: E731
    peak = lambda r: r["peak_mem_gib"]  # noqa: E731

    def speedup_series(op, mode, provider):
        n_l, n_t = _series(sweep, op, mode, "naive", median)
        p_op = "none" if provider == "sdpa" else op
        p_l, p_t = _series(sweep, p_op, mode, provider, median)
        naive_at = dict(zip(n_l, n_t))
        pts = [(L, naive_at[L] / t) for L, t in zip(p_l, p_t) if L in naive_at]
        return [p[0] for p in pts], [p[1] for p in pts]

    def plain(op, mode, provider, value):
        return _series(sweep, "none" if provider == "sdpa" else op, mode, provider, value)

    figures = [
        ("time", "median ms", lambda o, m, p: plain(o, m, p, median), PROVIDER_ORDER),
        ("speedup", "naive time / time", speedup_series, ("fused", "naive-compiled", "sdpa")),
        ("memory", "peak GiB above inputs", lambda o, m, p: plain(o, m, p, peak), PROVIDER_ORDER),
    ]
    written = []
    for name, ylabel, series, providers in figures:
        fig, axes = plt.subplots(len(modes), len(ops), figsize=(3.4 * len(ops), 2.9 * len(modes)),
                                 squeeze=False, sharex=True)
        drew = False
        for i, mode in enumerate(modes):
            for j, op in enumerate(ops):
                ax = axes[i][j]
                for provider in providers:
                    xs, ys = series(op, mode, provider)
                    if xs:
                        drew = True
                        style = "--" if provider == "sdpa" else "-"
                        ax.plot(xs, ys, style, marker="o", ms=3, color=COLORS[provider], label=provider)
                if name == "speedup":
                    ax.axhline(1.0, color="gray", lw=0.8)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_title(f"{op}, {mode}", fontsize=9)
                ax.grid(True, which="both", alpha=0.3)
                if i == len(modes) - 1:
                    ax.set_xlabel("L")
                if j == 0:
                    ax.set_ylabel(ylabel)
                if ax.has_data():
                    ax.legend(fontsize=7)
        if drew:
            fig.suptitle(f"{name} vs L ({family}; sdpa = plain attention)", fontsize=10)
            fig.tight_layout()
            path = stem.with_name(f"{stem.name}_{name}.png")
            fig.savefig(path, dpi=110)
            written.append(path)
        plt.close(fig)
    return written


def write_summary(csv_path: Path, make_plots: bool = True):
    """Write <run>.md (and the PNGs) next to ``csv_path``; returns the paths written."""
    comments, rows = read_csv(csv_path)
    stem = csv_path.with_suffix("")
    md = stem.with_suffix(".md")
    md.write_text(markdown(rows, comments))
    pngs = plots(rows, stem) if make_plots else []
    if make_plots and not pngs:
        print("no plots: no shape family (B, H, Hkv, D, dtype) was run at 2 or more L", flush=True)
    return [md] + pngs


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.report",
                                 description="Regenerate the markdown summary and plots from a bench CSV.")
    ap.add_argument("csv", type=Path)
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    for path in write_summary(args.csv, make_plots=not args.no_plots):
        print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())

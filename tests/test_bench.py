"""The benchmark harness (bench/): its CPU run checks correctness and reports no timings, its
CLI plans the GPU grid, and its CSV and report make one dataset."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HAS_GPU

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402
from bench.__main__ import RUNS, make_config, parse_args  # noqa: E402
from bench.cases import GRID, GRID_OPS  # noqa: E402
from bench.runner import plan  # noqa: E402


def _rows(path: Path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
@pytest.mark.skipif(HAS_GPU, reason="the GPU suite is a benchmark run, not a test")
def test_bench_cpu_checks_correctness_and_reports_no_timings(tmp_path):
    results = report.RESULTS_CSV.read_bytes()
    cmd = [sys.executable, "-m", "bench", "--ops", "talking_heads,none", "--modes", "fwd,fwd+bwd",
           "--providers", "fused,sdpa", "--paths", "--out", str(tmp_path)]
    result = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, TRITON_INTERPRET="1"),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "correctness gate: 5 of 5 providers x ops passed" in out, out[-2000:]
    assert "not performance numbers and are not reported" in out
    assert " ms" not in out and "GiB" not in out and "/sdpa" not in out
    (csv_path,) = tmp_path.glob("*.csv")
    assert list(tmp_path.iterdir()) == [csv_path]          # no summary or plot of nothing
    rows = _rows(csv_path)
    assert tuple(rows[0]) == report.COLUMNS
    assert {r["provider"] for r in rows} == {"fused", "fused:talking_heads", "fused:chunked", "sdpa"}
    assert all(r["status"] == "ok" and r["timing"] == "none" for r in rows), rows
    assert not any(r[c] for r in rows for c in ("median_ms", "p20_ms", "p80_ms", "peak_mem_gib", "launches"))
    assert {r["options"] for r in rows if r["provider"] == "fused:chunked"} == {"path=chunked"}
    assert report.RESULTS_CSV.read_bytes() == results


def test_cpu_refuses_what_needs_a_gpu():
    for argv, message in ((["--record"], "--record needs a GPU"), (["--shapes", "grid"], "grid needs a GPU"),
                          (["--timing", "cuda_graph"], "--timing needs a GPU")):
        with pytest.raises(SystemExit, match=message):
            make_config(parse_args(argv), on_gpu=False)


def test_default_run_writes_to_an_ignored_folder():
    args = parse_args([])
    assert args.out == RUNS and not args.record
    assert "bench/runs/" in (ROOT / ".gitignore").read_text().split()


def test_grid_plan():
    cfg = make_config(parse_args(["--shapes", "grid"]), on_gpu=True)
    assert [(s.B, s.H, s.L, s.D) for s in cfg.shapes] == list(GRID)
    assert cfg.ops == GRID_OPS and cfg.modes == ("fwd", "fwd+bwd") and cfg.providers == ("fused", "sdpa")
    assert cfg.timings == ("eager", "cuda_graph") and cfg.dtype_name == "bf16" and cfg.conv == (6, 11)
    assert len(plan(cfg)) == len(GRID) * 6 * 2    # fused for 5 ops, sdpa for none; 2 modes

    short = make_config(parse_args(["--shapes", "grid", "--max-l", "2048"]), on_gpu=True)
    assert {s.L for s in short.shapes} == {1024, 2048} and len(short.shapes) == 4
    only = make_config(parse_args(["--shapes", "grid", "--lengths", "32768,131072"]), on_gpu=True)
    assert [s.L for s in only.shapes] == [32768, 131072]

    paths = make_config(parse_args(["--shapes", "grid", "--max-l", "1024", "--paths", "--modes", "fwd"]),
                        on_gpu=True)
    by_op = {}
    for case in plan(paths):
        by_op.setdefault(case.op, []).append(case.provider)
    assert by_op["none"] == ["fused", "fused:sdpa", "fused:flash", "sdpa"]
    assert by_op["talking_heads"] == ["fused", "fused:talking_heads", "fused:chunked"]
    assert by_op["full"] == ["fused"]


def _row(run, op, provider, L, ms, timing="eager", mode="fwd", status="ok"):
    return dict(run=run, gpu="G", torch="t", triton="tr", commit="abc1234", date="d", B=1, H=16, Hkv=16, L=L,
                D=128, dtype="bf16", conv="6x11", op=op, mode=mode, provider=provider, options="", timing=timing,
                median_ms=ms if status == "ok" else None, p20_ms=ms, p80_ms=ms, peak_mem_gib=0.5, launches=7,
                tflops=1.0, status=status)


def test_grid_table_geomean_and_worst_against_sdpa():
    rows = [_row("r", "none", "sdpa", 1024, 1.0), _row("r", "none", "sdpa", 2048, 2.0),
            _row("r", "full", "fused", 1024, 4.0), _row("r", "full", "fused", 2048, 18.0),
            _row("r", "none", "sdpa", 1024, 0.5, "cuda_graph"), _row("r", "full", "fused", 1024, 1.0, "cuda_graph"),
            _row("r", "full", "fused", 2048, None, "cuda_graph", status="skipped: call > 0.5 s")]
    table = report.grid_table(rows)
    assert table[0] == "| op | mode | provider | eager: geomean | eager: worst | graph: geomean | graph: worst |"
    (line,) = [t for t in table if t.startswith("| full |")]
    assert line == "| full | fwd | fused | 6x (n=2) | 9x (B1 H16 L2048 D128) | 2x (n=1) | 2x (B1 H16 L1024 D128) |"


def test_csv_log_appends_and_report_selects_a_run(tmp_path):
    path = tmp_path / "results.csv"
    for run, ms in (("r1", 3.0), ("r2", 5.0)):
        log = report.CsvLog(path)
        log.write(_row(run, "none", "sdpa", 1024, 1.0))
        log.write(_row(run, "full", "fused", 1024, ms))
        log.close()
    assert tuple(_rows(path)[0]) == report.COLUMNS and len(_rows(path)) == 4
    rows = report.read_csv(path)
    assert [r["median_ms"] for r in report.select(rows)] == [1.0, 5.0]              # the last run
    assert [r["median_ms"] for r in report.select(rows, run="r1")] == [1.0, 3.0]
    assert len(report.select(rows, commit="abc1234")) == 4
    assert "| 5x (n=1) |" in "\n".join(report.grid_table(report.select(rows, commit="abc1234")))  # latest wins
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(SystemExit, match="not appending"):
        report.CsvLog(tmp_path / "other.csv")

    table = tmp_path / "out" / "grid.md"
    assert report.main(["--csv", str(path), "--run", "r1", "--grid-table", str(table)]) == 0
    assert "| full | fwd | fused | 3x (n=1) |" in table.read_text()


def test_plot_from_the_csv(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [_row("r", op, p, L, L / 1000) for L in (1024, 2048) for op, p in (("none", "sdpa"), ("full", "fused"))]
    assert report.plot(rows, tmp_path / "time.png") and (tmp_path / "time.png").stat().st_size > 0
    assert not report.plot(rows[:2], tmp_path / "one.png")         # one L: nothing to draw


def test_packed_bench_on_cpu_checks_packed_against_documents_alone(tmp_path):
    """bench.packed without a GPU: every op packed equals its documents run alone, and one
    untimed row per op, mode and provider."""
    cmd = [sys.executable, "-m", "bench.packed", "--tokens", "40", "--out", str(tmp_path)]
    result = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, TRITON_INTERPRET="1"),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    for op in ("full", "talking_heads", "none"):
        assert f"{op}: packed equals the documents run alone" in result.stdout
    (csv_path,) = tmp_path.glob("*.csv")
    rows = _rows(csv_path)
    assert {r["bench"] for r in rows} == {"packed"}
    assert {(r["op"], r["mode"], r["provider"]) for r in rows} == {
        (op, mode, p) for op in ("full", "talking_heads", "none") for mode in ("fwd", "fwd+bwd")
        for p in ("packed", "separate", "dense")}
    assert all(r["status"] == "ok" and r["timing"] == "none" and r["median_ms"] == "" for r in rows), rows


def test_recorded_results_are_one_dataset():
    """bench/results/ holds one CSV: every benchmark's rows, each case once per run and timing."""
    assert sorted(p.name for p in report.RESULTS.glob("*.csv")) == ["results.csv"]
    rows = _rows(report.RESULTS_CSV)
    assert rows and tuple(rows[0]) == report.COLUMNS
    assert {r["bench"] for r in rows} <= {"kernels", "train", "decode", "packed"}
    assert all(r["run"] and r["commit"] and r["gpu"] != "cpu" for r in rows)
    kernels = [r for r in rows if r["bench"] == "kernels"]
    assert {r["timing"] for r in kernels} <= {"eager", "cuda_graph"}
    keys = [(r["run"], r["op"], r["mode"], r["provider"], r["B"], r["H"], r["L"], r["D"], r["timing"]) for r in kernels]
    assert len(set(keys)) == len(keys)


def test_wall_clock_timing_of_slow_calls():
    """The timer for calls too slow for do_bench: exactly the asked number of calls, gradients
    reset and the device synchronized around each, quantiles ordered."""
    from bench.timing import _wall_quantiles

    class Leaf:
        grad = "stale"

    events, leaf = [], Leaf()

    def fn():
        assert leaf.grad is None
        leaf.grad = "accumulated"
        events.append("call")

    median, p20, p80 = _wall_quantiles(fn, [leaf], min_runs=3, max_runs=3, budget_s=0.0,
                                       sync=lambda: events.append("sync"))
    assert events == ["sync", "call", "sync"] * 3
    assert 0 <= p20 <= median <= p80


@pytest.mark.gpu
def test_grid_rows_on_the_gpu(tmp_path):
    """On the GPU a grid case gives an eager and a CUDA-graph row, both timed, with peak memory
    and the kernel launches of one call."""
    cmd = [sys.executable, "-m", "bench", "--shapes", "grid", "--max-l", "1024", "--ops", "talking_heads",
           "--modes", "fwd", "--no-plots", "--out", str(tmp_path)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = _rows(next(tmp_path.glob("*.csv")))
    assert {(r["provider"], r["timing"]) for r in rows} == {(p, t) for p in ("fused", "sdpa")
                                                            for t in ("eager", "cuda_graph")}
    assert all(r["status"] == "ok" and float(r["median_ms"]) > 0 and int(r["launches"]) > 0 for r in rows), rows
    assert "| talking_heads | fwd | fused |" in result.stdout

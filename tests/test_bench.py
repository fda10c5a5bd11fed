"""The benchmark's CPU default runs end to end: every case passes its correctness gate and
lands in the CSV and the summary (a smoke test that keeps bench/ from rotting)."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HAS_GPU

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(HAS_GPU, reason="the GPU suite is a benchmark run, not a test")
def test_bench_cpu_smoke(tmp_path):
    cmd = [sys.executable, "-m", "bench", "--ops", "full,talking_heads,none", "--modes", "fwd,fwd+bwd",
           "--providers", "fused,naive,sdpa", "--no-plots", "--out", str(tmp_path)]
    env = dict(os.environ, TRITON_INTERPRET="1", MTA_KERNELS_FUSED_MIX_BACKWARD="1", MTA_KERNELS_CHUNKED_FORWARD="0")
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "NOT performance numbers" in result.stdout
    (csv_path,) = tmp_path.glob("*.csv")
    rows = list(csv.DictReader(line for line in csv_path.open() if not line.startswith("#")))
    assert rows, "no rows written"
    assert {r["provider"] for r in rows} == {"fused", "naive", "sdpa"}
    assert all(r["status"] == "ok" for r in rows), [(r["op"], r["provider"], r["status"]) for r in rows]
    assert (tmp_path / (csv_path.stem + ".md")).exists()
    # the kernel switches of the run are on record, as set in its environment
    assert "# switches: MTA_KERNELS_FUSED_MIX_BACKWARD=1 MTA_KERNELS_CHUNKED_FORWARD=0" in csv_path.read_text()


def test_wall_clock_timing_of_slow_calls():
    """The timer used for calls too slow for do_bench (and on CPU): exactly the asked number
    of calls, gradients reset and the device synchronized around each, quantiles ordered."""
    sys.path.insert(0, str(ROOT))
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


def test_summary_names_every_commit_of_a_resumed_run():
    """A suite resumed across commits must not be summarized under its first commit alone."""
    sys.path.insert(0, str(ROOT))
    from bench.report import markdown

    def row(commit, date):
        return dict(gpu="G", torch="t", triton="tr", commit=commit, date=date, op="none", mode="fwd",
                    provider="sdpa", B=1, H=2, Hkv=2, L=16, D=8, dtype="fp32", status="ok",
                    median_ms=1.0, p20_ms=1.0, p80_ms=1.0, tflops=1.0, peak_mem_gib=0.0)

    one = markdown([row("aaa", "d1")], [])
    assert "commit aaa," in one
    resumed = markdown([row("aaa", "d1"), row("bbb", "d2"), row("bbb", "d2")], [])
    assert "aaa (1 rows)" in resumed and "bbb (2 rows)" in resumed and "d1 to d2" in resumed


@pytest.mark.skipif(HAS_GPU, reason="checks the refusal on a machine without a GPU")
def test_cuda_graph_timing_needs_a_gpu(tmp_path):
    """--cuda-graphs (times of calls replayed from a CUDA graph) is refused without a GPU, with
    an error that names the flag, before any case runs."""
    cmd = [sys.executable, "-m", "bench", "--cuda-graphs", "--no-plots", "--out", str(tmp_path)]
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "--cuda-graphs needs a GPU" in result.stderr
    assert not list(tmp_path.glob("*.csv"))


@pytest.mark.gpu
def test_cuda_graph_timing_on_the_gpu(tmp_path):
    """On the GPU, --cuda-graphs times fused talking heads' fwd+bwd and SDPA's from CUDA graph
    replays: both rows land in the CSV as ok, under a header that says how they were timed."""
    cmd = [sys.executable, "-m", "bench", "--cuda-graphs", "--shapes", "sweep", "--lengths", "512", "--ops",
           "talking_heads", "--modes", "fwd+bwd", "--providers", "fused,sdpa", "--no-plots", "--out", str(tmp_path)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (csv_path,) = tmp_path.glob("*_cuda-graphs.csv")
    assert "do_bench_cudagraph" in csv_path.read_text()
    rows = list(csv.DictReader(line for line in csv_path.open() if not line.startswith("#")))
    assert {r["provider"] for r in rows} == {"fused", "sdpa"}
    assert all(r["status"] == "ok" and float(r["median_ms"]) > 0 for r in rows), rows

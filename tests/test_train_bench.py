"""The training benchmark (bench/train.py): its CPU default runs end to end (a tiny model
under the Triton interpreter, every provider 'ok', rows without timings), its summary pairs
rounds, and its baseline really runs F.scaled_dot_product_attention."""
import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import HAS_GPU

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.train import COLUMNS  # noqa: E402


def _rows(csv_path: Path):
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
@pytest.mark.skipif(HAS_GPU, reason="on a GPU the default is the 830M model: a benchmark run, not a test")
def test_train_bench_cpu_smoke(tmp_path):
    cmd = [sys.executable, "-m", "bench.train", "--out", str(tmp_path)]
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "not performance numbers and are not reported" in result.stdout
    assert "tokens/s" not in result.stdout
    progress = [line for line in result.stdout.splitlines() if line.startswith("[")]
    assert len(progress) == 3, result.stdout          # one line per provider

    (csv_path,) = tmp_path.glob("*_train.csv")
    rows = _rows(csv_path)
    assert tuple(rows[0]) == COLUMNS
    assert [r["provider"] for r in rows] == ["baseline", "mta-reference", "mta-fused"]
    assert all(r["status"] == "ok" for r in rows), [(r["provider"], r["status"]) for r in rows]
    for r in rows:
        assert (r["gpu"], r["model"], r["dtype"]) == ("cpu", "tiny", "fp32")
        assert r["run"] and r["commit"] and r["date"] and not r["tokens_per_s"] and not r["step_ms"]
    by = {r["provider"]: r for r in rows}
    # Same weights (seed 0), same tokens, fp32: the two MTA backends train the same model.
    assert math.isclose(float(by["mta-fused"]["loss"]), float(by["mta-reference"]["loss"]), rel_tol=1e-3)


def test_record_needs_a_gpu_and_providers_take_short_names(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from bench import train

    assert train.parse_args(["--providers", "baseline,fused"]).providers == ("baseline", "mta-fused")
    if not HAS_GPU:
        with pytest.raises(SystemExit):
            train.parse_args(["--record"])


def test_recorded_training_results():
    """The training rows of bench/results/results.csv: the dataset's columns, every row of a GPU run."""
    all_rows = _rows(ROOT / "bench" / "results" / "results.csv")
    assert all_rows and tuple(all_rows[0]) == COLUMNS
    rows = [r for r in all_rows if r["bench"] == "train"]
    assert rows
    assert {r["provider"] for r in rows} == {"baseline", "mta-reference", "mta-fused"}
    assert all(r["run"] and r["round"] and r["gpu"] != "cpu" for r in rows)


def test_baseline_runs_sdpa(monkeypatch):
    """The baseline's attention goes through SDPA, once per layer, and gives the loss of the
    same model on the reference's plain attention."""
    monkeypatch.syspath_prepend(str(ROOT))
    from bench import train
    from mta_kernels.nn import MTATransformer

    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls.append(1)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    tokens = train.random_batches(1, 2, 16, train.TINY_VOCAB, "cpu")[0]
    baseline = train.build_model("baseline", "tiny", 2, train.TINY_VOCAB, "cpu")
    plain = MTATransformer(train.model_config("tiny", "baseline", 2, train.TINY_VOCAB), backend="reference")
    plain.load_state_dict(baseline.state_dict())
    with torch.no_grad():
        got = baseline.loss(tokens)
        assert len(calls) == 2
        want = plain.loss(tokens)
    assert len(calls) == 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_use_sdpa_refuses_mta_layers(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from bench import train
    from mta_kernels.nn import MTATransformer

    model = MTATransformer(train.model_config("tiny", "mta", 1, train.TINY_VOCAB), backend="reference")
    with pytest.raises(ValueError, match="without MTA parts"):
        train.use_sdpa(model)


def _run_row(provider, rnd, tokens_per_s, status="ok", peak=18.0):
    """A row as train.read_run returns it; a failed run has no numbers."""
    if status != "ok":
        return dict(provider=provider, round=rnd, tokens_per_s=None, step_ms=None, peak_mem_gib=None,
                    params_m=None, loss=None, status=status)
    return dict(provider=provider, round=rnd, tokens_per_s=tokens_per_s, step_ms=2048e3 / tokens_per_s,
                peak_mem_gib=peak, params_m=876.6, loss=12.2, status=status)


def test_rounds_pair_each_provider_with_the_baseline_of_its_round(monkeypatch):
    """Ratios are taken per round (fused against the baseline trained minutes before it) and
    the summary reports their median and range; a failed round is named in the status."""
    monkeypatch.syspath_prepend(str(ROOT))
    from bench import train

    rows = [_run_row("baseline", 1, 20000), _run_row("mta-fused", 1, 10000, peak=19.0),
            _run_row("baseline", 2, 30000), _run_row("mta-fused", 2, 12000, peak=19.5),
            _run_row("baseline", 3, 25000), _run_row("mta-fused", 3, None, status="oom")]
    fused = [r for r in rows if r["provider"] == "mta-fused"]
    base = [r for r in rows if r["provider"] == "baseline"]
    assert train.paired_speed_ratios(fused, base) == [0.5, 0.4]      # round 3 failed: no ratio
    c = train.combine_rounds(fused)
    assert c["tokens_per_s"] == 11000 and c["tokens_range"] == (10000, 12000)
    assert c["peak_mem_gib"] == 19.5 and c["rounds"] == 3 and c["status"] == "oom (1 of 3 rounds)"
    assert train.combine_rounds(base)["tokens_per_s"] == 25000
    tokens, _ = train.ratio_table(rows)[2:]
    assert "| 0.45x (0.4-0.5) |" in tokens and tokens.endswith("| no |")   # median 0.45 < 0.5
    fixed = dict(run="r", gpu="G", torch="t", triton="tr", commit="c", model="830M", layers=24, seq=2048,
                 batch=1, vocab=128256, dtype="bf16", steps=10, warmup=3)
    md = train.markdown([dict(fixed, **r) for r in rows])
    assert "0.105x" in md and ">= 0.5x" in md and "<= 1.3x" in md

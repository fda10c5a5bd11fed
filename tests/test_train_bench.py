"""The training benchmark (bench/train.py): its CPU default runs end to end (a tiny model
under the Triton interpreter, every provider 'ok', CSV and summary written), and its
baseline really runs F.scaled_dot_product_attention."""
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


def _rows(csv_path: Path):
    return list(csv.DictReader(line for line in csv_path.open() if not line.startswith("#")))


@pytest.mark.skipif(HAS_GPU, reason="on a GPU the default is the 830M model: a benchmark run, not a test")
def test_train_bench_cpu_smoke(tmp_path):
    cmd = [sys.executable, "-m", "bench.train", "--out", str(tmp_path)]
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "NOT performance numbers" in result.stdout
    progress = [line for line in result.stdout.splitlines() if line.startswith("[")]
    assert len(progress) == 3, result.stdout          # one line per provider

    (csv_path,) = tmp_path.glob("*_train.csv")
    rows = _rows(csv_path)
    assert [r["provider"] for r in rows] == ["baseline", "reference", "fused"]
    assert all(r["status"] == "ok" for r in rows), [(r["provider"], r["status"]) for r in rows]
    for r in rows:
        assert (r["gpu"], r["model"], r["dtype"]) == ("cpu", "tiny", "fp32")
        assert float(r["tokens_per_s"]) > 0 and r["commit"] and r["date"]
    by = {r["provider"]: r for r in rows}
    # Same weights (seed 0), same tokens, fp32: the two MTA backends train the same model.
    assert math.isclose(float(by["fused"]["loss"]), float(by["reference"]["loss"]), rel_tol=1e-3)

    md = (tmp_path / (csv_path.stem + ".md")).read_text()
    assert "0.105x" in md and ">= 0.5x" in md and "<= 1.3x" in md


def test_baseline_runs_sdpa(monkeypatch):
    """The baseline's attention goes through SDPA, once per layer, and gives the loss of the
    same model on the reference's plain attention."""
    monkeypatch.syspath_prepend(str(ROOT))
    from bench import train
    from mta_kernels.models import MTATransformer

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
    from mta_kernels.models import MTATransformer

    model = MTATransformer(train.model_config("tiny", "mta", 1, train.TINY_VOCAB), backend="reference")
    with pytest.raises(ValueError, match="without MTA parts"):
        train.use_sdpa(model)

"""Every kernel a path launches must fit an H100/H200 (sm_90a): compiled here without a GPU
(Triton ships ptxas), so a shared-memory overflow fails on CPU CI instead of on the device.
Spills are slow but legal; only overflowing shared memory fails."""
import os
import pathlib
import subprocess
import sys

import pytest
import triton

ROOT = pathlib.Path(__file__).resolve().parents[1]
PTXAS = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"

# each path's forward and backward at the widest heads it takes, and the paper's D=96 and 64;
# fp16 (whose fp32 dots run as tf32x3); the fused decode step
LAUNCHES = ["flash:256", "talking_heads:256", "talking_heads:96", "full:256", "full:96", "pre_conv:64",
            "post_conv:128", "talking_heads:128:fp16", "full:128:fp16", "decode_full", "decode_talking_heads:96"]


@pytest.mark.slow
@pytest.mark.skipif(not PTXAS.exists(), reason="Triton's bundled ptxas is missing")
def test_kernels_fit_sm90_shared_memory():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "sm90_compile.py"), *LAUNCHES],
                         capture_output=True, text=True, env=env, timeout=1800)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert " OK" in run.stdout and "TOO MUCH" not in run.stdout, run.stdout[-4000:]

"""Every kernel configuration the dispatcher picks must fit an H200 (sm_90a): compiled here
without a GPU (Triton ships ptxas), so a shared-memory overflow fails on CPU CI instead of
on the device. Spills are slow but legal; only overflowing shared memory fails."""
import os
import pathlib
import subprocess
import sys

import pytest
import triton

ROOT = pathlib.Path(__file__).resolve().parents[1]
PTXAS = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"

# The widest heads each path takes: flash and the general kernel up to D=256, register
# mixing up to 128; plus the paper's D=96 through the mixing kernels.
LAUNCHES = ["flash_fwd:256", "mix_fwd:128", "mix_fwd:96", "premix_fwd:128", "full_fwd:256", "full_fwd:128",
            "flash_bwd:256", "flash_bwd:128", "mix_bwd:128", "mix_bwd:96", "slab_conv", "slab_mix",
            "pre_conv_matmul:128", "pre_conv_matmul:96", "pre_conv_matmul:256"]


@pytest.mark.skipif(not PTXAS.exists(), reason="Triton's bundled ptxas is missing")
def test_kernels_fit_h200_shared_memory():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "sm90_compile.py"), *LAUNCHES],
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert run.stdout.count(" OK") >= len(LAUNCHES), run.stdout

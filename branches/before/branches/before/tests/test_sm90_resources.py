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


def _compile(launches):
    """scripts/sm90_compile.py over ``launches``, without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "sm90_compile.py"), *launches],
                          capture_output=True, text=True, env=env, timeout=900)


@pytest.mark.skipif(not PTXAS.exists(), reason="Triton's bundled ptxas is missing")
def test_kernels_fit_h200_shared_memory():
    run = _compile(LAUNCHES)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert run.stdout.count(" OK") >= len(LAUNCHES), run.stdout


@pytest.mark.skipif(not PTXAS.exists(), reason="Triton's bundled ptxas is missing")
def test_register_mixing_width_rule_matches_shared_memory():
    """forward.MAX_REGISTER_MIX_DIM for fp32: the register-mixing kernels fit at its width and
    not at twice it (fp32 at D=64 asked the H200 for 258 KB of its 227), so the rule is the
    compiler's, not a guess."""
    from mta_kernels.forward import MAX_REGISTER_MIX_DIM
    widest = MAX_REGISTER_MIX_DIM[4]
    run = _compile([f"mix_fwd_fp32:{widest}", f"mix_bwd_fp32:{widest}"])
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    run = _compile([f"mix_fwd_fp32:{2 * widest}"])
    assert run.returncode == 1 and "TOO MUCH SHARED MEMORY" in run.stdout, run.stdout[-4000:] + run.stderr[-4000:]

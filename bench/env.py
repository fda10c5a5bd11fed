"""Who ran the benchmark on what: GPU name, library versions, commit and date."""
import datetime
import os
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def _git(*args):
    out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip())
    return out.stdout.strip()


def commit() -> str:
    """Short hash of HEAD, '+dirty' when the work tree has changes (outside bench/results);
    'nocommit' before the first commit. MTA_BENCH_COMMIT overrides it, for copies of the
    tree without .git (the device machine gets the work tree only)."""
    if os.environ.get("MTA_BENCH_COMMIT"):
        return os.environ["MTA_BENCH_COMMIT"]
    try:
        head = _git("rev-parse", "--short", "HEAD")
    except (OSError, RuntimeError, subprocess.TimeoutExpired):
        head = "nocommit"
    try:
        # The results folder is left out: a run's own CSV must not make the next run dirty.
        dirty = bool(_git("status", "--porcelain", "--", ".", ":(exclude)bench/results"))
    except (OSError, RuntimeError, subprocess.TimeoutExpired):
        dirty = False
    return head + ("+dirty" if dirty else "")


def device_name(on_gpu: bool) -> str:
    return torch.cuda.get_device_name() if on_gpu else "cpu"


def run_info(on_gpu: bool) -> dict:
    import triton
    return {
        "gpu": device_name(on_gpu),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": commit(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def kernel_switches() -> str:
    """The mta_kernels switches in effect, as 'NAME=value' words for a results file: which
    backward and forward paths ran and with what chunk budget."""
    from mta_kernels import backward, chunked_forward, slabs
    return " ".join([f"MTA_KERNELS_FUSED_MIX_BACKWARD={int(backward.FUSED_MIX_BACKWARD)}",
                     f"MTA_KERNELS_CHUNKED_FORWARD={chunked_forward.CHUNKED_FORWARD}",
                     f"MTA_KERNELS_CHUNKED_TALKING_HEADS={chunked_forward.CHUNKED_TALKING_HEADS}",
                     f"MTA_KERNELS_CHUNK_BYTES={slabs.CHUNK_BYTES}",
                     f"MTA_KERNELS_CHUNKED_TF32={int(slabs.TF32_MATMULS)}",
                     f"MTA_KERNELS_PRE_CONV_MATMUL={slabs.PRE_CONV_MATMUL}",
                     f"MTA_KERNELS_BF16_SCORES={int(chunked_forward.BF16_SCORES)}",
                     f"MTA_KERNELS_BF16_SLABS={int(chunked_forward.BF16_SLABS)}",
                     f"MTA_KERNELS_CAUSAL_MATMULS={chunked_forward.CAUSAL_MATMULS}"])

"""Who ran the benchmark on what: GPU name, library versions, commit, date and run id."""
import datetime
import os
import re
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
    """Short hash of HEAD, '+dirty' when the work tree has changes outside bench/results;
    'nocommit' without git. MTA_BENCH_COMMIT overrides it (for copies of the tree without .git)."""
    if os.environ.get("MTA_BENCH_COMMIT"):
        return os.environ["MTA_BENCH_COMMIT"]
    try:
        head = _git("rev-parse", "--short", "HEAD")
    except (OSError, RuntimeError, subprocess.TimeoutExpired):
        head = "nocommit"
    try:
        # Appending to bench/results must not make the next run dirty.
        dirty = bool(_git("status", "--porcelain", "--", ".", ":(exclude)bench/results"))
    except (OSError, RuntimeError, subprocess.TimeoutExpired):
        dirty = False
    return head + ("+dirty" if dirty else "")


def device_name(on_gpu: bool) -> str:
    return torch.cuda.get_device_name() if on_gpu else "cpu"


def run_info(on_gpu: bool) -> dict:
    """gpu, torch, triton, commit, date (ISO 8601) and run ('<date>_<time>_<gpu>')."""
    import triton
    info = {
        "gpu": device_name(on_gpu),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": commit(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    stamp = info["date"].replace(":", "").replace("T", "_")
    info["run"] = f"{stamp}_{re.sub(r'[^A-Za-z0-9]+', '-', info['gpu']).strip('-')}"
    return info

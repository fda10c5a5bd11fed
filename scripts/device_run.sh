#!/usr/bin/env bash
# One device-machine session: install, GPU tests, smoke timings. Results under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
# No installs there: put both packages on the path (mta_reference lives in reference/).
mkdir -p /tmp/site && ln -sfn "$PWD/reference" /tmp/site/mta_reference
export PYTHONPATH="$PWD:/tmp/site:$PWD/tests"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"
for step in "$@"; do
  case "$step" in
    smoke) timeout 300 python3 scripts/gpu_smoke.py 2>&1 | tee "$OUT/smoke.log" ;;
    gputests) timeout 400 python3 -m pytest tests -m gpu -x -q 2>&1 | tee "$OUT/gputests.log" | tail -30 ;;
    bench) timeout 500 python3 -m bench --quick --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -40 ;;
  esac
done

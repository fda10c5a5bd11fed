#!/usr/bin/env bash
# One GPU call of the project: the steps named on the command line, their logs under $OUT.
#
#   scripts/gpu_runbook.sh env tests grid        # through the device tool, from the repository root
#
# steps:
#   env       the GPU, driver, torch and triton
#   check     every path against the reference on small awkward shapes (scripts/stress.py --check)
#   tests     the GPU-marked tests (bf16/fp16 at realistic sizes, every path forced)
#   grid      the benchmark grid (eager and CUDA-graph timing, launches, memory) recorded to
#             bench/results/results.csv; the file comes back under $OUT
#   paths     every path of each op timed over the grid (scripts/time_paths.py); with a tree of
#             another commit under .baseline/ (git-ignored), its paths too, picked by its own switches
#   profile   kernel-by-kernel profiles of full MTA and talking heads (scripts/profile_path.py)
#   train     the 830M training benchmark (bench.train), batch 1 and 4, and packed documents
#   dist      bench.train under torchrun on every GPU, DDP and FSDP2 (multi-GPU kinds)
#   decode    the decode benchmark (bench.decode), each block path forced in turn
#   packed    packed documents against the same documents run alone (bench.packed)
#   stress    the reliability script (scripts/stress.py)
# TESTS_K: a pytest -k expression to run only some of the GPU tests; DECODE_ARGS, GRID_ARGS: more arguments of
# bench.decode and of the grid. CHECK_S, TESTS_S, GRID_S, DECODE_S, PACKED_S,
# PROFILE_S (each profile), TRAIN_S (each training run), STRESS_S: seconds each may run (what it wrote by then
# comes back). The tree arrives without .git: write `git rev-parse --short HEAD > scripts/device_commit` before
# the call and name it in the call's carry list, so that results record their commit.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
# nothing is installed there: both packages go on the path (mta_reference lives in reference/)
mkdir -p /tmp/site && ln -sfn "$PWD/reference" /tmp/site/mta_reference
export PYTHONPATH="$PWD:/tmp/site:$PWD/tests:$PWD/scripts"
export MTA_BENCH_COMMIT=$(cat scripts/device_commit 2>/dev/null || echo unknown)

step_check() {
  timeout ${CHECK_S:-300} python3 scripts/stress.py --check 2>&1 | tee "$OUT/check.log" | tail -45
}

step_env() {
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
}

step_tests() {
  timeout ${TESTS_S:-540} python3 -m pytest -v --tb=short -m gpu -p no:cacheprovider ${TESTS_K:+-k "$TESTS_K"} tests/ 2>&1 | tee "$OUT/tests.log" | grep -E "FAILED|ERROR|passed|failed" | tail -30
}

step_grid() {
  timeout ${GRID_S:-560} python3 -m bench --shapes grid --record ${GRID_ARGS:-} 2>&1 | tee "$OUT/grid.log" | tail -60
  cp bench/results/results.csv "$OUT/results.csv"
}

step_paths() {
  local csv="$OUT/paths.csv"
  for path in talking_heads chunked; do
    timeout 400 python3 scripts/time_paths.py --label "new:$path" --path $path --ops talking_heads \
      --max-l ${MAX_L:-131072} --out "$csv"
  done
  timeout 400 python3 scripts/time_paths.py --label new:chunked --path chunked --ops full,pre_conv,post_conv \
    --max-l 32768 --out "$csv"
  if [ -d .baseline/mta_kernels ]; then
    local old="$PWD/.baseline:/tmp/site:$PWD/scripts"
    MTA_KERNELS_CHUNKED_TALKING_HEADS=0 PYTHONPATH=$old timeout 400 python3 scripts/time_paths.py \
      --label old:register --ops talking_heads --max-l ${MAX_L:-131072} --out "$csv"
    MTA_KERNELS_CHUNKED_FORWARD=0 PYTHONPATH=$old timeout 400 python3 scripts/time_paths.py \
      --label old:general --ops full,pre_conv,post_conv --modes fwd --max-l 32768 --out "$csv"
  fi
}

step_profile() {
  for spec in "full 1,16,4096,128" "full 4,16,2048,96" "full 8,16,1024,64" "talking_heads 8,16,1024,64" \
              "talking_heads 1,16,4096,128" "post_conv 1,16,4096,128"; do
    set -- $spec
    timeout ${PROFILE_S:-90} python3 scripts/profile_path.py --op $1 --shape $2 --mode fwd+bwd --top 14
  done 2>&1 | tee "$OUT/profile.log"
}

step_train() {
  for batch in 1 4; do
    timeout ${TRAIN_S:-240} python3 -m bench.train --model 830M --batch $batch --rounds 3 --providers baseline,mta-fused \
      --record 2>&1 | tee -a "$OUT/train.log" | tail -12
  done
  timeout ${TRAIN_S:-240} python3 -m bench.train --model 830M --packed --rounds 3 --providers baseline,mta-fused --record 2>&1 \
    | tee -a "$OUT/train.log" | tail -8
  cp bench/results/results.csv "$OUT/results.csv"
}

step_dist() {
  local n=$(python3 -c "import torch; print(torch.cuda.device_count())")
  for mode in ddp fsdp; do
    for procs in 1 $n; do
      python3 -m torch.distributed.run --nproc-per-node $procs -m bench.train --model 830M --dist $mode \
        --rounds 2 --providers baseline,mta-fused --record 2>&1 | tee -a "$OUT/dist.log" | tail -6
    done
  done
  cp bench/results/results.csv "$OUT/results.csv"
}

step_decode() {
  timeout ${DECODE_S:-300} python3 -m bench.decode --record --paths decode,chunked ${DECODE_ARGS:-} 2>&1 | tee "$OUT/decode.log" | tail -40
  cp bench/results/results.csv "$OUT/results.csv"
}

step_packed() {
  timeout ${PACKED_S:-400} python3 -m bench.packed --record 2>&1 | tee "$OUT/packed.log" | tail -12
  cp bench/results/results.csv "$OUT/results.csv"
}

step_stress() {
  timeout ${STRESS_S:-540} python3 scripts/stress.py 2>&1 | tee "$OUT/stress.log" | tail -30
}

for step in "$@"; do
  echo "=== $step"
  "step_$step"
done

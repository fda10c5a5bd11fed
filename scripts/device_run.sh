#!/usr/bin/env bash
# One device-machine session: GPU tests, benchmarks, a profile. Results under $OUT.
# Usage: scripts/device_run.sh STEP... with steps smoke, gputests, quick, sweep, flashbwd,
# train, target, final, chunked, breakdown, tune, tunebwd, tunefull, slabconv, bwdtests, suite4096,
# paperbwd, compiled, chunkedB8, proftrain, unmeasured, mixsplits, sweeplong, host, hosttests, quickchunked, toeplitz, batchchunks, mixbwdsplits, session5, suite, session6, session6b, chunkbudget, session7, session7b, session7c, session7d, session8, session9, autothreshold, ncuconv, prefetch, session11, session11b, maxnreg, session11c, session11d, session11e, fusedmixbwd, abtests, mixrows, preconvmatmul, profileab, session12c, session12d, trainab, session13a, session13b, session13c, session13d, session13e, session14a, hostprofile, hostab, session14c, session14d, flashab, thchunks, bf16scores, thbwdab, thprofile, thtune, thchunks2, session15, session16a, session16b, session16c, session16d, session16e, session16f, session17e, session17f, session17g, session18a, session18b, session18c, session18d, session18e, bwdjitter, session19a, session19b, session19c, session19d, session19e, session19g, session20a, session20b, session20c, session20d, session20e, session21a, session21b, session21c, session21d, forwardchunks, ncusource, session10b, session10d, train2, ncu.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
# No installs there: put both packages on the path (mta_reference lives in reference/).
mkdir -p /tmp/site && ln -sfn "$PWD/reference" /tmp/site/mta_reference
export PYTHONPATH="$PWD:/tmp/site:$PWD/tests:$PWD/scripts"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"
# results go to $OUT/results.tgz after every step, so that a call killed at its time limit
# still returns them (a call returns at most 8 files: keep $OUT to logs and the archive)
RES=/tmp/results
# The tree arrives without .git: before the call, `git rev-parse --short HEAD >
# scripts/device_commit` (git-ignored, so name it in the device call's carry list).
export MTA_BENCH_COMMIT=$(cat scripts/device_commit 2>/dev/null || echo unknown)
mkdir -p "$RES"
# the GPU tests of the row-chunked paths and their kernels (abtests, session12c)
SLAB_GPU_TESTS="gradients_gpu or memory or (deterministic and full) or forward_gpu or long_sequence_runs or mix_backward_rows or mix_softmax or mix_rows or pre_conv_matmul"

# full MTA fwd / bwd / fwd+bwd at L=2048 and 4096 in this tree and in every tree under
# branches/ (each labelled with its folder name)
full_ab_trees() {
  for tree in . branches/*; do
    [ -d "$tree" ] || continue
    echo "== full MTA in $tree"
    label=$MTA_BENCH_COMMIT; [ "$tree" = . ] || label=$(basename $tree)
    (cd $tree && MTA_BENCH_COMMIT=$label PYTHONPATH="$PWD:/tmp/site:$PWD/tests:$PWD/scripts" timeout 120 python3 -m bench \
      --shapes sweep --lengths 2048,4096 --ops full --modes fwd,bwd,fwd+bwd \
      --providers fused --no-plots --out "$RES" 2>&1 | grep -E "^\[|status")
  done
}

# $1 (comma-separated ops) fwd / bwd / fwd+bwd at L=4096 in this tree and in every tree under
# branches/ (each labelled with its folder name), alternating over $2 rounds, processes of their own
ops_ab_trees() {
  for round in $(seq "$2"); do
    for tree in . branches/*; do
      [ -d "$tree" ] || continue
      label=$MTA_BENCH_COMMIT; [ "$tree" = . ] || label=$(basename $tree)
      (cd $tree && MTA_BENCH_COMMIT=$label PYTHONPATH="$PWD:/tmp/site:$PWD/tests:$PWD/scripts" timeout 120 python3 -m bench \
        --shapes sweep --lengths 4096 --ops $1 --modes fwd,bwd,fwd+bwd --providers fused --no-plots --out "$RES" 2>&1 \
        | grep -E "^\[" | sed "s|^|$label |")
    done
  done
}

# talking heads in bench processes of their own with the chunked paths off (0) and ${3:-auto},
# alternating over $1 rounds, at the lengths $2 (default 4096)
talking_heads_switch_ab() {
  for round in $(seq "$1"); do
    for mode in 0 ${3:-auto}; do
      MTA_KERNELS_CHUNKED_TALKING_HEADS=$mode timeout 60 python3 -m bench --shapes sweep --lengths ${2:-4096} \
        --ops talking_heads --modes fwd,fwd+bwd --providers fused --no-plots --out "$RES" 2>&1 \
        | grep -E "^\[" | sed "s|^|chunked_talking_heads=$mode |" | tee -a "$OUT/thab.log"
    done
  done
}

# full MTA and each conv alone, fwd / bwd / fwd+bwd at L=2048 and 4096, in this tree and in
# branches/before (results labelled with the old tree's commit, $1)
conv_parts_ab() {
  for tree in . branches/before; do
    [ -d "$tree" ] || continue
    echo "== conv parts in $tree"
    label=$MTA_BENCH_COMMIT; [ "$tree" = . ] || label=$1
    (cd $tree && MTA_BENCH_COMMIT=$label PYTHONPATH="$PWD:/tmp/site:$PWD/tests:$PWD/scripts" timeout 150 python3 -m bench \
      --shapes sweep --lengths 2048,4096 --ops full,pre_conv,post_conv --modes fwd,bwd,fwd+bwd \
      --providers fused --no-plots --out "$RES" 2>&1 | grep -E "^\[|status")
  done
}

for step in "$@"; do
  case "$step" in
    smoke) timeout 300 python3 scripts/gpu_smoke.py 2>&1 | tee "$OUT/smoke.log" ;;
    gputests) timeout 400 python3 -m pytest tests -m gpu -q -rA 2>&1 | tee "$OUT/gputests.log" | grep -E "PASS|FAIL|ERROR|passed|failed" ;;
    quick) timeout 400 python3 -m bench --quick --providers fused,naive,sdpa --out "$RES" 2>&1 | tee "$OUT/quick.log" | tail -30 ;;
    sweep) timeout 500 python3 -m bench --shapes sweep --lengths 1024,4096,16384,32768 --ops full,talking_heads,none \
             --modes fwd --providers fused,naive,sdpa --out "$RES" 2>&1 | tee "$OUT/sweep.log" | tail -30 ;;
    flashbwd) timeout 200 python3 -m pytest tests/test_backward.py -m gpu -q -k flash 2>&1 | tee "$OUT/flashbwd.log" | tail -3
              timeout 200 python3 -m bench --ops none --modes fwd+bwd --providers fused,naive,sdpa --shapes sweep \
                --lengths 4096,16384 --no-plots --out "$RES" 2>&1 | tee "$OUT/flashbwd_bench.log" | grep -E "^\[|status" ;;
    train) timeout ${TRAIN_TIMEOUT:-540} python3 -m bench.train --out "$RES" 2>&1 | tee "$OUT/train.log" | tail -20 ;;
    target) timeout 400 python3 -m bench --shapes sweep --lengths 4096 --ops full,talking_heads,none \
             --modes fwd,fwd+bwd --providers fused,naive,sdpa --out "$RES" 2>&1 | tee "$OUT/target.log" | tail -45 ;;
    chunked) timeout 300 python3 scripts/profile_chunked.py 2>&1 | tee "$OUT/chunked.log" | tail -30 ;;
    chunkedB8) timeout 200 python3 scripts/profile_chunked.py 8 2048 128 2>&1 | tee "$OUT/chunked_b8.log" | tail -30 ;;
    proftrain) timeout 200 python3 scripts/profile_train.py 2>&1 | tee "$OUT/profile_train.log" | tail -40 ;;
    final) timeout 150 python3 -m pytest tests/test_backward.py -q -rA -k "opcheck or compiled or determin" 2>&1 \
             | tee "$OUT/final_tests.log" | grep -E "PASS|FAIL|passed|failed"
           timeout 150 python3 -m bench --shapes paper --ops full,talking_heads,none --modes fwd \
             --providers fused,naive,sdpa --out "$RES" 2>&1 | tee "$OUT/paper.log" | grep -E "^\[|wrote" ;;
    breakdown) timeout 300 python3 scripts/breakdown.py 2>&1 | tee "$OUT/breakdown.log" ;;
    tune) timeout 300 python3 scripts/tune.py 2>&1 | tee "$OUT/tune.log" ;;
    tunebwd) timeout 300 python3 scripts/tune.py flashbwd mixbwd 2>&1 | tee "$OUT/tune_bwd.log" ;;
    tunefull) timeout 300 python3 scripts/tune.py full 2>&1 | tee "$OUT/tune_full.log" ;;
    suite4096) timeout 230 python3 -m bench --shapes sweep --lengths 4096 --ops all --modes all \
             --providers fused,naive,sdpa --out "$RES" 2>&1 | tee "$OUT/suite4096.log" | grep -E "^\[|wrote|status" ;;
    paperbwd) timeout 130 python3 -m bench --shapes paper --ops full,talking_heads,none --modes fwd+bwd \
             --providers fused,naive,sdpa --out "$RES" 2>&1 | tee "$OUT/paperbwd.log" | grep -E "^\[|wrote|status" ;;
    compiled) timeout 100 python3 -m bench --shapes sweep --lengths 4096 --ops full,none --modes fwd,fwd+bwd \
             --providers naive-compiled --no-plots --out "$RES" 2>&1 | tee "$OUT/compiled.log" | grep -E "^\[|wrote|status" ;;
    unmeasured) # what landed after session 4's device time: causal chunked-backward slabs stop at hi
             timeout 200 python3 -m pytest tests/test_backward.py -m gpu -q -rA -k "gradients_gpu or memory or (deterministic and full)" 2>&1 \
               | tee "$OUT/unmeasured_tests.log" | grep -E "FAIL|ERROR|passed|failed"
             timeout 300 python3 -m bench --shapes sweep --lengths 2048,4096,8192 --ops full,pre_conv,post_conv \
               --modes bwd,fwd+bwd --providers fused --out "$RES" 2>&1 | tee "$OUT/unmeasured.log" | grep -E "^\[|status" ;;
    mixsplits) # talking-heads forward key splits (short grids): GPU tests, split counts, bench
             timeout 200 python3 -m pytest tests/test_forward.py tests/test_backward.py -m gpu -q -rA -k "(mix or talking) and not conv" 2>&1 \
               | tee "$OUT/mixsplits_tests.log" | grep -E "FAIL|ERROR|passed|failed"
             timeout 120 python3 scripts/tune.py mixsplits 2>&1 | tee "$OUT/tune_mixsplits.log"
             timeout 200 python3 -m bench --shapes sweep --lengths 2048,4096 --ops talking_heads,pre_mix,post_mix,none \
               --modes fwd,fwd+bwd --providers fused,sdpa --out "$RES" 2>&1 | tee "$OUT/mixsplits.log" | grep -E "^\[|status" ;;
    sweeplong) # the sweep L=512..65536 of full MTA, talking heads and plain attention in every mode;
             # continue a cut-off run with: python3 -m bench ... --resume CSV (same flags)
             timeout ${SWEEP_TIMEOUT:-540} python3 -m bench --shapes sweep --ops full,talking_heads,none --modes fwd,bwd,fwd+bwd \
               --providers fused,naive,sdpa --out "$RES" ${SWEEP_RESUME:+--resume "$SWEEP_RESUME"} 2>&1 \
               | tee "$OUT/sweeplong.log" | grep -E "^\[|status|wrote" ;;
    toeplitz) # host-built Toeplitz matrices in the slab convs and the general forward kernel
             timeout 240 python3 -m pytest tests/test_forward.py tests/test_backward.py -m gpu -q -rA \
               -k "(forward_gpu and conv) or longest or gradients_gpu and conv or (deterministic and full)" 2>&1 \
               | tee "$OUT/toeplitz_tests.log" | grep -E "FAIL|ERROR|passed|failed"
             timeout 200 python3 scripts/tune.py slabconv 2>&1 | tee "$OUT/tune_slabconv.log"
             timeout 200 python3 -m bench --shapes sweep --lengths 2048,4096 --ops full,pre_conv,post_conv \
               --modes fwd,bwd --providers fused --out "$RES" 2>&1 | tee "$OUT/toeplitz.log" | grep -E "^\[|status" ;;
    batchchunks) # the chunked backward one batch element at a time; slab conv configs
             timeout 200 python3 -m pytest tests/test_backward.py -m gpu -q -rA -k "gradients_gpu and conv or memory" 2>&1 \
               | tee "$OUT/batchchunks_tests.log" | grep -E "FAIL|ERROR|passed|failed"
             timeout 150 python3 scripts/tune.py slabconv 2>&1 | tee "$OUT/tune_slabconv.log"
             timeout 200 python3 -m bench --shapes paper --ops full --modes bwd,fwd+bwd --providers fused \
               --out "$RES" 2>&1 | tee "$OUT/batchchunks.log" | grep -E "^\[|status" ;;
    mixbwdsplits) timeout 200 python3 scripts/tune.py mixbwdsplits 2>&1 | tee "$OUT/tune_mixbwdsplits.log" ;;
    session5) # GPU tests of what session 5 changed, then L=4096 every mode and the paper layers
             timeout 200 python3 -m pytest tests/test_backward.py -m gpu -q -rA \
               -k "gradients_gpu or fused_mix_backward_gpu or deterministic" 2>&1 \
               | tee "$OUT/session5_tests.log" | grep -E "FAIL|ERROR|passed|failed"
             timeout 220 python3 -m bench --shapes sweep --lengths 4096 --ops full,talking_heads,none \
               --modes fwd,bwd,fwd+bwd --providers fused,naive,sdpa --out "$RES" 2>&1 \
               | tee "$OUT/session5_target.log" | grep -E "^\[|status"
             timeout 150 python3 -m bench --shapes paper --ops full,talking_heads,none --modes fwd+bwd \
               --providers fused,naive,sdpa --out "$RES" 2>&1 | tee "$OUT/session5_paper.log" | grep -E "^\[|status" ;;
    suite) # continue the default suite in the committed CSV (SUITE_CSV), stopping cleanly (SIGINT:
             # the summary and plots are written) after SUITE_TIMEOUT seconds; the CSV, md and
             # plots come back in $OUT/suite.tgz
             csv=${SUITE_CSV:-bench/results/2026-11-29_011454_NVIDIA-H200.csv}
             timeout -s INT ${SUITE_TIMEOUT:-480} python3 -m bench --resume "$csv" > "$OUT/suite.log" 2>&1
             grep -E "status counts|interrupted" "$OUT/suite.log"
             # an interrupt has once ended the run without its summary: always rewrite it
             timeout 60 python3 -m bench.report "$csv" > /dev/null 2>&1
             tar czf "$OUT/suite.tgz" "${csv%.csv}".* "${csv%.csv}"_*.png ;;
    session6) # first call of session 6: what landed after session 5's device time (4859498:
             # slabs at least one conv tile tall at long L, no gradient copy at B=1; the backward
             # computing only what is asked for), then the long-L backward and frozen inputs
             timeout 200 python3 -m pytest tests/test_backward.py -m gpu -q -rA -s \
               -k "gradients_gpu or fused_mix_backward_gpu or memory or (deterministic and full)" 2>&1 \
               | tee "$OUT/session6_tests.log" | grep -E "FAIL|ERROR|passed|failed|L=32768"
             timeout 150 python3 scripts/frozen_weights.py 2>&1 | tee "$OUT/frozen_weights.log"
             timeout 200 python3 -m bench --shapes sweep --lengths 32768,65536 --ops full --modes fwd+bwd \
               --providers fused --out "$RES" 2>&1 | tee "$OUT/session6_long.log" | grep -E "^\[|status" ;;
    session6b) # after merging exp/wgrad-gather and exp/inplace-mix: conv gradients and full-MTA
             # determinism, the general kernel's configs with in-place mixing, L=4096 every mode, training
             timeout 150 python3 -m pytest tests/test_backward.py -m gpu -q -rA -k "gradients_gpu and conv or (deterministic and full)" 2>&1 \
               | tee "$OUT/session6b_tests.log" | grep -E "FAIL|ERROR|passed|failed"
             timeout 100 python3 scripts/tune.py full 2>&1 | tee "$OUT/tune_full.log" | grep full
             timeout 200 python3 -m bench --shapes sweep --lengths 4096 --ops full,talking_heads,none \
               --modes fwd,bwd,fwd+bwd --providers fused,naive,sdpa --out "$RES" 2>&1 \
               | tee "$OUT/session6b_target.log" | grep -E "^\[|status"
             TRAIN_TIMEOUT=150 bash "$0" train ;;
    chunkbudget) # the chunked backward's working-set budget (MTA_KERNELS_CHUNK_BYTES): training
             # step and full MTA backward at L=4096 with 1, 2 and 4 GiB
             for gib in 1 2 4; do
               export MTA_KERNELS_CHUNK_BYTES=$((gib << 30)); echo "== budget $gib GiB"
               timeout 100 python3 -m bench.train --providers baseline,fused --out "$RES" 2>&1 \
                 | tee "$OUT/chunkbudget_train_$gib.log" | grep -E "^\[|tokens/s \|"
               timeout 60 python3 -m bench --shapes sweep --lengths 4096 --ops full --modes bwd --providers fused \
                 --no-plots --out /tmp/chunkbudget 2>&1 | grep -E "^\["
             done
             unset MTA_KERNELS_CHUNK_BYTES ;;
    session7) # the row-chunked forward (MTA_KERNELS_CHUNKED_FORWARD=1) against the fused one, its GPU
             # tests, and, if branches/mixbwd holds a copy of branch exp/mixbwd-dim-chunks (git archive),
             # the talking-heads backward at D=96 there and here
             for on in 0 1; do
               echo "== MTA_KERNELS_CHUNKED_FORWARD=$on"
               MTA_KERNELS_CHUNKED_FORWARD=$on timeout 200 python3 -m bench --shapes sweep --lengths 2048,4096,8192 \
                 --ops full,pre_conv,post_conv --modes fwd,fwd+bwd --providers fused --no-plots --out "$RES" 2>&1 \
                 | tee "$OUT/chunkedfwd_$on.log" | grep -E "^\[|status"
               MTA_KERNELS_CHUNKED_FORWARD=$on timeout 100 python3 -m bench --shapes paper --ops full --modes fwd,fwd+bwd \
                 --providers fused --no-plots --out "$RES" 2>&1 | tee -a "$OUT/chunkedfwd_$on.log" | grep -E "^\[|status"
             done
             MTA_KERNELS_CHUNKED_FORWARD=1 timeout 200 python3 -m pytest tests/test_forward.py -q -rA \
               -k "chunked or (gpu and conv) or longest or long_sequence" 2>&1 | tee "$OUT/chunkedfwd_tests.log" \
               | grep -E "FAIL|ERROR|passed|failed"
             if [ -d branches/mixbwd ]; then
               for tree in . branches/mixbwd; do
                 echo "== talking heads at D=96 in $tree"
                 (cd $tree && PYTHONPATH="$PWD:/tmp/site:$PWD/tests:$PWD/scripts" timeout 100 python3 -m bench \
                   --shapes paper --ops talking_heads --modes bwd,fwd+bwd --providers fused --no-plots --out /tmp/mixbwd 2>&1 \
                   | grep -E "^\[|status")
               done
               (cd branches/mixbwd && PYTHONPATH="$PWD:/tmp/site:$PWD/tests:$PWD/scripts" timeout 150 python3 -m pytest \
                 tests/test_backward.py -m gpu -q -k "fused_mix_backward_gpu or (deterministic and not full)" 2>&1 | tail -1)
             fi ;;
    session7b) # the chunked forward chosen by 'auto' (fewer general-kernel row blocks than SMs):
             # training in three rounds (no reference provider, to fit), the forward GPU tests, and
             # full MTA at L=2048..8192 where auto picks the chunked path below L~7000
             timeout 330 python3 -m bench.train --providers baseline,fused --out "$RES" 2>&1 | tee "$OUT/train.log" | tail -12
             timeout 200 python3 -m pytest tests/test_forward.py -q -rA -k "gpu or chunked or long" 2>&1 \
               | tee "$OUT/fwdtests.log" | grep -E "FAIL|ERROR|passed|failed"
             timeout 100 python3 -m bench --shapes sweep --lengths 2048,4096,8192 --ops full --modes fwd,fwd+bwd \
               --providers fused,sdpa --no-plots --out "$RES" 2>&1 | tee "$OUT/auto.log" | grep -E "^\[|status" ;;
    session7c) # after the autocast fix: training in three rounds, the autocast tests on the GPU
             timeout 330 python3 -m bench.train --providers baseline,fused --out "$RES" 2>&1 | tee "$OUT/train.log" | tail -12
             timeout 100 python3 -m pytest tests/test_backward.py -q -rA -k "autocast" 2>&1 | grep -E "FAIL|ERROR|passed|failed" ;;
    session7d) # the leaner chunked forward (no masking passes, softmax and lse in place, 3 live slabs):
             # against the general kernel in one run, then the forward GPU tests with convs (auto)
             for on in 1 0; do
               MTA_KERNELS_CHUNKED_FORWARD=$on timeout 60 python3 -m bench --shapes sweep --lengths 2048,4096,8192 \
                 --ops full --modes fwd --providers fused --no-plots --out "$RES" 2>&1 | tee -a "$OUT/lean.log" | grep -E "^\[|status"
               MTA_KERNELS_CHUNKED_FORWARD=$on timeout 60 python3 -m bench --shapes paper --ops full --modes fwd \
                 --providers fused --no-plots --out "$RES" 2>&1 | tee -a "$OUT/lean.log" | grep -E "^\[|status"
             done
             timeout 100 python3 -m pytest tests/test_forward.py -m gpu -q -rA -k "conv" 2>&1 | tee "$OUT/lean_tests.log" \
               | grep -E "FAIL|ERROR|passed|failed" ;;
    session8) # what session 7 left untimed (dec1ac5 slab_forward in the backward, 5e7605d aligned keys,
             # 3953e48 6 live slabs): against the tree in branches/before (`git archive dc86656 |
             # tar -x -C branches/before`), then the GPU gradient and memory tests; `train2` next
             conv_parts_ab dc86656
             timeout 200 python3 -m pytest tests/test_backward.py -q -rA -s -k "gradients_gpu or autocast or memory or (deterministic and full)" \
               2>&1 | tee "$OUT/session8_tests.log" | grep -E "GiB|FAIL|ERROR|passed|failed" ;;
    session9) # the slab softmax kernel and unmasked s0 slabs: against branches/before (`git archive
             # 71831b1 | tar -x -C branches/before`), the GPU tests of both chunked paths, training
             conv_parts_ab 71831b1
             timeout 150 python3 -m pytest tests/test_backward.py -q -rA -s \
               -k "slab_softmax or gradients_gpu or memory or (deterministic and full)" \
               2>&1 | tee "$OUT/session9_tests.log" | grep -E "GiB|FAIL|ERROR|passed|failed"
             timeout 150 python3 -m pytest tests/test_forward.py -q -rA -s -k "forward_gpu or chunked or long_sequence_runs" \
               2>&1 | tee -a "$OUT/session9_tests.log" | grep -E "GiB|FAIL|ERROR|passed|failed"
             timeout 150 python3 -m bench.train --providers baseline,fused --out "$RES" 2>&1 | tee "$OUT/train.log" | tail -8 ;;
    autothreshold) # where the row-chunked forward (1) beats the general kernel (0) since the slab
             # softmax kernel: full MTA fwd at B=1 for L=8192 and 16384, and the paper's B=8 layers
             for m in 0 1; do
               echo "== MTA_KERNELS_CHUNKED_FORWARD=$m"
               MTA_KERNELS_CHUNKED_FORWARD=$m timeout 150 python3 -m bench --shapes all --lengths 8192,16384 \
                 --ops full --modes fwd --providers fused --no-plots --out "$RES" 2>&1 | grep -E "^\[|status"
             done ;;
    session10b) # slab conv loads vectorized (the causal zeros selected after the load): against
             # branches/before (`git archive 6e1eb9f | tar -x -C branches/before`), then the tile sweep
             conv_parts_ab 6e1eb9f
             timeout 200 python3 scripts/tune.py slabconv 2>&1 | tee "$OUT/tune_slabconv.log" | grep "slab conv" ;;
    session10d) # the session's slab conv changes together (vectorized loads, 64x32 conv tiles, 32-row
             # weight-gradient tiles) against the session's start (branches/before: `git archive
             # 6e1eb9f | tar -x -C branches/before`), the GPU tests of both chunked paths, the L=4096
             # targets and training
             conv_parts_ab 6e1eb9f
             timeout 200 python3 -m pytest tests/test_backward.py tests/test_forward.py -q -rA -s \
               -k "gradients_gpu or memory or (deterministic and full) or forward_gpu or long_sequence_runs" \
               2>&1 | tee "$OUT/session10d_tests.log" | grep -E "GiB|FAIL|ERROR|passed|failed"
             timeout 300 python3 -m bench --shapes sweep --lengths 4096 --ops full,talking_heads,none \
               --modes fwd,fwd+bwd --providers fused,naive,sdpa --out "$RES" 2>&1 | tee "$OUT/target.log" | tail -25
             timeout 300 python3 -m bench.train --providers baseline,fused --out "$RES" 2>&1 | tee "$OUT/train.log" | tail -8 ;;
    session10f) # the slab conv loop over query offsets unrolled and/or pipelined: the tile sweep,
             # then full MTA on the whole path with the candidates
             timeout 150 python3 scripts/tune.py slabconv 2>&1 | tee "$OUT/tune_slabconv.log" | grep "slab conv {'BR': .., 'BC'"
             for cfg in 64,32,4,1,1 64,32,4,2,1 64,32,4,1,6; do
               timeout 60 python3 scripts/bench_conv_config.py $cfg -- --shapes sweep --lengths 4096 --ops full \
                 --modes fwd,bwd --providers fused --no-plots --out "$RES" 2>&1 | grep -E "CONV_CONFIG|^\["
             done ;;
    ncuconv) # one slab conv launch of the chunked full-MTA forward at L=4096 (the 5th), every ncu section
             timeout 300 ncu --clock-control none --set full -k regex:kq_conv_kernel --launch-skip 4 --launch-count 1 \
               python3 scripts/profile_one.py full > "$OUT/ncu_conv.txt" 2>&1; grep -E "Duration|Registers|Theoretical Occ|Achieved Occ|Stall|Throughput|Issue|Eligible" "$OUT/ncu_conv.txt" | head -60 ;;
    prefetch) # the slab conv kernels' loads issued one loop iteration ahead (PREFETCH, a051b41): the
             # per-slab sweep, then full MTA on the whole path with each kernel's prefetch off / on
             timeout 200 python3 scripts/tune.py slabconv 2>&1 | tee "$OUT/tune_slabconv.log" | grep "slab conv"
             for cfg in "conv.prefetch=0 wgrad.prefetch=0" "conv.prefetch=1 wgrad.prefetch=0" \
                        "conv.prefetch=0 wgrad.prefetch=1" "conv.prefetch=1 wgrad.prefetch=1"; do
               timeout 90 python3 scripts/bench_conv_config.py $cfg -- --shapes sweep --lengths 2048,4096 --ops full \
                 --modes fwd,bwd --providers fused --no-plots --out "$RES" 2>&1 | grep -E "CONV_CONFIG|^\["
             done ;;
    session11) # the weight-gradient kernel with both tile loads issued before the transpose, against
             # branches/before (`git archive 5ad5845 | tar -x -C branches/before`); the per-slab sweep;
             # the GPU tests of both chunked paths; the L=4096 targets; training; last, the 64x32 conv
             # with 8 warps alone (it hit an illegal address with PREFETCH in the previous step)
             conv_parts_ab 5ad5845
             timeout 150 python3 scripts/tune.py slabconv 2>&1 | tee "$OUT/tune_slabconv.log" | grep "slab conv"
             timeout 200 python3 -m pytest tests/test_backward.py tests/test_forward.py -q -rA -s \
               -k "gradients_gpu or memory or (deterministic and full) or forward_gpu or long_sequence_runs" \
               2>&1 | tee "$OUT/session11_tests.log" | grep -E "GiB|FAIL|ERROR|passed|failed"
             timeout 200 python3 -m bench --shapes sweep --lengths 4096 --ops full,talking_heads,none \
               --modes fwd,fwd+bwd --providers fused,naive,sdpa --out "$RES" 2>&1 | tee "$OUT/target.log" | grep -E "^\[|status"
             timeout 150 python3 -m bench.train --providers baseline,fused --out "$RES" 2>&1 | tee "$OUT/train.log" | tail -8
             timeout 60 python3 scripts/bench_conv_config.py conv.num_warps=8 -- --shapes sweep --lengths 2048 \
               --ops pre_conv --modes fwd,bwd --providers fused --no-plots --out /tmp/warps8 2>&1 | grep -E "CONV_CONFIG|^\[|Error" ;;
    session11b) # the profile of both chunked paths at this commit; plain attention fwd+bwd against SDPA three
             # times (one run gave 0.96 ms [0.82, 1.05]); the weight-gradient kernel at 64 rows or 32
             # tiles per program on the whole path (0.164 against 0.167 ms per slab)
             timeout 200 python3 scripts/profile_chunked.py 2>&1 | tee "$OUT/chunked.log" | grep -E "ms$"
             for i in 1 2 3; do
               timeout 60 python3 -m bench --shapes sweep --lengths 4096 --ops none --modes fwd,bwd,fwd+bwd \
                 --providers fused,sdpa --no-plots --out "$RES" 2>&1 | grep -E "^\["
             done
             for cfg in "wgrad.BR=32" "wgrad.BR=64" "wgrad.TILES=32"; do
               timeout 60 python3 scripts/bench_conv_config.py $cfg -- --shapes sweep --lengths 2048,4096 --ops full \
                 --modes bwd --providers fused --no-plots --out "$RES" 2>&1 | grep -E "CONV_CONFIG|^\["
             done ;;
    maxnreg) # the slab conv kernels with a register cap (more programs per SM; small spills): the per-slab
             # sweep, then full MTA on the whole path with the conv capped at 96 and 80 registers
             timeout 150 python3 scripts/tune.py slabconv 2>&1 | tee "$OUT/tune_slabconv.log" | grep "slab conv"
             for cfg in "conv.BR=64" "conv.maxnreg=96" "conv.maxnreg=80"; do
               timeout 60 python3 scripts/bench_conv_config.py $cfg -- --shapes sweep --lengths 2048,4096 --ops full \
                 --modes fwd,bwd --providers fused --no-plots --out "$RES" 2>&1 | grep -E "CONV_CONFIG|^\["
             done ;;
    session11c) # the pre mix and the softmax as one kernel in the row-chunked paths, against branches/before
             # (`git archive 2e57d89 | tar -x -C branches/before`); the GPU tests of both chunked paths;
             # full MTA at L=4096 with SDPA
             conv_parts_ab 2e57d89
             timeout 200 python3 -m pytest tests/test_backward.py tests/test_forward.py -q -rA -s \
               -k "gradients_gpu or memory or (deterministic and full) or forward_gpu or long_sequence_runs or mix_softmax" \
               2>&1 | tee "$OUT/session11c_tests.log" | grep -E "GiB|FAIL|ERROR|passed|failed"
             timeout 100 python3 -m bench --shapes sweep --lengths 4096 --ops full --modes fwd,fwd+bwd \
               --providers fused,sdpa --no-plots --out "$RES" 2>&1 | grep -E "^\[|status" ;;
    session11d) # the fused mix-softmax kernel's block and warps; the weight-gradient kernel at 64 rows with a
             # 96-register cap on the whole path (0.154 against 0.165 ms per slab)
             timeout 100 python3 scripts/tune.py mixsoftmax 2>&1 | tee "$OUT/tune_mixsoftmax.log" | grep "mix softmax"
             for cfg in "wgrad.BR=32" "wgrad.BR=64 wgrad.maxnreg=96"; do
               timeout 60 python3 scripts/bench_conv_config.py $cfg -- --shapes sweep --lengths 2048,4096 --ops full \
                 --modes bwd --providers fused --no-plots --out "$RES" 2>&1 | grep -E "CONV_CONFIG|^\["
             done ;;
    session11e) # the session's last defaults (mix-softmax 2048 elements / 4 warps, weight gradient 64 rows at
             # 96 registers): the GPU tests of both chunked paths, full MTA and SDPA at L=2048 and 4096
             timeout 200 python3 -m pytest tests/test_backward.py tests/test_forward.py -q -rA -s \
               -k "gradients_gpu or memory or (deterministic and full) or forward_gpu or long_sequence_runs or mix_softmax" \
               2>&1 | tee "$OUT/session11e_tests.log" | grep -E "GiB|FAIL|ERROR|passed|failed"
             timeout 120 python3 -m bench --shapes sweep --lengths 2048,4096 --ops full --modes fwd,bwd,fwd+bwd \
               --providers fused,sdpa --no-plots --out "$RES" 2>&1 | grep -E "^\[|status" ;;
    abtests) # this tree against each tree under branches/ (full MTA; `git archive REF | tar -x -C
             # branches/NAME`), then this tree's GPU tests of the chunked paths and their kernels
             full_ab_trees
             timeout 250 python3 -m pytest tests/test_backward.py tests/test_forward.py -q -rA -s \
               -k "$SLAB_GPU_TESTS" \
               2>&1 | tee "$OUT/abtests.log" | grep -E "GiB|FAIL|ERROR|passed|failed" ;;
    preconvmatmul) timeout 150 python3 scripts/tune.py preconvmatmul 2>&1 | tee "$OUT/tune_preconvmatmul.log" | grep "pre conv matmul" ;;
    mixrows) timeout 100 python3 scripts/tune.py mixrows 2>&1 | tee "$OUT/tune_mixrows.log" | grep "mix rows" ;;
    profileab) # both chunked paths' kernel profile at L=4096, then full MTA at L=2048 in this tree and
             # in each under branches/ twice over (the L=2048 backward varied 4.35-4.93 ms between calls)
             timeout 200 python3 scripts/profile_chunked.py 2>&1 | tee "$OUT/chunked.log" | grep -E "ms$"
             for round in 1 2; do
               for tree in . branches/*; do
                 label=$MTA_BENCH_COMMIT; [ "$tree" = . ] || label=$(basename $tree)
                 (cd $tree && MTA_BENCH_COMMIT=$label PYTHONPATH="$PWD:/tmp/site:$PWD/tests:$PWD/scripts" timeout 60 python3 -m bench \
                   --shapes sweep --lengths 2048 --ops full --modes fwd,bwd,fwd+bwd --providers fused --no-plots \
                   --out "$RES" 2>&1 | grep -E "^\[" | sed "s|^|$label |")
               done
             done ;;
    session12c) # this tree against branches/*, then the README's targets and training, then the GPU tests
             full_ab_trees
             timeout 150 python3 -m bench --shapes sweep --lengths 4096 --ops full,talking_heads,none \
               --modes fwd,fwd+bwd --providers fused,naive,sdpa --out "$RES" 2>&1 | tee "$OUT/target.log" | grep -E "^\[|wrote"
             tar czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null
             timeout 130 python3 -m bench.train --providers baseline,fused --out "$RES" 2>&1 | tee "$OUT/train.log" | tail -4
             tar czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null
             timeout 200 python3 -m pytest tests/test_backward.py tests/test_forward.py -q -rA -s \
               -k "$SLAB_GPU_TESTS" \
               2>&1 | tee "$OUT/abtests.log" | grep -E "GiB|FAIL|ERROR|passed|failed" ;;
    session12d) # the final tree's forward GPU tests, then the chunked profile with the pre conv matmul
             # switched on in the backward too (measured slower there, not yet explained)
             timeout 170 python3 -m pytest tests/test_forward.py tests/test_backward.py -q -rA -s \
               -k "forward_gpu or pre_conv_matmul or long_sequence_runs or memory" \
               2>&1 | tee "$OUT/final_tests.log" | grep -E "GiB|FAIL|ERROR|passed|failed"
             timeout 90 python3 -c "import runpy, mta_kernels.chunked_backward as b; b.PRE_CONV_MATMUL_IN_BACKWARD = True; \
runpy.run_path('scripts/profile_chunked.py', run_name='__main__')" 2>&1 | tee "$OUT/chunked_bwdmatmul.log" | grep -E "ms$|kernel" | cut -c1-60,150-200 ;;
    trainab) # training with the pre conv matmul off and on (auto), alternating: was it what made the
             # fused step slower at ed2937c (0.528x against 0.60x at a318c3c)? Then the K~ and tile sweep.
             for mode in 0 auto 0 auto; do
               echo "== MTA_KERNELS_PRE_CONV_MATMUL=$mode"
               MTA_KERNELS_PRE_CONV_MATMUL=$mode timeout 130 python3 -m bench.train --providers baseline,fused \
                 --out "$RES" 2>&1 | tee -a "$OUT/trainab.log" | grep -E "round|tokens/s \|"
             done
             timeout 150 python3 scripts/tune.py preconvmatmul 2>&1 | tee "$OUT/tune_preconvmatmul.log" | grep "pre conv matmul" ;;
    session13a) # talking heads through the register kernels and the chunked slabs (checks, then every
             # pairing alternating); full MTA here against branches/*; training with the pre conv
             # matmul off and on (auto)
             timeout 200 python3 scripts/talking_heads_paths.py 2048 4096 8192 2>&1 | tee "$OUT/thpaths.log"
             full_ab_trees 2>&1 | tee "$OUT/abtrees.log"
             tar czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null
             for mode in 0 auto; do
               echo "== MTA_KERNELS_PRE_CONV_MATMUL=$mode"
               MTA_KERNELS_PRE_CONV_MATMUL=$mode timeout 130 python3 -m bench.train --providers baseline,fused \
                 --out "$RES" 2>&1 | tee -a "$OUT/trainab.log" | grep -E "round|tokens/s \|"
             done ;;
    session13b) # full MTA here (16-bit probabilities into the post conv) against branches/before (fp32
             # ones); talking heads' paths at L=16384; the README's targets; the GPU tests
             full_ab_trees 2>&1 | tee "$OUT/abtrees.log"
             timeout 150 python3 scripts/talking_heads_paths.py 16384 2>&1 | tee "$OUT/thpaths.log" | grep round
             tar czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null
             timeout 150 python3 -m bench --shapes sweep --lengths 4096 --ops full,talking_heads,none \
               --modes fwd,fwd+bwd --providers fused,naive,sdpa --out "$RES" 2>&1 | tee "$OUT/target.log" | grep -E "^\[|wrote"
             tar czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null
             timeout 200 python3 -m pytest tests/test_backward.py tests/test_forward.py -q -rA -s \
               -k "$SLAB_GPU_TESTS or talking_heads or narrower or post_mix" \
               2>&1 | tee "$OUT/tests.log" | grep -E "GiB|FAIL|ERROR|passed|failed" ;;
    session13c) # talking heads in the bench with the chunked paths off (0) and auto, alternating; the
             # README's targets; the GPU tests, stopping at the first failure
             talking_heads_switch_ab 2
             timeout 150 python3 -m bench --shapes sweep --lengths 4096 --ops full,talking_heads,none \
               --modes fwd,fwd+bwd --providers fused,naive,sdpa --out "$RES" 2>&1 | tee "$OUT/target.log" | grep -E "^\[|wrote"
             tar czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null
             timeout 220 python3 -m pytest tests/test_backward.py tests/test_forward.py -x -q -rA -s --tb=short \
               -k "$SLAB_GPU_TESTS or talking_heads or post_mix" \
               2>&1 | tee "$OUT/tests.log" | grep -E "GiB|FAIL|Error|passed|failed" ;;
    session13d) # talking heads' two paths timed as the bench times them, in one process, with host
             # times and the chunked paths' kernels; the GPU tests, stopping at the first failure
             timeout 200 python3 scripts/talking_heads_ab.py 4096 2>&1 | tee "$OUT/thab.log" | grep -E "round|host|warm"
             timeout 260 python3 -m pytest tests/test_backward.py tests/test_forward.py -x -q -rA -s --tb=short \
               -k "$SLAB_GPU_TESTS or talking_heads or post_mix or fused_mix" \
               2>&1 | tee "$OUT/tests.log" | grep -E "GiB|FAIL|Error|passed|failed" ;;
    session16a) # talking heads below L=4096, register kernels (0) against the chunked paths (1), two rounds;
             # then the final tree's GPU-marked tests (session14a)
             talking_heads_switch_ab 2 1024,2048 1
             tar czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null ;&
    session16b) # bf16 slabs in full MTA's chunked forward and backward: their tests on the GPU (the new
             # 16-bit slab tests in bf16, then full MTA's GPU-marked gradients and forward); full MTA at
             # L=2048 and 4096 with MTA_KERNELS_BF16_SLABS 0 and 1 alternating in processes of their own;
             # training (talking heads take the chunked paths at L=2048 now)
             timeout 200 python3 -m pytest tests/test_forward.py tests/test_backward.py -q -rfE --tb=short -x \
               -k "16bit_slabs" 2>&1 | tee "$OUT/tests_slabs16.log" | grep -E "FAIL|Error|passed|failed|rule"
             for round in 1 2; do
               for mode in 0 1; do
                 MTA_KERNELS_BF16_SLABS=$mode timeout 90 python3 -m bench --shapes sweep --lengths 2048,4096 \
                   --ops full --modes fwd,bwd,fwd+bwd --providers fused --no-plots --out "$RES" 2>&1 \
                   | grep -E "^\[" | sed "s|^|bf16_slabs=$mode |" | tee -a "$OUT/bf16slabs.log"
               done
             done
             tar czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null
             timeout 200 python3 -m pytest tests/test_forward.py tests/test_backward.py -m gpu -q -rfE --tb=short \
               -k "(forward_gpu or gradients_gpu or deterministic) and (pre_conv or full)" 2>&1 \
               | tee "$OUT/tests_full.log" | grep -E "FAIL|Error|passed|failed|rule" ;;
    session16c) # full MTA with bf16 slabs under chunk budgets of 1 and 2 GiB (the latter as if the slabs were
             # counted in bf16 bytes), alternating in processes of their own; the chunked paths' kernel
             # profile; the README's targets; training
             for round in 1 2; do
               for bytes in 1073741824 2147483648; do
                 MTA_KERNELS_CHUNK_BYTES=$bytes timeout 60 python3 -m bench --shapes sweep --lengths 4096 \
                   --ops full --modes fwd,bwd,fwd+bwd --providers fused --no-plots --out "$RES" 2>&1 \
                   | grep -E "^\[" | sed "s|^|chunk_bytes=$bytes |" | tee -a "$OUT/chunkbytes.log"
               done
             done
             timeout 100 python3 scripts/profile_chunked.py 2>&1 | tee "$OUT/chunked.log" | tail -3
             timeout 200 python3 -m bench --shapes sweep --lengths 4096 --ops full,talking_heads,none \
               --modes fwd,fwd+bwd --providers fused,naive,sdpa --out "$RES" 2>&1 | tee "$OUT/target.log" | grep -E "^\[|wrote"
             tar czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null
             timeout 150 python3 -m bench.train --providers baseline,fused --out "$RES" 2>&1 | tee "$OUT/train.log" | tail -8
             tar czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null ;;
    session16d) # the slab conv kernels' tiles on bf16 slabs; then the final tree's 16-bit slab tests and full
             # MTA at L=4096 (the chunks counted in the slabs' bytes)
             timeout 200 python3 scripts/tune.py slabconv16 2>&1 | tee "$OUT/tune_slabconv16.log" | grep "slab conv"
             timeout 60 python3 -m bench --shapes sweep --lengths 4096 --ops full --modes fwd,bwd,fwd+bwd \
               --providers fused --no-plots --out "$RES" 2>&1 | grep -E "^\[" | tee -a "$OUT/full.log"
             tar czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null ;;
    session16e) # the slab conv as one dot per query offset: its tiles on bf16 and fp32 slabs, then full MTA
             # against branches/before (three dots per offset) at L=2048 and 4096, two rounds
             timeout 120 python3 scripts/tune.py slabconv16 2>&1 | tee "$OUT/tune_slabconv16.log" | grep "slab conv bf16 {"
             for round in 1 2; do full_ab_trees 2>&1 | tee -a "$OUT/abtrees.log"; done
             tar czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null ;;
    session17e) # the mixes' row kernels on bf16 slabs (tune.py mix16) and the strip conv kernel's committed
             # config against its alternatives; the 16-bit slab tests and every GPU-marked test (session14a)
             timeout 100 python3 scripts/tune.py mix16 2>&1 | tee "$OUT/tune_mix16.log" | grep "mix16"
             timeout 100 python3 scripts/tune.py slabconvtiles 2>&1 | tee "$OUT/tune_slabconvtiles.log" | grep "slab conv strip"
             timeout 300 python3 -m pytest tests/test_forward.py tests/test_backward.py -q -rfE --tb=short -k "16bit" \
               2>&1 | tee "$OUT/tests_16bit.log" | grep -E "FAIL|Error|passed|failed" ;&
    session17f) # the final tree's GPU-marked tests (session14a's)
             timeout 200 python3 -m pytest tests/test_forward.py -m gpu -q -rfE -s --tb=short --durations=8 \
               2>&1 | tee "$OUT/tests_forward.log" | grep -E "GiB|FAIL|Error|passed|failed|s call"
             timeout 200 python3 -m pytest tests/test_backward.py -q -rfE -s --tb=short --durations=8 \
               -m "gpu or not gpu" -k "gpu or memory or skips_unwanted or determin" \
               2>&1 | tee "$OUT/tests_backward.log" | grep -E "GiB|FAIL|Error|passed|failed|s call" ;;
    session17g) # the README's targets at L=4096, then training (SDPA baseline against fused, three rounds)
             timeout 200 python3 -m bench --shapes sweep --lengths 4096 --ops full,talking_heads,none \
               --modes fwd,fwd+bwd --providers fused,naive,sdpa --out "$RES" 2>&1 | tee "$OUT/target.log" | grep -E "^\[|wrote"
             tar czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null
             timeout 200 python3 -m bench.train --providers baseline,fused --out "$RES" 2>&1 | tee "$OUT/train.log" | tail -8 ;;
    session18b) # the row kernels with vectorized loads (this tree) against branches/before (scalar loads):
             # tune.py rows16 with each tree's kernels, then talking heads and full MTA, two rounds
             timeout 100 python3 scripts/tune.py rows16 2>&1 | tee "$OUT/tune_rows16.log" | grep "rows16"
             for tree in branches/*; do
               PYTHONPATH="$PWD/$tree:/tmp/site:$PWD/tests:$PWD/scripts" timeout 100 python3 scripts/tune.py rows16 2>&1 \
                 | grep "rows16" | sed "s|^|$(basename $tree) |" | tee -a "$OUT/tune_rows16.log"
             done
             ops_ab_trees talking_heads,full 2 2>&1 | tee "$OUT/rows_ab.log"
             tar czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null
             # talking heads' forward in 2 chunks (the 1 GiB default) and in 4 (0.5 GiB)
             for round in 1 2; do
               for bytes in 1073741824 536870912; do
                 MTA_KERNELS_CHUNK_BYTES=$bytes timeout 60 python3 -m bench --shapes sweep --lengths 4096 \
                   --ops talking_heads --modes fwd,fwd+bwd --providers fused --no-plots --out "$RES" 2>&1 \
                   | grep -E "^\[" | sed "s|^|chunk_bytes=$bytes |" | tee -a "$OUT/thchunks.log"
               done
             done ;;
    session18c) # the final tree's tests on the GPU: the GPU-marked forward and backward tests (session17f's),
             # the row kernels' tests (vectorized loads), then the 16-bit slab tests
             timeout 150 python3 -m pytest tests/test_forward.py -m gpu -q -rfE -s --tb=short --durations=5 \
               2>&1 | tee "$OUT/tests_forward.log" | grep -E "GiB|FAIL|Error|passed|failed|s call"
             timeout 170 python3 -m pytest tests/test_backward.py -q -rfE -s --tb=short --durations=5 \
               -m "gpu or not gpu" -k "gpu or memory or skips_unwanted or determin" \
               2>&1 | tee "$OUT/tests_backward.log" | grep -E "GiB|FAIL|Error|passed|failed|s call"
             timeout 80 python3 -m pytest tests/test_backward.py -q -rfE --tb=short -k "slab_softmax or mix_softmax_rows \
               or mix_backward_rows or talking_heads_backward_rows or mix_rows or ignore_what" \
               2>&1 | tee "$OUT/tests_rows.log" | grep -E "FAIL|Error|passed|failed"
             timeout 180 python3 -m pytest tests/test_forward.py tests/test_backward.py -q -rfE --tb=short -k "16bit" \
               2>&1 | tee "$OUT/tests_16bit.log" | grep -E "FAIL|Error|passed|failed" ;;
    session18d) # the 16-bit slab conv tests and the row tests session18c's limits cut (with the GPU's clocks
             # and power sampled), then the README's targets at L=4096 and training
             nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active \
               --format=csv -lms 1000 > "$OUT/smi.csv" 2>&1 &
             timeout 120 python3 -m pytest tests/test_backward.py -q -rfE --tb=line -k "strip_conv_kernel_on_16bit or \
               weight_grad_kernels_on_16bit or mix_rows_matches or ignore_what" \
               2>&1 | tee "$OUT/tests_slabs16.log" | grep -E "FAIL|Error|passed|failed|entries"
             timeout 200 python3 -m bench --shapes sweep --lengths 4096 --ops full,talking_heads,none \
               --modes fwd,fwd+bwd --providers fused,naive,sdpa --out "$RES" 2>&1 | tee "$OUT/target.log" | grep -E "^\[|wrote"
             tar czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null
             timeout 170 python3 -m bench.train --providers baseline,fused --out "$RES" 2>&1 | tee "$OUT/train.log" | tail -8
             tar czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null
             kill %1 2>/dev/null ;;
    session18e) # the 16-bit slab conv tests again (the band's mark fixed), full MTA and talking heads forward
             # in three bench processes of their own, then the README's targets at L=4096
             timeout 90 python3 -m pytest tests/test_backward.py -q -rfE --tb=line -k "strip_conv_kernel_on_16bit" \
               2>&1 | tee "$OUT/tests_slabs16.log" | grep -E "FAIL|Error|passed|failed|entries"
             for round in 1 2 3; do
               timeout 45 python3 -m bench --shapes sweep --lengths 4096 --ops full,talking_heads --modes fwd \
                 --providers fused --no-plots --out "$RES" 2>&1 | grep -E "^\[" | sed "s|^|round $round |" | tee -a "$OUT/fwd_rounds.log"
             done
             timeout 200 python3 -m bench --shapes sweep --lengths 4096 --ops full,talking_heads,none \
               --modes fwd,fwd+bwd --providers fused,naive,sdpa --out "$RES" 2>&1 | tee "$OUT/target.log" | grep -E "^\[|wrote"
             tar czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null ;;
    bwdjitter) # full MTA's and talking heads' fwd+bwd call by call: GPU, issue and wall times, the garbage
             # collector on and off, the caching allocator's counters
             timeout 150 python3 scripts/bwd_jitter.py 2>&1 | tee "$OUT/bwd_jitter.log" | grep -v "GPU times" ;;
    session19b) # host against GPU: every op eager and as one replayed CUDA graph (graph_bound.py), the
             # call-by-call issue/GPU times (bwd_jitter.py), then both chunked paths' kernel profiles
             timeout 200 python3 scripts/graph_bound.py 2>&1 | tee "$OUT/graph_bound.log"
             timeout 100 python3 scripts/bwd_jitter.py 2>&1 | grep -v "GPU times" | tee "$OUT/bwd_jitter.log"
             timeout 100 python3 scripts/profile_talking_heads.py 2>&1 | tee "$OUT/thprofile.log" | tail -3
             timeout 150 python3 scripts/profile_chunked.py 2>&1 | tee "$OUT/chunked.log" | tail -3 ;;
    session19c) # (ran at fca19a3: notes/rowsl2_h200_fca19a3.log) the two-sweep row kernels over rows in
             # L2-sized grids, slower at every share (since reverted); talking heads' backward with A from its
             # backward kernel against branches/before (graph_bound in each tree), then the row kernels' tests
             for tree in branches/*; do
               (cd $tree && PYTHONPATH="$PWD:/tmp/site:$PWD/tests:$PWD/scripts" timeout 100 python3 scripts/graph_bound.py \
                 4096 sdpa,talking_heads,full 2>&1 | sed "s|^|$(basename $tree) |") | tee -a "$OUT/graph_ab.log"
             done
             timeout 100 python3 scripts/graph_bound.py 4096 sdpa,talking_heads,full 2>&1 | tee -a "$OUT/graph_ab.log"
             timeout 150 python3 -m pytest tests/test_backward.py -q -rfE --tb=line -k "mix_softmax_rows or \
               mix_backward_rows or talking_heads or mix_rows or row_kernels_ignore" 2>&1 | tee "$OUT/tests_rows.log" \
               | grep -E "FAIL|Error|passed|failed" ;;
    session19d) # the final tree: talking heads' tests on the GPU (forward and backward), the README's targets
             # at L=4096, then graph_bound (eager against a replayed CUDA graph)
             timeout 160 python3 -m pytest tests/test_backward.py tests/test_forward.py -q -rfE --tb=line \
               -k "talking_heads" 2>&1 | tee "$OUT/tests_th.log" | grep -E "FAIL|Error|passed|failed"
             timeout 250 python3 -m bench --shapes sweep --lengths 4096 --ops full,talking_heads,none \
               --modes fwd,fwd+bwd --providers fused,naive,sdpa --out "$RES" 2>&1 | tee "$OUT/target.log" | grep -E "^\[|wrote"
             tar czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null
             timeout 100 python3 scripts/graph_bound.py 4096 sdpa,talking_heads,full 2>&1 | tee "$OUT/graph_bound.log" ;;
    session19e) # bench --cuda-graphs: its GPU test, then the README's targets at L=4096 timed from CUDA graph
             # replays (fused and SDPA), then eager again (fused and SDPA) for the spread between runs
             timeout 120 python3 -m pytest tests/test_bench.py -q -rfE --tb=short -m gpu 2>&1 | tee "$OUT/tests_bench.log" | tail -3
             timeout 200 python3 -m bench --cuda-graphs --shapes sweep --lengths 4096 --ops full,talking_heads,none \
               --modes fwd,fwd+bwd --providers fused,sdpa --out "$RES" 2>&1 | tee "$OUT/target_graphs.log" | grep -E "^\[|wrote"
             tar czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null
             timeout 150 python3 -m bench --shapes sweep --lengths 4096 --ops full,talking_heads,none \
               --modes fwd,fwd+bwd --providers fused,sdpa --out "$RES" 2>&1 | tee "$OUT/target_eager.log" | grep -E "^\[|wrote"
             tar czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null ;;
    session20a) # causal matmuls through tensor descriptors (this tree): talking heads' tests, the
             # kernels against cuBLAS per chunk, the forward with them on and off (graph_bound in
             # processes of their own), and where the mix-softmax kernel's time goes (ncu)
             timeout 150 python3 -m pytest tests/test_backward.py tests/test_forward.py -q -rfE --tb=line \
               -k "talking_heads or chunked_forward_matches or bf16_scores or causality" 2>&1 | tee "$OUT/tests_th.log" \
               | grep -E "FAIL|Error|passed|failed"
             timeout 120 python3 scripts/causal_matmul_tune.py 2>&1 | tee "$OUT/causal_tune.log"
             for round in 1 2; do for mode in 0 auto; do
               MTA_KERNELS_CAUSAL_MATMULS=$mode timeout 60 python3 scripts/graph_bound.py 4096 sdpa,talking_heads 2>&1 \
                 | sed "s|^|causal_matmuls=$mode |" | tee -a "$OUT/graph_bound.log"
             done; done
             timeout 120 ncu --clock-control none --section SpeedOfLight --section WarpStateStats \
               --section InstructionStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
               -k regex:mix_softmax_rows_kernel --launch-skip 2 --launch-count 1 \
               python3 scripts/graph_bound.py 4096 talking_heads > "$OUT/ncu_mixsoftmax.log" 2>&1
             grep -vE "^==PROF==|^ *-+ *$" "$OUT/ncu_mixsoftmax.log" | tail -90 ;;
    session20b) # talking heads' forward variants in one process (scripts/th_forward_variants.py), the
             # forward tests, and the causal pv kernel's configs again (one had given NaN)
             timeout 200 python3 scripts/th_forward_variants.py 2>&1 | tee "$OUT/th_variants.log"
             timeout 100 python3 -m pytest tests/test_forward.py -q -rfE --tb=line -k "talking_heads or bf16_scores" \
               2>&1 | tee "$OUT/tests_th.log" | grep -E "FAIL|Error|passed|failed" ;;
    session20c) # talking heads' forward in one chunk or two (th_forward_variants.py), then the GPU tests
             # of every path the mix-softmax kernel serves, with its new defaults (MIX16, POST16, EXP2,
             # longest rows first), and the targets
             timeout 120 python3 scripts/th_forward_variants.py 2>&1 | tee "$OUT/th_variants.log"
             timeout 150 python3 -m pytest tests/test_backward.py tests/test_forward.py -q -rfE --tb=line \
               -k "talking_heads or bf16_scores or mix_softmax" 2>&1 | tee "$OUT/tests_th.log" | grep -E "FAIL|Error|passed|failed"
             timeout 150 python3 -m pytest tests/test_forward.py -m gpu -q -rfE --tb=line 2>&1 | tee "$OUT/tests_forward.log" \
               | grep -E "FAIL|Error|passed|failed"
             timeout 100 python3 -m bench --shapes sweep --lengths 4096 --ops full,talking_heads,none \
               --modes fwd,fwd+bwd --providers fused,sdpa --out "$RES" 2>&1 | tee "$OUT/target.log" | grep -E "^\[|wrote"
             tar czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null ;;
    session20d) # the causal matmuls' configs on one chunk of L=4096 (scores several key tiles per
             # program), and talking heads' fwd+bwd with the forward in one chunk or two
             timeout 120 python3 scripts/causal_matmul_tune.py one 2>&1 | tee "$OUT/causal_tune_one.log"
             timeout 150 python3 scripts/th_forward_variants.py fwd+bwd 2>&1 | tee "$OUT/th_variants_bwd.log" ;;
    session20e) # the final tree: causal matmul and talking-heads GPU tests, then the targets
             timeout 150 python3 -m pytest tests/test_causal_matmul.py -m gpu -q -rfE --tb=line 2>&1 \
               | tee "$OUT/tests_causal_matmul.log" | grep -E "FAIL|Error|passed|failed"
             timeout 100 python3 -m bench --shapes sweep --lengths 4096 --ops full,talking_heads,none \
               --modes fwd,fwd+bwd --providers fused,sdpa --out "$RES" 2>&1 | tee "$OUT/target.log" | grep -E "^\[|wrote"
             tar czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null
             timeout 210 python3 -m pytest tests/test_backward.py tests/test_forward.py -q -rfE --tb=line \
               -k "talking_heads or bf16_scores or mix_softmax" 2>&1 | tee "$OUT/tests_th.log" | grep -E "FAIL|Error|passed|failed" ;;
    session21d) # CUDA-graph capture and torch.compile(mode="reduce-overhead") over forward and backward (new
             # GPU tests), then training once more (was 0.448x in session21c, 0.498x in session 18)
             timeout 200 python3 -m pytest tests/test_backward.py -m gpu -q -rfE --tb=short -k "cuda_graph or reduce_overhead" \
               2>&1 | tee "$OUT/tests_graphs.log" | grep -E "FAIL|Error|passed|failed"
             timeout 200 python3 -m bench.train --providers baseline,fused --out "$RES" 2>&1 | tee "$OUT/train.log" | tail -8
             tar czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null ;;
    session21c) # the final tree of session 21: graphed targets (GPU time alone), training (baseline and fused,
             # three rounds), and the sweep's fused and SDPA rows at L=1024..16384 for the README
             timeout 120 python3 -m bench --cuda-graphs --shapes sweep --lengths 4096 --ops full,talking_heads,none \
               --modes fwd,fwd+bwd --providers fused,sdpa --no-plots --out "$RES" 2>&1 | tee "$OUT/target_graphed.log" | grep -E "^\[|wrote"
             tar czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null
             timeout 200 python3 -m bench.train --providers baseline,fused --out "$RES" 2>&1 | tee "$OUT/train.log" | tail -8
             tar czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null
             timeout 200 python3 -m bench --shapes sweep --lengths 1024,2048,8192,16384 --ops full,talking_heads,none \
               --modes fwd,fwd+bwd --providers fused,sdpa --out "$RES" 2>&1 | tee "$OUT/sweep.log" | grep -E "^\[|wrote"
             tar czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null ;;
    session21b) # the final tree of session 21: every forward and causal-matmul GPU test (the backward's ran
             # in f2c330e's call), then the targets in three bench processes of their own
             timeout 330 python3 -m pytest tests/test_forward.py tests/test_causal_matmul.py tests/test_bench.py -m gpu \
               -q -rfE --tb=short -s 2>&1 | tee "$OUT/tests_forward.log" | grep -E "FAIL|Error|passed|failed|peak"
             for round in 1 2 3; do
               timeout 100 python3 -m bench --shapes sweep --lengths 4096 --ops full,talking_heads,none \
                 --modes fwd,fwd+bwd --providers fused,sdpa --out "$RES" 2>&1 | tee -a "$OUT/target.log" | grep -E "^\[|wrote"
             done
             tar czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null ;;
    session21a) # (prepared in session 20, not yet run) the final tree of session 20: its backward makes S
             # with the causal kernel (untested on the GPU); every backward GPU test and the talking-heads
             # tests, th_forward_variants (fwd, then fwd+bwd) for graphed times, and the targets
             timeout 200 python3 -m pytest tests/test_backward.py -q -rfE --tb=line -k "talking_heads or fused_mix_backward or gpu" \
               2>&1 | tee "$OUT/tests_backward.log" | grep -E "FAIL|Error|passed|failed"
             timeout 100 python3 scripts/th_forward_variants.py 2>&1 | tee "$OUT/th_variants.log"
             timeout 100 python3 scripts/th_forward_variants.py fwd+bwd 2>&1 | tee "$OUT/th_variants_bwd.log"
             timeout 100 python3 -m bench --shapes sweep --lengths 4096 --ops full,talking_heads,none \
               --modes fwd,fwd+bwd --providers fused,sdpa --out "$RES" 2>&1 | tee "$OUT/target.log" | grep -E "^\[|wrote"
             tar czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null ;;
    session19g) # the final tree (host trims in talking heads' backward, bmm scores in slab_forward): talking
             # heads' tests, the forward GPU tests, the chunked backward's GPU tests, graph_bound, targets
             timeout 130 python3 -m pytest tests/test_backward.py tests/test_forward.py -q -rfE --tb=line \
               -k "talking_heads" 2>&1 | tee "$OUT/tests_th.log" | grep -E "FAIL|Error|passed|failed"
             timeout 120 python3 -m pytest tests/test_forward.py -m gpu -q -rfE --tb=line 2>&1 | tee "$OUT/tests_forward.log" \
               | grep -E "FAIL|Error|passed|failed"
             timeout 110 python3 -m pytest tests/test_backward.py -m gpu -q -rfE --tb=line -k "chunked or gradients_gpu" \
               2>&1 | tee "$OUT/tests_backward.log" | grep -E "FAIL|Error|passed|failed"
             timeout 80 python3 scripts/graph_bound.py 4096 sdpa,talking_heads,full 2>&1 | tee "$OUT/graph_bound.log"
             timeout 100 python3 -m bench --shapes sweep --lengths 4096 --ops full,talking_heads,none \
               --modes fwd,fwd+bwd --providers fused,sdpa --out "$RES" 2>&1 | tee "$OUT/target.log" | grep -E "^\[|wrote"
             tar czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null ;;
    session19a) # (prepared in session 18, not yet run) session 18's host trims (this tree) against
             # branches/before = 6173aeb (`mkdir -p branches/before && git archive 6173aeb | tar -x -C
             # branches/before`, carry "branches"): full MTA and talking heads, two rounds in processes of
             # their own, then bwd_jitter.py in each tree
             ops_ab_trees full,talking_heads 2 2>&1 | tee "$OUT/host_ab.log"
             for tree in . branches/*; do
               (cd $tree && PYTHONPATH="$PWD:/tmp/site:$PWD/tests:$PWD/scripts" timeout 100 python3 scripts/bwd_jitter.py \
                 2>&1 | grep -v "GPU times" | sed "s|^|$(basename $(realpath $tree)) |") | tee -a "$OUT/bwd_jitter.log"
             done
             tar czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null ;;
    session18a) # (prepared in session 17, not yet run) the slab convs of 16-bit slabs on one slab: the
             # strip conv's committed config against alternatives, the weight gradient's transposed-product
             # kernel (WEIGHT_GRAD_STRIP_CONFIG) against the committed one; then full MTA at L=4096 with the
             # weight-gradient strip kernel off / on (TMA, uncapped and at 128 registers), bench processes
             # of their own, two rounds
             timeout 150 python3 scripts/tune.py slabconvtiles 2>&1 | tee "$OUT/tune_slabconvtiles.log" | grep "slab conv"
             for round in 1 2; do
               for cfg in "wgstrip.on=0" "wgstrip.on=1" "wgstrip.on=1 wgstrip.maxnreg=128"; do
                 timeout 100 python3 scripts/bench_conv_config.py $cfg -- --shapes sweep --lengths 4096 \
                   --ops full --modes fwd,bwd,fwd+bwd --providers fused --no-plots --out "$RES" 2>&1 \
                   | grep -E "^\[" | sed "s|^|$cfg |" | tee -a "$OUT/wgstrip_ab.log"
               done
             done
             tar czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null ;;
    session16f) # the final tree: the README's targets, the 16-bit slab tests and every GPU-marked test
             # (session14a's)
             timeout 200 python3 -m bench --shapes sweep --lengths 4096 --ops full,talking_heads,none \
               --modes fwd,fwd+bwd --providers fused,naive,sdpa --out "$RES" 2>&1 | tee "$OUT/target.log" | grep -E "^\[|wrote"
             tar czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null
             timeout 300 python3 -m pytest tests/test_forward.py tests/test_backward.py -q -rfE --tb=short -k "16bit" \
               2>&1 | tee "$OUT/tests_16bit.log" | grep -E "FAIL|Error|passed|failed" ;&
    session14a) # the final tree's GPU-marked tests (forward first: full MTA through band-scores had not
             # run against the reference on the GPU), then the chunked backward's needs test
             timeout 270 python3 -m pytest tests/test_forward.py -m gpu -q -rfE -s --tb=short --durations=8 \
               2>&1 | tee "$OUT/tests_forward.log" | grep -E "GiB|FAIL|Error|passed|failed|s call"
             timeout 280 python3 -m pytest tests/test_backward.py -q -rfE -s --tb=short --durations=8 \
               -m "gpu or not gpu" -k "gpu or memory or skips_unwanted or determin" \
               2>&1 | tee "$OUT/tests_backward.log" | grep -E "GiB|FAIL|Error|passed|failed|s call" ;;
    hostprofile) # host time per call and cProfile of talking heads (chunked) and plain attention
             timeout 200 python3 scripts/host_profile.py 4096 2>&1 | tee "$OUT/host_profile.log" | grep "host time" ;;
    hostab) # host time per call in this tree and in branches/before; talking heads' two paths timed
             # in one process (this tree); full MTA here against branches/*; the GPU tests of the
             # row-chunked backward and the talking-heads paths
             ROOT=$PWD
             for tree in . branches/before; do
               [ -d "$tree" ] || continue
               (cd $tree && PYTHONPATH="$PWD:/tmp/site:$PWD/tests:$PWD/scripts" timeout 60 python3 $ROOT/scripts/host_profile.py 4096 \
                 2>&1 | grep "host time" | sed "s|^|$tree |" | tee -a "$OUT/hostab.log")
             done
             timeout 150 python3 scripts/talking_heads_ab.py 4096 2>&1 | tee "$OUT/thab.log" | grep -E "round|host"
             full_ab_trees 2>&1 | tee "$OUT/abtrees.log"
             tar czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null
             timeout 170 python3 -m pytest tests/test_backward.py tests/test_forward.py -q -rfE --tb=short \
               -k "gradients_gpu or fused_mix or (deterministic) or chunked_talking_heads_gpu or skips or mix_backward_rows" \
               2>&1 | tee "$OUT/tests.log" | grep -E "FAIL|Error|passed|failed" ;;
    session14c) # the README's targets (talking heads chunked from L=4096 now); talking heads in separate
             # bench processes with the chunked paths auto (chunked) and off, alternating; training;
             # the GPU tests of talking heads and the chunked backward
             timeout 150 python3 -m bench --shapes sweep --lengths 4096 --ops full,talking_heads,none \
               --modes fwd,fwd+bwd --providers fused,naive,sdpa --out "$RES" 2>&1 | tee "$OUT/target.log" | grep -E "^\[|wrote"
             tar czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null
             talking_heads_switch_ab 2
             timeout 130 python3 -m bench.train --providers baseline,fused --out "$RES" 2>&1 | tee "$OUT/train.log" | tail -4
             tar czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null
             timeout 170 python3 -m pytest tests/test_backward.py tests/test_forward.py -q -rfE --tb=short \
               -k "talking_heads or pre_mix16-post_mix16 or skips or chunked_talking_heads_gpu or (deterministic and full)" \
               -m gpu 2>&1 | tee "$OUT/tests.log" | grep -E "FAIL|Error|passed|failed" ;;
    session14d) # the final tree: the forward's GPU tests and the backward's of talking heads and full MTA,
             # talking heads with the chunked paths auto and off in separate bench processes, the
             # README's targets
             timeout 150 python3 -m pytest tests/test_forward.py tests/test_backward.py -m gpu -q -rfE --tb=short \
               -k "forward_gpu or talking_heads or pre_mix16-post_mix16 or deterministic or long_sequence_runs" \
               2>&1 | tee "$OUT/tests.log" | grep -E "FAIL|Error|passed|failed"
             talking_heads_switch_ab 1
             timeout 150 python3 -m bench --shapes sweep --lengths 4096 --ops full,talking_heads,none \
               --modes fwd,fwd+bwd --providers fused,naive,sdpa --out "$RES" 2>&1 | tee "$OUT/target.log" | grep -E "^\[|wrote" ;;
    flashab) # the flash backward with unmasked off-diagonal tiles against branches/before, alternating
             # (plain attention at L=4096 and 16384, with SDPA); then its GPU tests
             for round in 1 2; do
               for tree in . branches/before; do
                 label=$MTA_BENCH_COMMIT; [ "$tree" = . ] || label=$(basename $tree)
                 (cd $tree && MTA_BENCH_COMMIT=$label PYTHONPATH="$PWD:/tmp/site:$PWD/tests:$PWD/scripts" timeout 60 python3 -m bench \
                   --shapes sweep --lengths 4096,16384 --ops none --modes fwd,bwd,fwd+bwd --providers fused,sdpa --no-plots \
                   --out "$RES" 2>&1 | grep -E "^\[" | sed "s|^|$label |" | tee -a "$OUT/flashab.log")
               done
             done
             timeout 150 python3 -m pytest tests/test_backward.py -q -rfE --tb=short \
               -k "flash or very_negative or (deterministic and flash) or match_reference" \
               2>&1 | tee "$OUT/tests.log" | grep -E "FAIL|Error|passed|failed" ;;
    bf16scores) # talking heads' forward with bf16 scores (1, the default) against fp32 scores (0), L=4096
             # and 8192, alternating in bench processes of their own; then their GPU tests and the targets
             for round in 1 2 3; do
               for mode in 0 1; do
                 MTA_KERNELS_BF16_SCORES=$mode timeout 60 python3 -m bench --shapes sweep --lengths 4096,8192 \
                   --ops talking_heads --modes fwd,fwd+bwd --providers fused --no-plots --out "$RES" 2>&1 \
                   | grep -E "^\[" | sed "s|^|bf16_scores=$mode |" | tee -a "$OUT/bf16scores.log"
               done
             done
             timeout 200 python3 -m pytest tests/test_forward.py tests/test_backward.py -m gpu -q -rfE --tb=short \
               -k "talking or pre_mix16-post_mix16 or pre_mix10-post_mix10 or long_sequence" 2>&1 | tee "$OUT/tests_th.log" \
               | grep -E "FAIL|Error|passed|failed" ;;
    thbwdab) # talking heads' backward through chunked_talking_heads (this tree) against the generic chunked
             # backward (branches/before), fwd+bwd at L=4096 and 8192, alternating trees, in processes of their own;
             # then the talking-heads GPU tests (gradients at L=4096, determinism of the chunked path)
             for round in 1 2; do
               for tree in . branches/before; do
                 [ -d "$tree" ] || continue
                 (cd $tree && PYTHONPATH="$PWD:/tmp/site:$PWD/tests:$PWD/scripts" timeout 90 python3 -m bench --shapes sweep \
                   --lengths 4096,8192 --ops talking_heads --modes fwd,bwd,fwd+bwd --providers fused --no-plots --out "$RES" 2>&1 \
                   | grep -E "^\[" | sed "s|^|tree=$tree |" | tee -a "$OUT/thbwdab.log")
               done
             done
             timeout 300 python3 -m pytest tests/test_backward.py -m gpu -q -rfE --tb=short \
               -k "talking or pre_mix16-post_mix16 or pre_mix10-post_mix10" 2>&1 | tee "$OUT/tests_thbwd.log" \
               | grep -E "FAIL|Error|passed|failed" ;;
    thprofile) timeout 120 python3 scripts/profile_talking_heads.py 2>&1 | tee "$OUT/thprofile.log" | grep -E "talking heads|kernel|gemm|Kernel|elementwise|reduce" ;;
    thtune) timeout 200 python3 scripts/tune.py thbackward 2>&1 | tee "$OUT/tune_thbackward.log" | grep "talking heads" ;;
    thchunks2) # talking heads with bf16 scores under chunk budgets of 0.5, 1 and 1.5 GiB (forward 2 / 1 / 1
             # chunks, backward 6 / 4 / 2), fwd and bwd, in processes of their own; then out_dtype matmuls
             for bytes in 536870912 1073741824 1610612736 1073741824; do
               MTA_KERNELS_CHUNK_BYTES=$bytes timeout 60 python3 -m bench --shapes sweep --lengths 4096 \
                 --ops talking_heads --modes fwd,bwd --providers fused --no-plots --out "$RES" 2>&1 \
                 | grep -E "^\[" | sed "s|^|chunk_bytes=$bytes |" | tee -a "$OUT/thchunks2.log"
             done
             timeout 60 python3 scripts/bench_out_dtype.py 2>&1 | tee "$OUT/out_dtype.log" ;;
    session15) # talking heads' paths of this tree: their tests on the GPU (the gpu-marked ones and the device
             # ones at small shapes, bf16 matmuls with out_dtype included), one A/B against branches/before
             # (fwd, bwd, fwd+bwd at L=4096 and 8192), then the targets
             timeout 240 python3 -m pytest tests/test_forward.py tests/test_backward.py -q -rfE --tb=short \
               -m "gpu or not gpu" -k "talking or pre_mix16-post_mix16 or pre_mix10-post_mix10 or bf16_scores or mix_softmax or causality" \
               2>&1 | tee "$OUT/tests_session15.log" | grep -E "FAIL|Error|passed|failed"
             for tree in . branches/before; do
               [ -d "$tree" ] || continue
               (cd $tree && PYTHONPATH="$PWD:/tmp/site:$PWD/tests:$PWD/scripts" timeout 90 python3 -m bench --shapes sweep \
                 --lengths 4096,8192 --ops talking_heads --modes fwd,bwd,fwd+bwd --providers fused --no-plots --out "$RES" 2>&1 \
                 | grep -E "^\[" | sed "s|^|tree=$tree |" | tee -a "$OUT/thab15.log")
             done ;;
    thchunks) # talking heads at L=4096 with taller chunks (the budget 1, 1.25 and 1.5 GiB: 7, 5 and 4
             # backward chunks, 4, 3 and 2 forward ones): fewer launches against more causal waste,
             # alternating, in bench processes of their own
             for round in 1 2; do
               for bytes in 1073741824 1342177280 1610612736; do
                 MTA_KERNELS_CHUNK_BYTES=$bytes timeout 60 python3 -m bench --shapes sweep --lengths 4096 \
                   --ops talking_heads --modes fwd,fwd+bwd --providers fused --no-plots --out "$RES" 2>&1 \
                   | grep -E "^\[" | sed "s|^|chunk_bytes=$bytes |" | tee -a "$OUT/thchunks.log"
               done
             done ;;
    session13e) # the final tree: the GPU tests of both chunked paths and the talking-heads paths (not
             # stopping at a failure), then the README's targets
             timeout 250 python3 -m pytest tests/test_backward.py tests/test_forward.py -q -rfE -s --tb=short \
               -k "$SLAB_GPU_TESTS or talking_heads or post_mix or fused_mix or gradcheck" \
               2>&1 | tee "$OUT/tests.log" | grep -E "GiB|FAIL|Error|passed|failed"
             timeout 150 python3 -m bench --shapes sweep --lengths 4096 --ops full,talking_heads,none \
               --modes fwd,fwd+bwd --providers fused,naive,sdpa --out "$RES" 2>&1 | tee "$OUT/target.log" | grep -E "^\[|wrote" ;;
    fusedmixbwd) # branch exp/fused-mix-backward: each head mix's backward with its weight gradient as one
             # kernel (the pre mix's with the softmax's backward), against main (`git archive main |
             # tar -x -C branches/before`); its block sizes; the GPU tests of the backward
             conv_parts_ab main
             timeout 100 python3 scripts/tune.py mixbackward 2>&1 | tee "$OUT/tune_mixbackward.log" | grep "mix backward"
             timeout 200 python3 -m pytest tests/test_backward.py -q -rA -s \
               -k "gradients_gpu or memory or (deterministic and full) or mix_backward_rows or mix_softmax" \
               2>&1 | tee "$OUT/fusedmixbwd_tests.log" | grep -E "GiB|FAIL|ERROR|passed|failed" ;;
    forwardchunks) # the chunked forward's chunk height through its budget: a causal chunk computes
             # all keys up to its last row for every row, so about 1 / (chunks + 1) of its GEMM,
             # mix and softmax work is on the future; smaller chunks waste less but add halo rows
             for bytes in 268435456 536870912 1073741824 2147483648; do
               echo "== MTA_KERNELS_CHUNK_BYTES=$bytes"
               MTA_KERNELS_CHUNK_BYTES=$bytes timeout 100 python3 -m bench --shapes sweep --lengths 2048,4096,8192 \
                 --ops full --modes fwd --providers fused --no-plots --out "$RES" 2>&1 | grep -E "^\[|status"
             done ;;
    ncusource) # where the slab conv and weight-gradient kernels stall, per SASS instruction (one launch
             # each in the chunked full-MTA backward at L=4096); the report itself comes back too
             for kernel in kq_conv_kernel kq_conv_weight_grad_kernel; do
               timeout 200 ncu --clock-control none --set full --import-source yes -k regex:"^$kernel\$" \
                 --launch-skip 8 --launch-count 1 -o "$OUT/$kernel" python3 scripts/profile_chunked.py > "$OUT/ncu_$kernel.log" 2>&1
               ncu --import "$OUT/$kernel.ncu-rep" --page source --csv --print-source sass > "$OUT/${kernel}_sass.csv" 2>&1
               head -c 1500 "$OUT/${kernel}_sass.csv"
             done ;;
    train2) # training, SDPA baseline and fused only, three rounds (about 80 s)
             timeout 300 python3 -m bench.train --providers baseline,fused --out "$RES" 2>&1 | tee "$OUT/train.log" | tail -8 ;;
    quickchunked) timeout 100 python3 scripts/quick_chunked.py 2>&1 | tee "$OUT/quick_chunked.log" ;;
    host) timeout 200 python3 scripts/host_overhead.py 2>&1 | tee "$OUT/host_overhead.log" ;;
    hosttests) timeout 150 python3 -m pytest tests/test_backward.py -q -rA \
                 -k "eager_function or fused_mix_backward_gpu or flash_gradients_gpu or opcheck or compiled or (deterministic and not full)" \
                 2>&1 | tee "$OUT/hosttests.log" | grep -E "FAIL|ERROR|passed|failed" ;;
    slabconv) timeout 200 python3 scripts/tune.py slabconv 2>&1 | tee "$OUT/tune_slabconv.log" ;;
    bwdtests) timeout 300 python3 -m pytest tests/test_backward.py -m gpu -q -rA 2>&1 | tee "$OUT/bwdtests.log" \
                | grep -E "PASS|FAIL|ERROR|passed|failed" ;;
    ncu) timeout 300 ncu --clock-control none --section SpeedOfLight --section Occupancy --section LaunchStats \
             -k regex:mta_ python3 scripts/profile_one.py talking > "$OUT/ncu.txt" 2>&1; tail -60 "$OUT/ncu.txt" ;;
  esac
  tar czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null
done

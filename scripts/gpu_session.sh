#!/usr/bin/env bash
# One batched run on a lent GPU box: build, C++ suite, Python suite, demo, benchmarks, profile.
# Logs and JSON go to $OUT (or ./out) so they come back even when a step fails or the call's time
# runs out. Usage:
#   bash scripts/gpu_session.sh [tests] [demo] [gemm-probe] [autotune-ab] [bench-allreduce] [profile] [sweep]
#                               [chunk-by] [bench-mlp]
# (default: tests demo bench-allreduce bench-mlp). Environment:
#   DEADLINE_S   seconds this script may take in all (default 570); each step gets what is left
#   SWEEP        carve-outs for `sweep`: "S" (S SMs left to NCCL, its collectives beside a GEMM capped
#                at S CTAs) or "S:C" (S SMs, C CTAs); default "0 8 16 32". The best goes to bench-mlp
#   SWEEP_ROUNDS how many times the sweep goes through SWEEP, alternating (default 1); a setting's
#                score is the median over its rounds (bench/sweep_score.py)
#   MLP_ARGS     extra bench/mlp.py arguments
#   GEMM_PROBE_ARGS  arguments of bench/gemm_sustained_probe.cpp (its header lists them)
#   AB_SETTINGS  GEMM autotune settings for `autotune-ab`, "C:S" (C candidates, S ms sustained; 0:0 off);
#                default "0:0 8:50"; AB_ROUNDS rounds through them, alternating (default 2)
#   TPEXT_COMMIT the commit the JSON records, where the copy on the box has no .git (the device
#                tool sends the working tree only): TPEXT_COMMIT=<sha> bash scripts/gpu_session.sh ...
# A device call has ~10 minutes: `tests` takes ~5 of them on 2 GPUs (build included); `demo
# bench-allreduce` fit beside it, `profile sweep chunk-by bench-mlp` in a second call.
set -uo pipefail
OUT=${OUT:-$(pwd)/out}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests demo bench-allreduce bench-mlp)
start=$(date +%s)
deadline=$((start + ${DEADLINE_S:-570}))
left() { echo $(( deadline - $(date +%s) )); }
stamp() { echo "[gpu_session] $1 at +$(( $(date +%s) - start )) s"; }
# The device tool brings back at most 8 files: logs and traces travel as one archive, JSON results
# as themselves, also when an outer `timeout` stops this script part-way.
archive() {
  (cd "$OUT" && files=$(ls *.log *.txt trace-*.json.gz 2>/dev/null || true) && [ -n "$files" ] &&
    tar czf logs.tgz $files && rm -f $files)
  ls -la "$OUT"
}
trap 'archive; exit 124' TERM
has() { for s in "${steps[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }
# A setting "A" or "A:B" (SWEEP's SMs:CTAs, AB_SETTINGS' candidates:ms) into $s and $c (B defaults to A).
parse_setting() { s=${1%%:*}; c=${1#*:}; }

# Wheels the box lacks (megatron-core for the peer bench) travel in .whl/ (see the device notes).
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
source scripts/env.sh
set +e  # env.sh sets -e; here every step runs and reports, whatever the one before did
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpus.txt" 2>&1
nvidia-smi topo -m >> "$OUT/gpus.txt" 2>&1
ngpu=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
RUN="$PY -m torch.distributed.run --standalone --nproc-per-node $ngpu"

# The extension and the C++ suite build side by side (~1 min on the boxes).
if has tests; then
  (cmake -S . -B build/cmake -G Ninja -DPython3_EXECUTABLE="$PY" && cmake --build build/cmake) > "$OUT/cmake.log" 2>&1 &
  cmake_pid=$!
fi
tpext_build > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; archive; exit 1; }
if has tests; then wait "$cmake_pid"; echo "cmake build rc=$?"; fi  # no compiler beside the timed steps
stamp "built"

# Timed steps first, on an otherwise idle box.
if has gemm-probe; then
  # Every cuBLASLt candidate of the MLP's GEMMs under a sustained, power-capped load (one GPU),
  # with the clocks and power nvidia-smi reads every 100 ms beside it.
  if [ ! -x build/cmake/tpext_gemm_sustained_probe ]; then
    (cmake -S . -B build/cmake -G Ninja -DPython3_EXECUTABLE="$PY" -DTPEXT_BUILD_TESTS=OFF &&
      cmake --build build/cmake --target tpext_gemm_sustained_probe) > "$OUT/cmake_probe.log" 2>&1
  fi
  nvidia-smi --query-gpu=timestamp,index,clocks.sm,power.draw,enforced.power.limit,temperature.gpu \
    --format=csv -lms 100 > "$OUT/gemm-probe-smi.csv" 2>&1 &
  smi_pid=$!
  timeout $(( $(left) - 60 )) build/cmake/tpext_gemm_sustained_probe ${GEMM_PROBE_ARGS:-} > "$OUT/gemm-probe.txt" 2>&1
  echo "gemm probe rc=$?"; grep -E "^(==|--)|<- best" "$OUT/gemm-probe.txt"
  kill "$smi_pid" 2>/dev/null
  stamp "gemm probe done"
fi
if has autotune-ab; then
  # tpext's GEMM ops (single-ops: the MLP on one GPU through tpext.linear / linear_backward) against
  # torch's (single), with each autotune setting in turn, so that the ratio compares the settings
  # within one run and the rounds show the drift between runs.
  for round in $(seq 1 "${AB_ROUNDS:-2}"); do
    for setting in ${AB_SETTINGS:-0:0 8:50}; do
      parse_setting "$setting"
      timeout $(( $(left) - 20 )) $PY bench/mlp.py --workloads mlp-8192 -M 256,4096,16384 --modes fwd,fwdbwd \
        --graph eager --systems single,single-ops --gemm-autotune "$s" --gemm-autotune-sustain-ms "$c" --no-plots \
        --out "$OUT/autotune-c$s-s$c-r$round.json" > "$OUT/autotune-c$s-s$c-r$round.log" 2>&1
      echo "autotune round $round candidates $s sustain $c ms rc=$?"
      "$PY" bench/sweep_score.py --ratio single-ops single "$OUT/autotune-c$s-s$c-r$round.json"
    done
  done
  stamp "autotune a/b done"
fi
if has demo; then
  timeout 150 $RUN -m tpext > "$OUT/demo.log" 2>&1
  echo "demo rc=$?"; tail -30 "$OUT/demo.log"
  stamp "demo done"
fi
if has bench-allreduce && [ "$ngpu" -ge 2 ]; then
  timeout 150 $RUN bench/allreduce.py --out "$OUT/allreduce.json" > "$OUT/bench_allreduce.log" 2>&1
  echo "bench allreduce rc=$?"; tail -6 "$OUT/bench_allreduce.log"
  stamp "bench allreduce done"
fi
if has profile && [ "$ngpu" -ge 2 ]; then
  for c in 0 16; do  # --overlap-sms c also caps tpext's overlapped NCCL collectives at c CTAs
    timeout 90 $RUN bench/kernel_timeline.py --overlap-sms "$c" -M 4096 --trace-dir "$OUT" > "$OUT/profile-sms$c.log" 2>&1
    echo "profile overlap-sms $c rc=$?"; grep -E "^== " "$OUT/profile-sms$c.log"
  done
  stamp "profile done"
fi
best_sms=0; best_ctas=0
# The carve-out: the GEMMs' SM target leaves S SMs to NCCL, and tpext's collectives that run beside
# those GEMMs go through a communicator capped at C CTAs (tpext.init's nccl_overlap_ctas); the rest,
# and the peers' NCCL, keep NCCL's choice.
carve_args() { echo "--overlap-sms $1"; if [ "$2" != 0 ]; then echo "--nccl-overlap-ctas $2"; fi; }
if has sweep && [ "$ngpu" -ge 2 ]; then
  best_score=""
  settings=${SWEEP:-0 8 16 32}
  for round in $(seq 1 "${SWEEP_ROUNDS:-1}"); do
    for setting in $settings; do
      parse_setting "$setting"
      timeout 120 $RUN bench/mlp.py --workloads mlp-8192 -M 4096,16384 --modes fwd,fwdbwd --graph eager \
        --systems tpext,floor-ops,ar-tpext $(carve_args "$s" "$c") --no-plots \
        --out "$OUT/sweep-sms$s-ctas$c-r$round.json" > "$OUT/sweep-sms$s-ctas$c-r$round.log" 2>&1
      echo "sweep round $round overlap-sms $s ctas $c rc=$?"
    done
  done
  for setting in $settings; do
    parse_setting "$setting"
    score=$("$PY" bench/sweep_score.py "$OUT"/sweep-sms$s-ctas$c-r*.json)
    echo "  sms $s ctas $c: score (mean tpext / floor-ops, M=4096 and 16384 fwd+bwd) $score"
    if [ -n "$score" ] && { [ -z "$best_score" ] || "$PY" -c "import sys; sys.exit(0 if $score < $best_score else 1)"; }; then
      best_sms=$s; best_ctas=$c; best_score=$score
    fi
  done
  echo "$best_sms:$best_ctas" > "$OUT/best_carve_out.txt"
  echo "best: overlap-sms $best_sms, ctas $best_ctas"
  stamp "sweep done"
fi
if has chunk-by && [ "$ngpu" -ge 2 ]; then
  for by in rows auto; do
    timeout 100 $RUN bench/mlp.py --workloads mlp-8192 -M 128,256,512 --modes fwd --graph eager,graph \
      --systems tpext,floor-ops,ar-tpext --chunk-by "$by" $(carve_args "$best_sms" "$best_ctas") --no-plots \
      --out "$OUT/chunkby-$by.json" > "$OUT/chunkby-$by.log" 2>&1
    echo "chunk-by $by rc=$?"; "$PY" bench/sweep_score.py --table "$OUT/chunkby-$by.json"
  done
  stamp "chunk-by done"
fi
if has bench-mlp && [ -f bench/mlp.py ]; then
  # The goals' workload first, so that a cut-short call still brings its JSON back.
  timeout $(( $(left) - 20 )) $RUN bench/mlp.py --workloads mlp-8192 $(carve_args "$best_sms" "$best_ctas") \
    ${MLP_ARGS:-} --no-plots --out "$OUT/mlp-8192.json" > "$OUT/bench_mlp8192.log" 2>&1
  echo "bench mlp-8192 rc=$?"; sed -n '/^goals/,$p' "$OUT/bench_mlp8192.log" | head -12
  stamp "bench mlp-8192 done"
  if [ "$(left)" -gt 150 ]; then
    timeout $(( $(left) - 15 )) $RUN bench/mlp.py --workloads mlp-4096,attn,layer \
      $(carve_args "$best_sms" "$best_ctas") \
      ${MLP_ARGS:-} --no-plots --out "$OUT/mlp-rest.json" > "$OUT/bench_mlp_rest.log" 2>&1
    echo "bench mlp-4096,attn,layer rc=$?"; grep -E "done in" "$OUT/bench_mlp_rest.log"
    stamp "bench rest done"
  fi
fi
# The suites last: they need no idle box, and they take whatever time is left.
if has tests; then
  if [ ! -f /usr/include/gtest/gtest.h ]; then echo "no gtest headers" | tee -a "$OUT/ctest.log"; fi
  (cd build/cmake && timeout 240 ctest --output-on-failure > "$OUT/ctest.log" 2>&1; echo "ctest rc=$?" >> "$OUT/ctest.log") &
  ctest_pid=$!
  # A failed launch writes its report at once (a run cut short keeps it), and a hung one costs at
  # most the cap. Three things run beside each other (2 H200s, 5673920-30d7301: ~290 s in all):
  # - the init/destroy cycles (the issue's 100, ~200 s), without the cap;
  # - the cases that need 2 GPUs (they are what only this box can run);
  # - the 1-GPU cases, on the second GPU where there is one (no test times anything).
  # The CPU-only files are left to CI: beside the GPU ones they competed for ports and cores.
  export TPEXT_TEST_LAUNCH_TIMEOUT_S=${TPEXT_TEST_LAUNCH_TIMEOUT_S:-200}
  gpu_files=$(ls tests/test_*_gpu.py | tr '\n' ' ')
  two="2gpu or dead_rank or diverging or interleaved or tp2_to_tp1"
  (env -u TPEXT_TEST_LAUNCH_TIMEOUT_S TPEXT_TEST_NCCL_CYCLES=${TPEXT_TEST_NCCL_CYCLES:-100} \
    TPEXT_TEST_FAILURE_LOG="$OUT/failures_cycles.txt" timeout $(( $(left) - 10 )) \
    "$PY" -m pytest -v -s -rs tests/test_reliability_gpu.py -k init_destroy -p no:cacheprovider \
    > "$OUT/pytest_gpu_cycles.log" 2>&1; echo "gpu pytest (cycles) rc=$?" >> "$OUT/pytest_gpu_cycles.log") &
  cycles_pid=$!
  one_gpu=$([ "$ngpu" -ge 2 ] && echo 1 || echo 0)
  run_part() {  # part, selection, visible GPUs
    CUDA_VISIBLE_DEVICES=$3 TPEXT_TEST_FAILURE_LOG="$OUT/failures_$1.txt" timeout $(( $(left) - 12 )) \
      "$PY" -m pytest -v -rs $gpu_files -k "$2" -p no:cacheprovider --durations=40 > "$OUT/pytest_gpu_$1.log" 2>&1
    echo "gpu pytest ($1) rc=$?" >> "$OUT/pytest_gpu_$1.log"
  }
  all_gpus=$(seq -s, 0 $((ngpu - 1)))
  if [ "$ngpu" -ge 2 ]; then
    run_part one "not ($two or init_destroy)" "$one_gpu" &
    one_pid=$!
    run_part two "$two" "$all_gpus"
    wait "$one_pid"
  else
    run_part one "not ($two or init_destroy)" "$all_gpus"
  fi
  wait "$cycles_pid"
  for part in two one cycles; do
    [ -f "$OUT/pytest_gpu_$part.log" ] || continue
    grep -E "PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS" "$OUT/pytest_gpu_$part.log" | grep "::" | sed 's/ *\[ *[0-9]*%\]//'
    tail -2 "$OUT/pytest_gpu_$part.log"
  done
  grep -E "^\[init/destroy" "$OUT/pytest_gpu_cycles.log" | cut -c1-600
  for f in "$OUT"/failures_*.txt; do [ -f "$f" ] && { echo "== $f"; head -c 3000 "$f"; }; done
  wait "$ctest_pid"; grep -E "tests passed|tests failed|\(Failed\)|ctest rc" "$OUT/ctest.log" | tail -5
  echo "gtest SKIPPED lines: $(grep -cE '^\[  SKIPPED \]' "$OUT/ctest.log")"
  stamp "tests done"
fi
archive

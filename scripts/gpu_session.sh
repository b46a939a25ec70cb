#!/usr/bin/env bash
# One batched run on a lent GPU box: build, C++ suite, Python suite, demo, benchmarks. Logs go to
# $OUT (or ./out) so they come back even when a step fails. Usage:
#   bash scripts/gpu_session.sh [tests] [demo] [bench-allreduce] [bench-mlp] ...   (default: all)
set -uo pipefail
OUT=${OUT:-$(pwd)/out}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests demo bench-allreduce bench-mlp)
# The device tool brings back at most 8 files: logs travel as one archive, results as themselves,
# also when an outer `timeout` stops this script part-way.
archive() { (cd "$OUT" && ls *.log *.txt >/dev/null 2>&1 && tar czf logs.tgz *.log *.txt && rm -f *.log *.txt); ls -la "$OUT"; }
trap 'archive; exit 124' TERM
has() { for s in "${steps[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }

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
start=$(date +%s)
stamp() { echo "[gpu_session] $1 at +$(( $(date +%s) - start )) s"; }

tpext_build > "$OUT/build.log" 2>&1 || { cat "$OUT/build.log"; exit 1; }
stamp "built"
if has tests; then
  if [ ! -f /usr/include/gtest/gtest.h ]; then echo "no gtest headers" | tee "$OUT/ctest.log"; fi
  (cmake -S . -B build/cmake -G Ninja -DPython3_EXECUTABLE="$PY" && cmake --build build/cmake &&
    cd build/cmake && timeout "${CTEST_TIMEOUT:-240}" ctest --output-on-failure) > "$OUT/ctest.log" 2>&1
  echo "ctest rc=$?"; grep -E "tests passed|tests failed|Failed|\*\*\*" "$OUT/ctest.log" | tail -5
  grep -cE "^\[  SKIPPED \]" "$OUT/ctest.log" | sed 's/^/gtest skipped lines: /'
  stamp "ctest done"
  # A failed launch writes its report at once (a run cut short keeps it), and a hung one costs
  # at most the cap. The CPU-only files run beside the GPU ones with the GPUs hidden (xdist, where
  # the box has it); the GPU files run one at a time, verbose, so a cut log still says how far.
  export TPEXT_TEST_FAILURE_LOG="$OUT/failures.txt" TPEXT_TEST_LAUNCH_TIMEOUT_S=${TPEXT_TEST_LAUNCH_TIMEOUT_S:-150}
  cpu_files=$(ls tests/test_*.py | grep -v _gpu.py | tr '\n' ' ')
  gpu_files=$(ls tests/test_*_gpu.py | tr '\n' ' ')
  xdist=$("$PY" -c 'import xdist' 2>/dev/null && echo "-n 8")
  (CUDA_VISIBLE_DEVICES= TPEXT_TEST_FAILURE_LOG="$OUT/failures_cpu.txt" timeout "${PYTEST_TIMEOUT:-420}" \
    "$PY" -m pytest -q -rs $xdist ${PYTEST_CPU_PATHS:-$cpu_files} -p no:cacheprovider > "$OUT/pytest_cpu.log" 2>&1;
    echo "cpu pytest rc=$?" >> "$OUT/pytest_cpu.log") &
  timeout "${PYTEST_TIMEOUT:-420}" "$PY" -m pytest -v -rs -rx ${PYTEST_PATHS:-$gpu_files} -p no:cacheprovider \
    --durations=30 > "$OUT/pytest.log" 2>&1
  echo "gpu pytest rc=$?"; tail -3 "$OUT/pytest.log"; grep -E "FAILED|ERROR|^SKIPPED" "$OUT/pytest.log" | head -20
  [ -f "$OUT/failures.txt" ] && head -c 4000 "$OUT/failures.txt"
  wait; tail -2 "$OUT/pytest_cpu.log"
  stamp "pytest done"
fi
if has demo; then
  "$PY" -m torch.distributed.run --standalone --nproc-per-node "$ngpu" -m tpext > "$OUT/demo.log" 2>&1
  echo "demo rc=$?"; tail -30 "$OUT/demo.log"
  stamp "demo done"
fi
if has bench-allreduce && [ "$ngpu" -ge 2 ]; then
  "$PY" -m torch.distributed.run --standalone --nproc-per-node "$ngpu" bench/allreduce.py --out "$OUT/allreduce.json" > "$OUT/bench_allreduce.log" 2>&1
  echo "bench allreduce rc=$?"; tail -25 "$OUT/bench_allreduce.log"
  stamp "bench allreduce done"
fi
if has bench-mlp && [ -f bench/mlp.py ]; then
  "$PY" -m torch.distributed.run --standalone --nproc-per-node "$ngpu" bench/mlp.py ${MLP_ARGS:-} --out "$OUT/mlp.json" > "$OUT/bench_mlp.log" 2>&1
  echo "bench mlp rc=$?"; tail -25 "$OUT/bench_mlp.log"
  stamp "bench mlp done"
fi
archive

#!/usr/bin/env bash
# CUDA kernel checks and benchmarks on the device machine (H100), in two steps.
#
#   here (build machine):   tools/device/run_cuda_bench.sh package [build-dir]
#       copies petrel, the CUDA test suites that are built (test_cuda_gemm, test_cuda_mla, test_cuda_layer_ops,
#       test_cuda_backend) and the non-CUDA shared libraries they need that Ubuntu 24.04
#       lacks into device/cuda/ (git-ignored). cuBLASLt (540 MB) stays behind: the device has its own.
#   device (repo root):     tools/device/run_cuda_bench.sh run [extra bench-kernels flags]
#       with device/cuda carried; writes logs and bench.json under $OUT.
#   device (repo root):     tools/device/run_cuda_bench.sh backend
#       with device/cuda carried: the cuda backend suite (test_cuda_backend: every op against the cpu backend at
#       DeepSeek-V3 shapes, the golden fixtures and fortune-moe end to end, graphs, a 2-layer full-width model,
#       timings); writes test_cuda_backend.log and backend_results.txt (the RESULT lines) under $OUT.
#       One call from the build machine:
#         tools/device/run_cuda_bench.sh package build-cudabe   # here, then the device tool's run with
#         carry=["device/cuda"], command="bash tools/device/run_cuda_bench.sh backend"
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bundle.sh"
here=${PETREL_DEVICE_DIR:-device/cuda} # another folder (device/<name>) keeps parallel packagers apart
cmd=${1:-run}
shift || true

if [[ $cmd == package ]]; then
  build=${1:-build-cuda}
  bins=()
  for b in petrel test_cuda_gemm test_cuda_mla test_cuda_layer_ops test_cuda_backend; do [[ -f $build/$b ]] && bins+=("$build/$b"); done
  bundle_package "$here" "${bins[@]}"
  exit $?
fi

out=${OUT:-/tmp/petrel-cuda-out}
bundle_unpack "$here" || exit 1
here=$BUNDLE_ROOT
mkdir -p "$out"

if [[ $cmd == backend ]]; then
  # The fixtures are read from this checkout, not from the build machine's path compiled into the binary.
  export PETREL_SOURCE_DIR=$PWD PETREL_CUDA_BIG=${PETREL_CUDA_BIG:-1} PETREL_CUDA_BENCH=${PETREL_CUDA_BENCH:-1}
  export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-8} # the cpu references
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv | tee "$out/env.log"
  echo "== test_cuda_backend"
  timeout "${BACKEND_TIMEOUT:-400}" "$here/bin/test_cuda_backend" -s > "$out/test_cuda_backend.log" 2>&1
  rc=$?
  grep -E '^RESULT' "$out/test_cuda_backend.log" | tee "$out/backend_results.txt"
  grep -E 'ERROR|FAILED|CHECK|test cases|assertions' "$out/test_cuda_backend.log" | grep -v '^RESULT' | head -60
  echo "test_cuda_backend rc=$rc"
  if command -v compute-sanitizer >/dev/null; then
    # Every kernel under memcheck (the model-size cases and the deliberate fault left out); expected: the one
    # deliberate out-of-memory cudaMalloc of the error test, and "ERROR SUMMARY: 0 errors".
    echo "== compute-sanitizer memcheck on the op tests"
    env -u PETREL_CUDA_BIG -u PETREL_CUDA_BENCH timeout "${MEMCHECK_TIMEOUT:-150}" compute-sanitizer --tool memcheck \
      "$here/bin/test_cuda_backend" -tce='*golden*,*fortune*,*sticky*,*DeepSeek-V3 width*' > "$out/memcheck.log" 2>&1
    echo "memcheck rc=$?"
    grep -E 'Invalid|out of bounds|ERROR SUMMARY|test cases|assertions' "$out/memcheck.log" | sort | uniq -c | head -20
  fi
  exit $rc
fi
{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv
  echo "cuBLASLt from: $blas_dir"
  echo "SASS instruction counts in petrel (QGMMA = fp8 wgmma, UTMALDG = TMA load):"
  cuobjdump -sass "$here/bin/petrel" | grep -oE '\b(QGMMA|HGMMA|HMMA|UTMALDG|UTMAPF|SYNCS)[A-Z0-9_.]*' | sort | uniq -c
} 2>&1 | tee "$out/env.log"
cuobjdump -sass "$here/bin/petrel" > "$out/petrel.sass" 2>&1 || true
gzip -f "$out/petrel.sass"
echo "== unit tests"
timeout 120 "$here/bin/test_cuda_gemm" -s > "$out/test_cuda_gemm.log" 2>&1
test_rc=$?
grep -E 'MESSAGE|ERROR|FAILED|test cases|assertions|rel_l2' "$out/test_cuda_gemm.log" | head -60
echo "unit tests rc=$test_rc"
if [[ $test_rc != 0 ]] && command -v compute-sanitizer >/dev/null; then
  echo "== compute-sanitizer memcheck on the unit tests"
  timeout 150 compute-sanitizer --tool memcheck "$here/bin/test_cuda_gemm" 2>&1 | grep -vE '^\s*$' | head -40
fi
echo "== bench-kernels"
timeout "${BENCH_TIMEOUT:-300}" "$here/bin/petrel" bench-kernels --check --json "$out/bench.json" "$@" 2>&1 | tee "$out/bench.log"
echo "bench rc=${PIPESTATUS[0]}"
# More passes: EXTRA_PASSES="--block-n 192 --check;--block-n 64 --iters 10" (';' between passes).
if [[ -n ${EXTRA_PASSES:-} ]]; then
  IFS=';' read -ra passes <<< "$EXTRA_PASSES"
  i=0
  for flags in "${passes[@]}"; do
    i=$((i + 1))
    echo "== bench-kernels pass $i: $flags"
    timeout 200 "$here/bin/petrel" bench-kernels $flags > "$out/bench_pass$i.log" 2>&1
    echo "pass $i rc=$?"
    grep -E '^check|^cuBLASLt' "$out/bench_pass$i.log" | grep -v ' ok$' | head
    sed -n '/^shape/,$p' "$out/bench_pass$i.log"
  done
fi

#!/usr/bin/env bash
# GPU KV pools on the device machine: the kv engine's CUDA IPC and staged paths, and a served PD cluster on the
# GPU (tests/unit/test_cuda_kv_transfer, tests/integration/test_cuda_cluster), the GPU chaos scenario
# (tests/chaos/gpu/faults.yaml), then bench-kv figures. Two steps:
#
#   here (build machine):   tools/device/run_gpu_cluster.sh package [build-dir]
#       copies petrel, the two test binaries and the non-CUDA shared libraries they need (CAF, yaml-cpp, UCX,
#       OpenSSL, ...) into device/gpucluster/bundle.tar.xz (git-ignored; name device/gpucluster in `carry`).
#   device (repo root):     tools/device/run_gpu_cluster.sh run
#       runs the tests (logs under $OUT) and bench-kv on GPU pools (bench-kv.txt under $OUT).
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bundle.sh"
here=device/gpucluster
cmd=${1:-run}
shift || true

if [[ $cmd == package ]]; then
  build=${1:-build-cudabe}
  bundle_package "$here" "$build/petrel" "$build/test_cuda_kv_transfer" "$build/test_cuda_cluster"
  exit $?
fi

out=${OUT:-/tmp/petrel-gpucluster-out}
mkdir -p "$out"
bundle_unpack "$here" || exit 1
bin=$BUNDLE_BIN
export PETREL_BINARY=$bin/petrel PETREL_SOURCE_DIR=$PWD
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/env.log"

rc=0
for t in test_cuda_kv_transfer test_cuda_cluster; do
  echo "== $t"
  timeout 300 "$bin/$t" -s > "$out/$t.log" 2>&1
  r=$?
  grep -E '^RESULT|test cases|assertions|ERROR|FAILED' "$out/$t.log" | head -40
  echo "$t rc=$r"
  [[ $r == 0 ]] || rc=1
done

echo "== petrel chaos tests/chaos/gpu/faults.yaml (GPU device faults, node kill, corrupt KV under load)"
timeout 300 "$bin/petrel" chaos tests/chaos/gpu/faults.yaml --report "$out/chaos_gpu.json" > "$out/chaos_gpu.log" 2>&1
r=$?
tail -25 "$out/chaos_gpu.log"
echo "chaos rc=$r"
[[ $r == 0 ]] || rc=1

{
  echo "== bench-kv, GPU pools, 64 pages x 72 KiB (one layer's 64-token MLA page, bf16)"
  for args in "--mode process" "--mode process --gpu-path staged" "--mode memcpy"; do
    echo "-- $args"
    timeout 120 "$bin/petrel" bench-kv --memory cuda $args --transfers 200 --repeat 3 2>&1 | grep -v '^KV path'
  done
  echo "== bench-kv, GPU pools, 32 pages x 4.29 MiB (61 layers x 64 tokens: a 2K-token prompt's KV)"
  for args in "--mode process" "--mode process --gpu-path staged"; do
    echo "-- $args"
    timeout 120 "$bin/petrel" bench-kv --memory cuda $args --pages 32 --page-bytes 4497408 --transfers 40 \
      --inflight 4 --repeat 3 2>&1 | grep -v '^KV path'
  done
  echo "== bench-kv, host pools (reference), 64 x 72 KiB over tcp"
  timeout 120 "$bin/petrel" bench-kv --mode process --transfers 200 --repeat 3 2>&1 | grep -v '^KV path'
} > "$out/bench-kv.txt" 2>&1
cat "$out/bench-kv.txt"
exit $rc

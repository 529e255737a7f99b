#!/usr/bin/env bash
# The intranode GPU expert all-to-all (kernels/cuda/ep_a2a, petrel bench-ep) on the device machine, in two steps.
#
#   here (build machine):   tools/device/run_ep_bench.sh package [build-dir]
#       copies petrel and test_cuda_ep_a2a plus the non-CUDA shared libraries they need that Ubuntu 24.04 lacks
#       into device/ep/ (git-ignored) as one compressed bundle. NCCL stays behind (217 MB): bench-ep dlopens
#       libnccl.so.2, found on the device under torch's venv.
#   device (repo root):     tools/device/run_ep_bench.sh run
#       with device/ep carried; writes logs and JSON under $OUT: the unit tests, then bench-ep at N = 2, 4, 8
#       (normal, 4096 tokens, hidden 7168, top-8, 256 experts) and low-latency at 128 tokens, with the ranks as
#       processes (CUDA IPC) and as threads of one process, all on the one GPU there is.
#   One call from the build machine: package here, then the device tool's run with carry=["device/ep"],
#   command="bash tools/device/run_ep_bench.sh run".
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bundle.sh"
here=${PETREL_DEVICE_DIR:-device/ep}
cmd=${1:-run}
shift || true

if [[ $cmd == package ]]; then
  build=${1:-build-epgpu}
  bins=()
  for b in petrel test_cuda_ep_a2a; do [[ -f $build/$b ]] && bins+=("$build/$b"); done
  bundle_package "$here" "${bins[@]}"
  exit $?
fi

out=${OUT:-/tmp/petrel-ep-out}
mkdir -p "$out"
nccl_dir=$(nccl_lib_dir)
bundle_unpack "$here" "$nccl_dir" || exit 1
here=$BUNDLE_ROOT
{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total,compute_mode --format=csv
  echo "nccl from: $nccl_dir"
  nvidia-smi -q | grep -iE 'MPS|Compute Mode' | head -5
  env | grep -E '^CUDA_' || true
} 2>&1 | tee "$out/env.log"

if [[ $cmd == run || $cmd == tests ]]; then
  echo "== test_cuda_ep_a2a"
  PETREL_BINARY=$here/bin/petrel timeout "${TEST_TIMEOUT:-240}" "$here/bin/test_cuda_ep_a2a" -s > "$out/test_cuda_ep_a2a.log" 2>&1
  echo "test_cuda_ep_a2a rc=$?"
  grep -E 'ERROR|FAILED|MISMATCH|test cases|assertions|timed out' "$out/test_cuda_ep_a2a.log" | head -30
  [[ $cmd == tests ]] && exit 0
fi

bench() { # name, flags...
  local name=$1
  shift
  echo "== bench-ep $*"
  # few files come back from the device: every run appends to all.log and results.jsonl
  timeout "${BENCH_TIMEOUT:-150}" "$here/bin/petrel" bench-ep "$@" --json "/tmp/$name.json" > "/tmp/$name.log" 2>&1
  local rc=$?
  { echo "== $name: bench-ep $* (rc=$rc)"; cat "/tmp/$name.log"; } >> "$out/all.log"
  [[ -f /tmp/$name.json ]] && { tr -d '\n' < "/tmp/$name.json"; echo; } >> "$out/results.jsonl"
  grep -vE '^\[rank' "/tmp/$name.log" | tail -8
  grep -E 'MISMATCH|FAILED' "/tmp/$name.log" | head -5
  echo "rc=$rc"
}
# threads: the kernels run side by side (the figures); processes: real IPC handles, but the GPU time-slices
# between the processes' contexts, so their timings are mostly context switches (fewer iterations)
for launch in ${LAUNCHES:-threads processes}; do
  iters=${ITERS:-20}
  [[ $launch == processes ]] && iters=${PROCESS_ITERS:-5}
  for n in ${RANKS:-2 4 8}; do
    bench "normal_n${n}_${launch}" --ranks "$n" --launch "$launch" --mode normal --tokens 4096 --hidden 7168 --topk 8 \
      --experts 256 --iters "$iters"
    bench "ll_n${n}_${launch}" --ranks "$n" --launch "$launch" --mode low_latency --tokens 128 --hidden 7168 --topk 8 \
      --experts 256 --iters "$iters"
  done
done
# one rank: the NCCL path runs (a self send/receive), the only NCCL case one GPU allows
bench normal_n1_nccl --ranks 1 --mode normal --tokens 4096 --hidden 7168 --topk 8 --experts 256 --iters 10

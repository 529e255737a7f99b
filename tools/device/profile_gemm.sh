#!/usr/bin/env bash
# ncu profile of Petrel's fp8 GEMM on the device machine, to say from counters why it falls short of DeepGEMM
# (issue 7). Uses the petrel binary of a bundle folder made by any script's `package` step (run_gpu_cluster.sh's by
# default):
#   device (repo root):   bash tools/device/profile_gemm.sh [bundle-folder]     -> $OUT/ncu_gemm_*.txt
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bundle.sh"
out=${OUT:-/tmp/petrel-profile-out}
mkdir -p "$out"
bundle_unpack "${1:-device/gpucluster}" || exit 1
ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
[[ -n $ncu ]] || { echo "no ncu on this machine"; exit 1; }
sections="--section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
  --section WarpStateStats --section SchedulerStats --section Occupancy --section LaunchStats"
for shape in "dense 4096x7168x16384" "masked 4x256 n4096 k7168"; do
  tag=$(echo "$shape" | tr ' x' '__')
  echo "== $shape"
  timeout 240 "$ncu" --kernel-name regex:fp8_gemm_nt_kernel --launch-skip 2 --launch-count 1 $sections \
    "$BUNDLE_BIN/petrel" bench-kernels --only "$shape" --iters 3 --warmup 2 > "$out/ncu_gemm_$tag.txt" 2>&1
  grep -E "Duration|Compute \(SM\) Throughput|Memory Throughput|DRAM Throughput|Executed Ipc|Issue Slots Busy|\
No Eligible|Warp Cycles Per Issued|Achieved Occupancy|Registers Per|Stall|L2 Cache Throughput|L1/TEX Cache|Tensor" \
    "$out/ncu_gemm_$tag.txt" | head -40
done

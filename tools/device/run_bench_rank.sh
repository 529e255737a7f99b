#!/usr/bin/env bash
# One rank of the DeepSeek-V3 deployment on the device machine (H100): layer-op checks, petrel bench-rank for
# both presets, and petrel simulate's validation against what was measured. Two steps:
#
#   here (build machine):   tools/device/run_bench_rank.sh package [build-dir]
#       copies petrel, test_cuda_layer_ops (+ test_cuda_gemm when built) and the non-CUDA shared libraries they
#       need into device/bench-rank/bundle.tar.xz (git-ignored; name it in the device call's `carry`).
#   device (repo root):     tools/device/run_bench_rank.sh run quick|full|prefill|decode
#       quick:   unit tests + both presets at 4 layers (checks that everything runs; a few seconds of GPU time)
#       full:    unit tests + both presets at 61 layers (the figures for docs/benchmarks.md)
#       prefill / decode: one preset at 61 layers
#       table:   prefill at 1K and 2K prompts, prefill at 8,192 tokens, decode at 128 sequences and at 2x imbalance
#       BENCH_FLAGS="..." adds flags to every bench-rank call. Logs and JSON land under $OUT.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bundle.sh"
here=device/bench-rank
cmd=${1:-run}
shift || true

if [[ $cmd == package ]]; then
  build=${1:-build-benchrank}
  bins=("$build/petrel" "$build/test_cuda_layer_ops")
  [[ -x $build/test_cuda_gemm ]] && bins+=("$build/test_cuda_gemm")
  bundle_package "$here" "${bins[@]}"
  exit $?
fi

mode=${1:-quick}
out=${OUT:-/tmp/petrel-bench-rank-out}
mkdir -p "$out"
bundle_unpack "$here" || exit 1
here=$BUNDLE_ROOT
petrel=$here/bin/petrel
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total,memory.used --format=csv 2>&1 | tee "$out/env.log"

if [[ $mode == quick || $mode == full || ${TESTS:-0} == 1 ]]; then
  echo "== layer-op unit tests"
  # -s prints every passing assertion (millions); keep only the messages and the summary
  timeout 120 "$here/bin/test_cuda_layer_ops" -s 2>&1 | grep -E 'MESSAGE|ERROR|FAILED|test cases|assertions|worst|mismatch|Status' \
    > "$out/test_layer_ops.log"
  rc=${PIPESTATUS[0]}
  grep -v '^\s*$' "$out/test_layer_ops.log" | head -40
  echo "layer-op tests rc=$rc"
  if [[ $rc != 0 ]] && command -v compute-sanitizer >/dev/null; then
    timeout 120 compute-sanitizer --tool memcheck "$here/bin/test_cuda_layer_ops" 2>&1 | grep -vE '^\s*$' | head -30
  fi
fi

bench() {  # name, flags...
  local name=$1
  shift
  echo "== bench-rank $name: $*"
  # one log for all runs (at most 8 files come back from $OUT)
  timeout "${BENCH_TIMEOUT:-240}" "$petrel" bench-rank "$@" ${BENCH_FLAGS:-} --json "$out/$name.json" > /tmp/bench-rank-$name.log 2>&1
  echo "$name rc=$?"
  { echo "== $name: $*"; cat /tmp/bench-rank-$name.log; } >> "$out/bench.log"
  cat /tmp/bench-rank-$name.log
}

case $mode in
  quick)
    bench prefill_quick --preset prefill-ep32 --layers 4 --iters 2
    bench decode_quick --preset decode-ep72 --layers 4 --iters 5 ;;
  full)
    bench prefill --preset prefill-ep32
    bench decode --preset decode-ep72 ;;
  prefill) bench prefill --preset prefill-ep32 ;;
  decode) bench decode --preset decode-ep72 ;;
  table)   # the published table's other points, and other loads to validate the simulator's scaling against
    bench prefill_1k --preset prefill-ep32 --prompts 16
    bench prefill_2k --preset prefill-ep32 --prompts 8
    bench prefill_8k_tokens --preset prefill-ep32 --tokens 8192 --prompts 2
    bench decode_128 --preset decode-ep72 --batch 128
    bench decode_imb2 --preset decode-ep72 --imbalance 2 ;;
  *) echo "unknown mode '$mode' (quick, full, prefill, decode, table)"; exit 2 ;;
esac

echo "== petrel simulate --validate"
for f in "$out"/*.json; do
  [[ -f $f ]] && "$petrel" simulate --validate "$f" 2>&1
done
if [[ -f $out/prefill.json && -f $out/decode.json ]]; then
  echo "== petrel simulate with the measured kernel times"
  "$petrel" simulate --kernel-times "$out/prefill.json" --kernel-times "$out/decode.json" --window-tokens 16384 2>&1 | tee "$out/simulate.log"
fi

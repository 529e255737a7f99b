#!/usr/bin/env bash
# The GPU data plane of expert parallelism (runtime/ep_device_plane.hpp) on the device machine: its test
# (tests/unit/test_cuda_ep_plane) and bench-model step times of in-process EP groups with rows through the host
# transport against rows through the GPU plane, alternated step by step (--ep-data both).
#   here:    tools/device/run_ep_plane.sh package [build-dir]   -> device/epplane/bundle.tar.xz (git-ignored)
#   device:  bash tools/device/run_ep_plane.sh run [what...]    -> logs and bench JSON under $OUT
# what: test (test_cuda_ep_plane), cluster (test_cuda_cluster), alltests (every test_cuda_* binary), bench,
#       bench_nccl (bench-model with --ep-exchange cuda_ipc and nccl: EP1, and EP2 on a GPU per rank),
#       chaos (tests/chaos/gpu/ep_ipc.yaml), serve (tools/device/run_gpu_serving.sh with the EP variants, host rows against GPU rows). Default: test bench.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bundle.sh"
here=device/epplane
cmd=${1:-run}
shift || true
if [[ $cmd == package ]]; then
  build=${1:-build-cudabe}
  bundle_package "$here" "$build/petrel" $(ls "$build"/test_cuda_* | grep -v cmake)
  exit $?
fi
what=${*:-test bench}
out=${OUT:-/tmp/petrel-epplane-out}
mkdir -p "$out"
bundle_unpack "$here" "$(nccl_lib_dir)" || exit 1 # NCCL: the plane's nccl exchange dlopens it
bin=$BUNDLE_BIN
export PETREL_BINARY=$bin/petrel PETREL_SOURCE_DIR=$PWD
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/env.log"
rc=0
for w in $what; do
  case $w in
  test|cluster)
    t=$([[ $w == test ]] && echo test_cuda_ep_plane || echo test_cuda_cluster)
    echo "== $t"
    timeout 400 "$bin/$t" -s > "$out/$t.log" 2>&1
    r=$?
    grep -E '^RESULT|test cases|assertions|ERROR|FAILED|MESSAGE|rel. L2|tokens equal|rank 0:' -A1 "$out/$t.log" | head -80
    echo "$t rc=$r"
    [[ $r == 0 ]] || rc=1
    ;;
  alltests)
    for t in "$bin"/test_cuda_*; do
      n=$(basename "$t")
      timeout 400 "$t" > "$out/$n.log" 2>&1
      r=$?
      echo "$n rc=$r $(grep -E '^\[doctest\] (test cases|assertions)' "$out/$n.log" | tr '\n' ' ')"
      [[ $r == 0 ]] || { rc=1; grep -E 'ERROR' -A3 "$out/$n.log" | head -20; }
    done
    ;;
  chaos)
    echo "== petrel chaos tests/chaos/gpu/ep_ipc.yaml (faults in EP groups on the GPU data plane)"
    timeout 400 "$bin/petrel" chaos tests/chaos/gpu/ep_ipc.yaml --report "$out/chaos_ep_ipc.json" > "$out/chaos_ep_ipc.log" 2>&1
    r=$?
    tail -25 "$out/chaos_ep_ipc.log"
    echo "chaos rc=$r"
    mkdir -p "$out/chaos_logs"
    for f in /tmp/petrel-gpu-ep-chaos/petrel-gpu-ep-chaos/*.log; do
      [[ -f $f ]] && grep -a -v '^ep-plane' "$f" | tail -150 > "$out/chaos_logs/$(basename "$f")"
    done
    [[ $r == 0 ]] || rc=1
    ;;
  serve)
    PETREL=$bin/petrel bash tools/device/run_gpu_serving.sh ${SERVE_VARIANTS:-ep_tbo_off ep_ipc_tbo_off ep_ipc_tbo_on} || rc=1
    ;;
  bench_nccl)
    # The NCCL exchange against Petrel's kernels where one GPU allows it: EP1 (the rank's rows go to itself), and
    # EP2 with a GPU per rank when the machine has two or more (--backend cuda:each).
    wide=$PWD/tools/device/dsv3-wide
    ngpu=$(nvidia-smi -L | wc -l)
    for ex in cuda_ipc nccl; do
      for ep in 1 2; do
        (( ep > ngpu )) && continue
        be=$([[ $ep == 1 ]] && echo cuda || echo cuda:each)
        echo "-- $ex EP$ep"
        timeout 200 "$bin/petrel" bench-model --backend $be --load dummy --ep-data both --ep-exchange $ex --model "$wide" --ep $ep --prefill-batch 4 --prompt-len 512 --steps 6 > "$out/bench_${ex}_ep${ep}_prefill.json" 2> "$out/bench_${ex}_ep${ep}_prefill.err"
        echo "prefill rc=$? $(cat "$out/bench_${ex}_ep${ep}_prefill.json" | head -c 600)"
        timeout 200 "$bin/petrel" bench-model --backend $be --load dummy --ep-data both --ep-exchange $ex --model "$wide" --ep $ep --ep-mode low_latency --prefill-batch 128 --prompt-len 1 --steps 10 > "$out/bench_${ex}_ep${ep}_decode.json" 2> "$out/bench_${ex}_ep${ep}_decode.err"
        echo "decode rc=$? $(cat "$out/bench_${ex}_ep${ep}_decode.json" | head -c 600)"
      done
    done
    ;;
  bench)
    wide=$PWD/tools/device/dsv3-wide
    run_bench() { # name args...
      local name=$1; shift
      echo "-- $name: $*"
      timeout 300 "$bin/petrel" bench-model --backend cuda --load dummy --ep-data both "$@" > "$out/bench_$name.json" 2> "$out/bench_$name.err"
      echo "rc=$? $(cat "$out/bench_$name.json")"
      tail -3 "$out/bench_$name.err"
    }
    run_bench wide_ep2_prefill --model "$wide" --ep 2 --prefill-batch 4 --prompt-len 512 --steps 6
    run_bench wide_ep2_prefill_fp8x --model "$wide" --ep 2 --prefill-batch 4 --prompt-len 512 --steps 6 --ep-experts fp8
    run_bench wide_ep2_decode_ll_fp8x --model "$wide" --ep 2 --ep-mode low_latency --prefill-batch 128 --prompt-len 1 --steps 10 --ep-experts fp8
    run_bench wide_ep2_decode_ll --model "$wide" --ep 2 --ep-mode low_latency --prefill-batch 128 --prompt-len 1 --steps 10
    run_bench wide_ep4_prefill --model "$wide" --ep 4 --prefill-batch 2 --prompt-len 512 --steps 6
    run_bench fortune_ep2_prefill --model "$PWD/tests/data/fortune-moe" --ep 2 --prefill-batch 8 --prompt-len 128 --steps 10
    ;;
  esac
done
exit $rc

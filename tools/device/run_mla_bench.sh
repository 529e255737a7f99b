#!/usr/bin/env bash
# MLA attention kernels on the device machine (H100): unit tests, benchmark, optional ncu profile.
#
#   here (build machine):   tools/device/run_mla_bench.sh package [build-dir]
#       builds nothing; copies petrel, test_cuda_mla and the non-CUDA shared libraries Ubuntu 24.04 lacks
#       into device/mla/bundle.tar.xz (git-ignored; carry "device/mla" in the device call). Same packing
#       as tools/device/run_cuda_bench.sh.
#   device (repo root):     tools/device/run_mla_bench.sh run [extra bench-mla flags]
#       env: TEST_TIMEOUT / BENCH_TIMEOUT (seconds) bound the tests and the bench; NCU=1 also profiles the first decode launch (batch 64, KV 2048) and the prefill with ncu;
#            (NCU=decode: the decode only);
#            SKIP_TESTS=1 skips the unit tests. Logs, bench JSON and SASS counts land under $OUT.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bundle.sh"
here=device/mla
cmd=${1:-run}
shift || true

if [[ $cmd == package ]]; then
  build=${1:-build-mla}
  bundle_package "$here" "$build/petrel" "$build/test_cuda_mla"
  exit $?
fi

out=${OUT:-/tmp/petrel-mla-out}
mkdir -p "$out"
bundle_unpack "$here" || exit 1
bin=$BUNDLE_BIN
{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv
  echo "SASS of the MLA kernels (HGMMA = bf16 wgmma, UTMALDG = TMA load, LDGSTS = cp.async, LDL/STL = local memory):"
  cuobjdump -sass "$bin/petrel" > "$BUNDLE_ROOT/petrel.sass" 2>&1
  python3 - "$BUNDLE_ROOT/petrel.sass" <<'PY'
import collections, re, sys
fn, counts = None, collections.Counter()
for line in open(sys.argv[1], errors='replace'):
    m = re.search(r'Function : (\S+)', line)
    if m:
        fn = m.group(1)
        continue
    k = re.search(r'mla_(?:decode_combine|decode|prefill)_kernel', fn or '')
    if k:
        for op in re.findall(r'\b(?:HGMMA|UTMALDG|LDGSTS|LDL|STL|MUFU\.EX2|BAR|SYNCS)[A-Z0-9_.]*', line):
            counts[(k.group(0), op)] += 1
for (kernel, op), n in sorted(counts.items()):
    print(f'{n:6d} {kernel} {op}')
PY
} 2>&1 | tee "$out/env.log"
if [[ -z ${SKIP_TESTS:-} ]]; then
  echo "== unit tests"
  timeout "${TEST_TIMEOUT:-240}" "$bin/test_cuda_mla" -s > "$out/test_cuda_mla.log" 2>&1
  test_rc=$?
  grep -E 'rel_l2|ERROR|FAILED|test cases|assertions|workspace' "$out/test_cuda_mla.log" | head -40
  echo "unit tests rc=$test_rc"
  if [[ $test_rc != 0 ]] && command -v compute-sanitizer >/dev/null; then
    echo "== compute-sanitizer memcheck on the small cases"
    timeout 120 compute-sanitizer --tool memcheck "$bin/test_cuda_mla" -tc='*small*' 2>&1 | grep -vE '^\s*$' | head -40
  fi
fi
echo "== bench-mla"
timeout "${BENCH_TIMEOUT:-240}" "$bin/petrel" bench-mla --json "$out/mla_bench.json" "$@" 2>&1 | tee "$out/bench.log"
echo "bench rc=${PIPESTATUS[0]}"
if [[ -n ${NCU:-} ]]; then
  echo "== ncu: first decode launch (batch 64, KV 2048) and one prefill launch"
  sections="--section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section WarpStateStats --section SchedulerStats"
  timeout 150 ncu $sections -k regex:mla_decode_kernel -c 1 "$bin/petrel" bench-mla --only decode --iters 1 --warmup 0 \
    > "$out/ncu_decode.txt" 2>&1
  echo "ncu decode rc=$?"
  grep -E 'Throughput|Duration|Busy|Pipe|Stall|Issued|Eligible|Bandwidth|L2 Hit|Executed Ipc' "$out/ncu_decode.txt" | head -40
  [[ $NCU == decode ]] || timeout 150 ncu $sections -k regex:mla_prefill_kernel -c 1 "$bin/petrel" bench-mla --only prefill --iters 1 --warmup 0 \
    > "$out/ncu_prefill.txt" 2>&1
  echo "ncu prefill rc=$?"
  grep -E 'Throughput|Duration|Busy|Pipe|Stall|Issued|Eligible' "$out/ncu_prefill.txt" | head -25
fi

#!/usr/bin/env bash
# Script test (ctest: fuzz/test_fuzz): builds the libFuzzer targets with clang (tests/fuzz/build.sh), replays
# every committed regression input, then fuzzes each target briefly from its committed seed corpus
# (tests/fuzz/corpus/<target>/). Fails if any target crashes, leaks, trips a sanitizer or breaks an
# invariant. FUZZ_SECONDS (default 15) sets the time per target; FUZZ_JOBS (default 2) how many run at once.
# docs/fuzzing.md describes the targets and what longer runs found.
set -uo pipefail
src="${PETREL_SOURCE_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
build="${PETREL_BUILD_DIR:-$src/build}"
bin="$build/fuzz"
secs="${FUZZ_SECONDS:-15}"
jobs="${FUZZ_JOBS:-2}"
targets=(fuzz_openai_api fuzz_cluster_config fuzz_safetensors fuzz_caf_messages fuzz_kv_descriptor)

# 1. Build (two compilers at once; each target is one clang++ invocation).
printf '%s\n' "${targets[@]}" |
  PETREL_SOURCE_DIR="$src" PETREL_BUILD_DIR="$build" xargs -P "$jobs" -n 1 bash "$src/tests/fuzz/build.sh" || {
  echo "test_fuzz: FAIL: building the fuzz targets failed (needs clang-14 and libclang-rt-14-dev: tools/setup.sh)" >&2
  exit 1
}

work="$(mktemp -d /tmp/petrel-fuzz-XXXXXX)"
trap 'rm -rf "$work"' EXIT
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"

run_one() { # target -> exit status of libFuzzer; log in $work/<target>.log
  local t="$1" rc=0
  # 2. Regression inputs (crashes found earlier and since fixed) must run clean.
  if [ -d "$src/tests/fuzz/regressions/$t" ] && [ -n "$(ls -A "$src/tests/fuzz/regressions/$t")" ]; then
    "$bin/$t" -rss_limit_mb=2048 -timeout=10 "$src/tests/fuzz/regressions/$t"/* >"$work/$t.regress.log" 2>&1 || {
      echo "test_fuzz: FAIL: $t crashes on a committed regression input" >&2
      tail -40 "$work/$t.regress.log" >&2
      return 1
    }
  fi
  # 3. Fuzz from the seeds; new inputs go to a scratch corpus so the committed one stays as it is.
  mkdir -p "$work/$t.corpus"
  "$bin/$t" -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
    -artifact_prefix="$work/$t-" "$work/$t.corpus" "$src/tests/fuzz/corpus/$t" >"$work/$t.log" 2>&1 || rc=$?
  local execs cov
  execs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$work/$t.log" | grep -o '[0-9]*$')"
  cov="$(grep -o 'cov: [0-9]*' "$work/$t.log" | tail -1)"
  if [ "$rc" != 0 ]; then
    echo "test_fuzz: FAIL: $t exited $rc after ${execs:-?} runs; crash input and log:" >&2
    ls "$work/$t-"* >&2 2>/dev/null
    grep -m1 -A40 -E 'ERROR: (AddressSanitizer|libFuzzer|LeakSanitizer)|runtime error|invariant broken|unexpected exception|escaped' \
      "$work/$t.log" >&2 || tail -40 "$work/$t.log" >&2
    for a in "$work/$t-"*; do [ -f "$a" ] && { echo "--- $a (base64):" >&2; base64 -w0 "$a" | head -c 4000 >&2; echo >&2; }; done
    return 1
  fi
  echo "test_fuzz: ok   $t: ${execs:-?} runs in ${secs}s, ${cov:-cov ?}"
}

export -f run_one
export bin src work secs
failed=0
printf '%s\n' "${targets[@]}" | xargs -P "$jobs" -I{} bash -c 'run_one {}' || failed=1
if [ "$failed" != 0 ]; then
  echo "test_fuzz: FAIL (see above)" >&2
  exit 1
fi
echo "test_fuzz: all ${#targets[@]} targets ran ${secs}s each without a finding"

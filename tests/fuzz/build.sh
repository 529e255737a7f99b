#!/usr/bin/env bash
# Builds Petrel's libFuzzer targets with clang (Debian: clang-14 + libclang-rt-14-dev) straight from the
# few sources each one needs, independent of the g++/CMake build. Output: $PETREL_BUILD_DIR/fuzz/<target>
# (default build/fuzz). Usage: tests/fuzz/build.sh [target...]   (default: all targets)
# Each target is rebuilt only when one of its sources or headers is newer than the binary.
set -euo pipefail
src="${PETREL_SOURCE_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
out="${PETREL_BUILD_DIR:-$src/build}/fuzz"
mkdir -p "$out"

CXX="${FUZZ_CXX:-}"
if [ -z "$CXX" ]; then
  for c in clang++-14 clang++; do command -v "$c" >/dev/null 2>&1 && { CXX="$c"; break; }; done
fi
[ -n "$CXX" ] || { echo "fuzz/build.sh: no clang++ found (install clang-14 and libclang-rt-14-dev)" >&2; exit 1; }

FLAGS=(-std=c++20 -g -O1 -fno-omit-frame-pointer
       -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined
       -Wno-deprecated-declarations -DNDEBUG=1
       -DPETREL_SOURCE_DIR="\"$src\"" -I"$src" -I/usr/include/x86_64-linux-gnu/openblas-pthread)

# target: sources (repo-relative) | libraries
declare -A SOURCES=(
  [fuzz_openai_api]="tests/fuzz/fuzz_openai_api.cpp runtime/openai_api.cpp runtime/tokenizer.cpp"
  [fuzz_cluster_config]="tests/fuzz/fuzz_cluster_config.cpp runtime/cluster_config.cpp runtime/model_config.cpp runtime/ep_placement.cpp runtime/eplb.cpp"
  [fuzz_safetensors]="tests/fuzz/fuzz_safetensors.cpp runtime/safetensors.cpp"
  [fuzz_caf_messages]="tests/fuzz/fuzz_caf_messages.cpp"
  [fuzz_kv_descriptor]="tests/fuzz/fuzz_kv_descriptor.cpp transport/kv_transfer.cpp kernels/device_memory_host.cpp"
)
declare -A LIBS=(
  [fuzz_openai_api]=""
  [fuzz_cluster_config]="-lyaml-cpp"
  [fuzz_safetensors]=""
  [fuzz_caf_messages]="-lcaf_core"
  [fuzz_kv_descriptor]="-lucp -lucs -lpthread"
)
ALL=(fuzz_openai_api fuzz_cluster_config fuzz_safetensors fuzz_caf_messages fuzz_kv_descriptor)
targets=("$@")
((${#targets[@]})) || targets=("${ALL[@]}")

for t in "${targets[@]}"; do
  [ -n "${SOURCES[$t]+x}" ] || { echo "fuzz/build.sh: unknown target '$t' (have: ${ALL[*]})" >&2; exit 2; }
  files=()
  for f in ${SOURCES[$t]}; do files+=("$src/$f"); done
  # Up to date when the binary is newer than its sources, every header of the repo and this script.
  if [ -x "$out/$t" ] && [ -z "$(find "${files[@]}" "$src/runtime" "$src/transport" "$src/actors" "$src/tests/fuzz/build.sh" \
        \( -name '*.hpp' -o -name '*.cpp' -o -name build.sh \) -newer "$out/$t" 2>/dev/null | head -1)" ]; then
    echo "fuzz/build.sh: $t up to date"
    continue
  fi
  echo "fuzz/build.sh: $CXX -> $out/$t"
  # shellcheck disable=SC2086
  "$CXX" "${FLAGS[@]}" "${files[@]}" ${LIBS[$t]} -o "$out/$t.tmp"
  mv -f "$out/$t.tmp" "$out/$t"
done

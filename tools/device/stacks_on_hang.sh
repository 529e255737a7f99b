#!/usr/bin/env bash
# Debug aid for a served EP group that hangs on the GPU plane: runs one run_gpu_serving.sh variant with the plane's
# stage trace on, and once the node process NODE (default p0) has traced its first dispatch, waits WAIT seconds
# and writes every thread's stack of that process to $OUT/stacks_<variant>.txt (gdb or eu-stack when the machine has
# them; else `kill -USR2`, which makes the node write its threads' stacks into its log, copied whole to
# $OUT/stacks_<variant>_node.log; resolve the frames with addr2line -f -C -e <the packaged petrel> <offset>).
#   device:  PETREL=... bash tools/device/stacks_on_hang.sh VARIANT
set -uo pipefail
v=${1:?variant}
node=${NODE:-p0}
wait_s=${WAIT:-3}
out=${OUT:-/tmp/petrel-stacks-out}
mkdir -p "$out"
run=/tmp/petrel-serving-run-$v
log=$run/serve-$v/$node.log
( EP_TRACE=1 PROMPTS=${PROMPTS:-8} CONCURRENCY=${CONCURRENCY:-8} OUTPUT_LEN=16 BENCH_TIMEOUT=90 \
    bash "$(dirname "${BASH_SOURCE[0]}")/run_gpu_serving.sh" "$v" > "$out/stacks_run_$v.log" 2>&1 ) &
bg=$!
for _ in $(seq 1 240); do
  [[ -f $log ]] && grep -q "dispatch enqueued" "$log" && break
  sleep 0.5
done
sleep "$wait_s"
pid=$(pgrep -f -- "node --config .*--node $node( |$)" | head -1)
[[ -z $pid ]] && pid=$(pgrep -f -- "--node $node" | head -1)
{
  echo "node $node pid ${pid:-none}, $(date)"
  tail -20 "$log" 2>/dev/null
  if [[ -n $pid ]]; then
    if command -v gdb > /dev/null; then
      gdb -p "$pid" -batch -ex "set pagination off" -ex "thread apply all bt 25" 2>&1 | grep -vE '^\[New LWP|^warning'
    elif command -v eu-stack > /dev/null; then
      eu-stack -p "$pid" 2>&1
    else
      for t in /proc/$pid/task/*; do echo "$(basename "$t") $(cat "$t/comm") $(cat "$t/wchan" 2>/dev/null)"; done
      kill -USR2 "$pid"
      sleep 2
      cp "$log" "$out/stacks_${v}_node.log"
    fi
  fi
} > "$out/stacks_$v.txt" 2>&1
wait $bg
tail -25 "$out/stacks_run_$v.log"

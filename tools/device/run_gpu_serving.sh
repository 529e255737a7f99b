#!/usr/bin/env bash
# Served throughput on the device machine's GPU(s): a full-width DeepSeek-V3-shaped model with 2 layers (hidden
# 7168, 128 heads, MLA 512/64, one dense layer, one MoE layer of 16 experts top-8, byte vocabulary; dummy weights,
# tools/device/dsv3-wide/config.json) served PD-disaggregated, then as EP2 groups with two-batch overlap off and on.
# With one GPU every rank shares it (model.share_gpus); with N GPUs the ranks spread over them.
#   here:    tools/device/run_gpu_cluster.sh package build-cudabe      (the bundle holds petrel)
#   device:  bash tools/device/run_gpu_serving.sh [variants...]        -> $OUT/serve_<variant>.json and .log
# Variants: pd (1 prefill rank + 1 decode rank), ep_tbo_off, ep_tbo_on (EP2 prefill + EP2 decode, rows through the
# host), ep_ipc_tbo_off, ep_ipc_tbo_on (the same with transport.expert_exchange: cuda_ipc, rows through the GPUs),
# ep_ipc_fp8 (cuda_ipc with fp8_experts on both groups), ep_nccl_tbo_off, ep_nccl_tbo_on (rows through NCCL; needs a
# GPU per rank of a group, so 2 or more GPUs). Each variant's node logs (last 300 lines) go to $OUT/logs_<variant>/;
# EP_TRACE=1 makes the GPU plane trace its stages there.
# BACKEND=cpu MODEL=tests/data/fortune-moe/config.json checks the script itself on a machine without a GPU.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bundle.sh"
out=${OUT:-/tmp/petrel-serving-out}
mkdir -p "$out"
if [[ -z ${PETREL:-} ]]; then
  bundle_unpack device/gpucluster || exit 1
  PETREL=$BUNDLE_BIN/petrel
fi
backend=${BACKEND:-cuda}
model=${MODEL:-$PWD/tools/device/dsv3-wide/config.json}
prompts=${PROMPTS:-64}
input_len=${INPUT_LEN:-512}
output_len=${OUTPUT_LEN:-64}
concurrency=${CONCURRENCY:-32}
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
dev() { # device of rank i
  if [[ $backend == cpu ]]; then echo cpu; elif (( gpus > 1 )); then echo "cuda:$(( $1 % gpus ))"; else echo cuda:0; fi
}

yaml_for() { # variant run_dir
  # Every rank in a node process of its own: EP ranks sharing a GPU must not share a CUDA context on the GPU plane
  # (cluster_config refuses it), and the host-row variants keep the same layout to compare like with like.
  local v=$1 run=$2 ep exchange=inproc
  nodes="  - {name: p0, ranks: [$(dev 0)]}
  - {name: d0, ranks: [$(dev 1)]}"
  nodes_p="[p0]"; nodes_d="[d0]"
  case $v in
    pd) ep_p=""; ep_d="" ;;
    ep_tbo_off|ep_tbo_on|ep_ipc_tbo_off|ep_ipc_tbo_on|ep_ipc_fp8|ep_nccl_tbo_off|ep_nccl_tbo_on)
      nodes="  - {name: p0, ranks: [$(dev 0)]}
  - {name: p1, ranks: [$(dev 1)]}
  - {name: d0, ranks: [$(dev 2)]}
  - {name: d1, ranks: [$(dev 3)]}"
      nodes_p="[p0, p1]"; nodes_d="[d0, d1]"
      exchange=ucx
      tbo=$([[ $v == *tbo_on ]] && echo true || echo false)
      ep_p=", ep_size: 2, two_batch_overlap: $tbo"; ep_d=", ep_size: 2, ep_mode: low_latency"
      [[ $v == ep_ipc_* ]] && exchange=cuda_ipc
      [[ $v == ep_nccl_* ]] && exchange=nccl
      if [[ $v == ep_ipc_fp8 ]]; then ep_p="$ep_p, fp8_experts: true"; ep_d="$ep_d, fp8_experts: true"; fi ;;
    *) echo "unknown variant $v" >&2; return 1 ;;
  esac
  cat <<YAML
cluster: {name: serve-$v, run_dir: $run}
model: {path: dummy, dummy_config: $model, name: dsv3-wide, backend: $backend, share_gpus: true}
gateway: {host: 127.0.0.1, port: 0, max_queued: 1024}
nodes:
$nodes
groups:
  prefill: [{name: prefill0, nodes: $nodes_p, chunk_tokens: 4096, max_batch_tokens: 8192, kv_pages: 512, page_size: 64$ep_p}]
  decode: [{name: decode0, nodes: $nodes_d, page_size: 64, max_running: 64, kv_pages: 1024$ep_d}]
transport: {expert_exchange: $exchange}
YAML
}

wait_ready() { # run file -> 0 when the gateway says ok
  python3 - "$1" <<'PY'
import json, sys, time, urllib.request
run = sys.argv[1]
deadline = time.time() + 400
while time.time() < deadline:
    try:
        port = json.load(open(run))["gateway_port"]
        h = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2))
        if h.get("status") == "ok":
            sys.exit(0)
    except Exception:
        pass
    time.sleep(1)
sys.exit(1)
PY
}

variants=("$@")
[[ ${#variants[@]} -gt 0 ]] || variants=(pd ep_tbo_off ep_tbo_on)
rc=0
for v in "${variants[@]}"; do
  run=/tmp/petrel-serving-run-$v
  rm -rf "$run" && mkdir -p "$run"
  yaml_for "$v" "$run" > "$run/cluster.yaml" || exit 2
  echo "== $v ($backend, $gpus GPU(s))"
  t0=$(date +%s)
  [[ ${EP_TRACE:-0} == 1 ]] && export PETREL_EP_TRACE=1
  "$PETREL" launch "$run/cluster.yaml" > "$out/serve_$v.log" 2>&1 &
  head=$!
  keep_logs() {
    mkdir -p "$out/logs_$v"
    for f in "$run/serve-$v"/*.log; do [[ -f $f ]] && tail -300 "$f" > "$out/logs_$v/$(basename "$f")"; done
  }
  if ! wait_ready "$run/serve-$v/head.json"; then
    echo "$v: the cluster did not come up"; tail -30 "$out/serve_$v.log"; keep_logs; kill $head; rc=1; continue
  fi
  echo "up after $(( $(date +%s) - t0 )) s"
  timeout ${BENCH_TIMEOUT:-300} "$PETREL" bench --config "$run/cluster.yaml" --num-prompts "$prompts" --input-len "$input_len" \
    --output-len "$output_len" --max-concurrency "$concurrency" --ignore-eos --warmup 4 \
    --json "$out/serve_$v.json" 2>&1 | tail -25
  [[ ${PIPESTATUS[0]} == 0 ]] || rc=1
  keep_logs
  timeout 60 "$PETREL" stop "$run/cluster.yaml" > /dev/null 2>&1 || kill $head
  wait $head
done
exit $rc

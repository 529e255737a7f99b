#!/usr/bin/env bash
# One device run for Petrel's reference data (run from the repo root on the GPU machine):
#   1. golden fixtures (tools/make_golden.py, CPU fp32)      -> $OUT/golden.tar, $OUT/golden.log
#   2. a 20-second fortune-moe training smoke test            -> $OUT/smoke.log (stops here if it fails)
#   3. the full fortune-moe training run ($1 seconds)         -> $OUT/fortune-moe.tar, $OUT/train.log
# Needs device/ref/fortunes (the plain fortune files, carried).
# Usage: [VAL_EVERY=n] bash tools/device/ref_run.sh [train-seconds|0] [skip-golden|golden] [skip-smoke|smoke]
set -u
export PYTHONUNBUFFERED=1
PY=/opt/torch/.venv/bin/python3; [ -x "$PY" ] || PY=python3
OUT=${OUT:-/tmp/ref-out}; mkdir -p "$OUT"
TRAIN_S=${1:-240}
$PY -c "import sys,torch,transformers,safetensors; print(sys.executable, torch.__version__, transformers.__version__, safetensors.__version__, torch.cuda.get_device_name(0))"
nproc
if [ "${2:-}" != skip-golden ]; then
  rm -rf /tmp/g; mkdir -p /tmp/g
  timeout 240 $PY tools/make_golden.py --out /tmp/g/golden --probe > "$OUT/golden.log" 2>&1; echo "golden rc=$?"
  grep -v '^\[probe\] config.json' "$OUT/golden.log" | tail -c 3500
  tar -C /tmp/g -cf "$OUT/golden.tar" golden
fi
[ "$TRAIN_S" = 0 ] && exit 0
if [ "${3:-}" != skip-smoke ]; then
  timeout 150 $PY tools/train_fortunes.py train --corpus device/ref/fortunes --out /tmp/smoke --seconds 20 \
    --val-every 100 --samples 1 > "$OUT/smoke.log" 2>&1; rc=$?
  echo "smoke rc=$rc"; tail -c 2500 "$OUT/smoke.log"
  [ $rc = 0 ] || exit 1
fi
timeout $((TRAIN_S + 200)) $PY tools/train_fortunes.py train --corpus device/ref/fortunes --out /tmp/fortune-moe \
  --seconds "$TRAIN_S" --val-every "${VAL_EVERY:-250}" > "$OUT/train.log" 2>&1; echo "train rc=$?"
tail -c 4500 "$OUT/train.log"
tar -C /tmp -cf "$OUT/fortune-moe.tar" fortune-moe

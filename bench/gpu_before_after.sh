#!/usr/bin/env bash
# The state-tuning step of two versions of this repository on one GPU, in one call: an earlier
# checkout (BEFORE, e.g. unpacked with `git archive COMMIT | tar -x -C .peer/before` and carried
# to the GPU machine with .whl, the wheels) and this working tree, rwkv-jax rows only.
#   OUT=/some/dir BEFORE=.peer/before CONFIGS='^1.6B' BUDGET=250 bash bench/gpu_before_after.sh
# Results: train_step_<card>_<date>.json/md in $OUT/before and $OUT/after, and the logs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/before_after}"
BEFORE="${BEFORE:-.peer/before}"
CONFIGS="${CONFIGS:-^(1.6B|7B)}"
BUDGET="${BUDGET:-250}"
mkdir -p "$OUT/before" "$OUT/after"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv 2>&1 | tee "$OUT/gpu.txt"
for side in before after; do
  dir=$([[ $side == before ]] && echo "$BEFORE" || echo .)
  (cd "$dir" && PYTHONPATH=$PWD:$PYTHONPATH timeout $((BUDGET + 40)) python3 bench/train_step.py --impls rwkv-jax \
     --configs "$CONFIGS" --out "$OUT/$side" --budget_s "$BUDGET") > "$OUT/$side.log" 2>&1
  grep -E "rwkv-jax|Error|error" "$OUT/$side.log" | cut -c1-400
done

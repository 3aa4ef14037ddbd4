#!/usr/bin/env bash
# WKV-7 on the GPU machine, in one go (at most 8 minutes: tests ~1.5, fla's first autotuning ~4):
#   1. the GPU tests (compiled Pallas kernels and xla_chunked vs the fp64 reference)
#   2. bench/wkv7.py: pallas, RWKV-PEFT's CUDA rwkv7_state_clampw, fla's chunk_rwkv7 (as RWKV-PEFT
#      calls it) and xla_chunked, in that order (a row is written as it is timed, so a timeout
#      keeps what came before) -> "$OUT" and bench/results
# Needs .whl (fla wheels) and .peer/RWKV-PEFT (a checkout; PEFT=path overrides) carried along.
# Logs go to "$OUT".
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/wkv7_out}"
PEFT="${PEFT:-.peer/RWKV-PEFT}"
mkdir -p "$OUT"
status=0
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
source bench/autotune_cache.sh  # fla's Triton autotuning results, kept between calls

nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$OUT/gpu.txt"

timeout 150 python3 -m pytest -m gpu tests/test_wkv7.py -x -q -rA 2>&1 | tee "$OUT/pytest_gpu.log" || status=1

timeout 320 python3 bench/wkv7.py --out "$OUT" bench/results --peft_repo "$PEFT" 2>&1 | tee "$OUT/bench.log" || status=1

save_autotune
exit $status

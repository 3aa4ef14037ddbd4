#!/usr/bin/env bash
# WKV-6 on the GPU machine, in one go (at most 8 minutes, about 5 on an H100):
#   1. the GPU tests (compiled Pallas kernels and xla_chunked vs the fp64 reference)
#   2. bench/wkv6.py -> "$OUT" and bench/results (json + md), then a tiling sweep
#   3. registers and spills of each Pallas kernel: its Triton IR recompiled with the
#      installed triton and `ptxas -v` (the kernels XLA runs are built the same way)
# Logs go to "$OUT". SWEEP=0 / REGS=0 skip the optional parts.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/wkv6_out}"
mkdir -p "$OUT"
status=0
# fla (the peer) comes as wheels carried in .whl/ (see bench/gpu_train_step.sh).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
source bench/autotune_cache.sh  # fla's Triton autotuning results, kept between calls

nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$OUT/gpu.txt"

timeout 170 python3 -m pytest -m gpu tests/test_wkv6.py -x -q -rA 2>&1 | tee "$OUT/pytest_gpu.log" || status=1

sweep=(); [[ "${SWEEP:-1}" == 1 ]] && sweep=(--sweep)
timeout 250 python3 bench/wkv6.py --out "$OUT" bench/results "${sweep[@]}" 2>&1 | tee "$OUT/bench.log" || status=1

save_autotune

if [[ "${REGS:-1}" == 1 ]]; then
  timeout 60 python3 bench/wkv6.py --registers 2>&1 | tee "$OUT/registers.txt" || status=1
fi
exit $status

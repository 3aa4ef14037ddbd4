#!/usr/bin/env bash
# State-tuning step benchmark on the GPU machine: rwkv-jax vs RWKV-PEFT (--op cuda and --op fla).
#   OUT=/some/dir bash bench/gpu_train_step.sh [extra train_step.py flags, e.g. --quick]
# Carry [".whl", ".peer"]: .whl holds fla 0.6.0; .peer holds the RWKV-PEFT checkout
# (.peer/RWKV-PEFT, its commit in .peer/RWKV-PEFT.commit) and rwkv-fla, the package RWKV-PEFT
# imports as rwkvfla (.peer/wheels). rwkv-fla also ships a copy of fla under the name fla: it is
# installed apart and that copy deleted, so `import fla` stays 0.6.0.
# train_step.py stops starting configurations after --budget_s (450 s by default; 7B int8/nf4
# come last and are the first to be skipped) and spreads them over every visible GPU. On one GPU
# the RWKV-6 table does not fit one 10-minute call with both peer ops (row times: docs/performance.md,
# "Compile time"): it is two calls, the second repeating the first's baseline row, and RWKV-7 a third
# (carry bench/.triton_autotune so that rwkv-fla does not autotune again):
#   ... --configs '^1.6B' --budget_s 500
#   ... --configs '^(7B|3B)|^1.6B-1024x1-cp1-none$' --budget_s 470 --peer_ops cuda
#       (RWKV-PEFT's x060 --op fla crashes, docs/performance.md section 0: the first call shows it)
#   ... --configs '^x070' --budget_s 520
# Results: train_step_<card>_<date>.{json,md} in "$OUT" and bench/results; log in "$OUT".
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/train_step_out}"
mkdir -p "$OUT" bench/results

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/peer_site \
  .peer/wheels/*.whl && rm -rf /tmp/peer_site/fla
export PYTHONPATH=/tmp/site:$PWD:/tmp/peer_site
# RWKV-PEFT's --op cuda builds its kernels with torch's extension loader, which needs CUDA_HOME;
# its own guess (the parent of nvcc's folder) misses the toolkit where nvcc is a wrapper script.
[[ -z "${CUDA_HOME:-}" ]] && export CUDA_HOME="$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's|^#\$ _HERE_=\(.*\)/bin$|\1|p')"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # peak_bytes_in_use must be the step's own, not a pool
export TF_CPP_MIN_LOG_LEVEL=2
source bench/autotune_cache.sh  # fla's Triton autotuning results, kept between calls

nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv 2>&1 | tee "$OUT/gpu.txt"
timeout 570 python3 bench/train_step.py --out "$OUT" bench/results "$@" 2>&1 | tee "$OUT/train_step.log"
save_autotune

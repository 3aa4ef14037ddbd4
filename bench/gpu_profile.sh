#!/usr/bin/env bash
# Where the time and memory go, on the GPU machine (about 5 minutes on an H100):
#   bash bench/gpu_profile.sh ["profile_step.py flags" ...]   e.g. "--model 7B" "--ctx_len 512 --micro_bsz 8"
#   1. bench/profile_step.py for each quoted set of flags (default: the 1.6B step in bf16 and
#      nf4): memory accounting, XLA's memory-usage report of the step, GPU kernel time by kernel
#   2. the same kernel-time profile of the WKV kernels alone: WKV-6 at (1,1024,32,64), WKV-7 at
#      (1,1024,32,64) and (8,512,32,64)
#   3. bench/wkv6.py's configuration sweep (time and error) at the first two shapes
# Everything lands in "$OUT": profile.log, memory_*.txt, wkv6.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/profile_out}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$OUT/profile.log"
(( $# )) || set -- "--quant none" "--quant nf4"
for flags in "$@"; do
  # shellcheck disable=SC2086  # each argument is a set of flags
  timeout 150 python3 bench/profile_step.py $flags --dump --out "$OUT" > /dev/null
done
for wkv in "6 1,1024,32,64" "7 1,1024,32,64" "7 8,512,32,64"; do
  read -r version shape <<< "$wkv"
  timeout 90 python3 bench/profile_step.py --wkv_version "$version" --wkv "$shape" --out /tmp/profile_wkv > /dev/null
done
cat "$OUT"/profile_*.txt /tmp/profile_wkv/profile_*.txt >> "$OUT/profile.log"
rm -f "$OUT"/profile_*.txt
timeout "${SWEEP_S:-200}" python3 bench/wkv6.py --impls pallas --shapes 1,1024,32,64 8,512,32,64 \
  --reps 10 --sweep --sweep-seconds 170 --out /tmp/profile_wkv 2>&1 | tee "$OUT/wkv6.log"

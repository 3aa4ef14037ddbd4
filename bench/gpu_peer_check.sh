#!/usr/bin/env bash
# RWKV-PEFT's own state-tuning step (bench/rwkv_peft_step.py) on the GPU machine, to compare with
# the measured anchors (one H100, 2026-12-06: x060 1.6B 1024 x 1 --op cuda ~6,367 tok/s;
# x070 L24 C2048 512 x 8 --op cuda ~18,726 tok/s):
#   x060 1.6B (L24 C2048), ctx 1024 x 1, grad_cp 1
#   x070 L24 C2048,        ctx 512 x 8,  grad_cp 1
# once per op in OPS (default "cuda": each builds its CUDA kernel with nvcc first; "fla":
# rwkv-fla's first step autotunes for minutes, so give it a call of its own: OPS=fla).
#   OUT=/some/dir [OPS="cuda fla"] bash bench/gpu_peer_check.sh     (carry [".whl", ".peer"])
# Prints the RESULT lines (the last one of each run has the op check); logs in "$OUT".
# .peer is ignored by git; to make it from a clone of Joluck/RWKV-PEFT (GIT_DIR = its .git):
#   mkdir -p .peer/RWKV-PEFT && git --git-dir=$GIT_DIR archive HEAD | tar -x -C .peer/RWKV-PEFT
#   echo "Joluck/RWKV-PEFT@$(git --git-dir=$GIT_DIR rev-parse HEAD)" > .peer/RWKV-PEFT.commit
#   python3 -m pip download --no-deps --only-binary=:all: -d .peer/wheels rwkv-fla==0.7.202508221413
# (rwkv-fla: the version RWKV-PEFT's uv.lock pins, and the newest; it is pure Python.)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/peer_check_out}"
mkdir -p "$OUT"
status=0

# As bench/gpu_train_step.sh: fla 0.6.0 from .whl, rwkv-fla apart without its copy of fla.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/peer_site \
  .peer/wheels/*.whl && rm -rf /tmp/peer_site/fla
export PYTHONPATH=/tmp/site:$PWD:/tmp/peer_site
# torch's extension loader needs CUDA_HOME; its own guess (the parent of nvcc's folder) misses the
# toolkit where nvcc is a wrapper script, so ask nvcc where it runs from.
[[ -z "${CUDA_HOME:-}" ]] && export CUDA_HOME="$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's|^#\$ _HERE_=\(.*\)/bin$|\1|p')"
source bench/autotune_cache.sh  # fla's Triton autotuning results, kept between calls

nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv 2>&1 | tee "$OUT/gpu.txt"
echo "CUDA_HOME=${CUDA_HOME:-unset} nvcc: $(nvcc --version 2>&1 | tail -1)" | tee -a "$OUT/gpu.txt"

run() {  # name, then rwkv_peft_step.py flags
  local name=$1; shift
  echo "== $name"
  timeout "${PEER_TIMEOUT_S:-280}" python3 bench/rwkv_peft_step.py --peft_repo .peer/RWKV-PEFT "$@" \
    > "$OUT/$name.log" 2>&1 || { status=1; tail -5 "$OUT/$name.log"; }
  grep '^RESULT ' "$OUT/$name.log" | tee -a "$OUT/results.jsonl"
}

for op in ${OPS:-cuda}; do
  run "x060-1.6B-1024x1-cp1-$op" --version x060 --n_layer 24 --n_embd 2048 --ctx_len 1024 --micro_bsz 1 --grad_cp 1 --op "$op"
  run "x070-L24C2048-512x8-cp1-$op" --version x070 --n_layer 24 --n_embd 2048 --ctx_len 512 --micro_bsz 8 --grad_cp 1 --op "$op"
done

save_autotune
exit $status

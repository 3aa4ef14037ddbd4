# Sourced by the bench/gpu_*.sh scripts (from the repository root): keeps Triton's autotuning
# results for fla's and rwkv-fla's kernels between calls. They autotune each kernel for each new
# shape, ~200 s a shape on a fresh machine, and again in every new process unless the results are
# on disk: fla 0.6 writes them to Triton's cache on its own, rwkv-fla (RWKV-PEFT's --op fla) only
# with TRITON_CACHE_AUTOTUNING=1. `save_autotune` puts them (a few KB of JSON, valid for this card
# and these triton/fla versions) in "$OUT/triton_autotune.tgz": unpack that into
# bench/.triton_autotune (ignored by git) and carry the folder to skip the tuning next time.
export TRITON_CACHE_DIR=/tmp/triton_cache TRITON_CACHE_AUTOTUNING=1
mkdir -p "$TRITON_CACHE_DIR"
if [[ -d bench/.triton_autotune ]]; then cp -r bench/.triton_autotune/. "$TRITON_CACHE_DIR"/; fi
save_autotune() { (cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' | tar czf "$OUT/triton_autotune.tgz" -T -); }

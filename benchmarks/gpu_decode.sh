#!/usr/bin/env bash
# The decoding checks on one GPU at 350m, in two halves that each fit one 10-minute device command (each half's part
# limits add up to at most 570 s, tested), the more decisive first (a session's device time may not stretch to the
# second):
#   HALF=1 (~9 min): the fused Triton kernels' tests and the persistent step's (every tile configuration in a
#          replayed CUDA graph; whole steps with every launch option on; persistent steps against the forward, and
#          decoding through them, eager and in a CUDA graph);
#          benchmarks/persistent_step.py (one step in one launch under several tilings against the kernels one by
#          one and the bandwidth bound, mid-image, 2 and 16 rows);
#          benchmarks/generation.py in fused-graph (the CUDA default) once per set of launch options of
#          $FUSED_OPTIONS (model/fused_launch.py: the persistent step, the next weights prefetched into L2, the
#          split kernels, programmatic dependent launch), and reduce-overhead, with the full "8 candidates + VQGAN +
#          CLIP re-ranking" row when open_clip_torch is installed, all in one process;
#          benchmarks/fused_linear.py (each linear launch under every tile configuration, against cuBLAS and the
#          bandwidth bound);
#   HALF=2 (~9 min): benchmarks/fused_attention.py (the attention kernel over a filling cache, split or not); the
#          other CUDA decode modes' tests against eager, the max-autotune test (minutes of compilation), the
#          per-kernel profile of a decode step in the middle of an image (fused, reduce-overhead); generation.py with
#          max-autotune; the floor under a decode step (benchmarks/decode_floor.py: matmuls alone, + pointwise, +
#          cache, + attention, against the real step in the graph and fused-graph modes and the bandwidth bound).
# HALF=all (the default) runs both. Each part has its own time limit (override with KERNELS_LIMIT, PERSISTENT_LIMIT,
# BENCH_LIMIT, LINEAR_LIMIT, ATTENTION_LIMIT, TESTS_LIMIT, TUNE_TESTS_LIMIT, PROFILE_LIMIT, TUNE_LIMIT, FLOOR_LIMIT;
# 0 skips a part). Results go to $OUT (or ./gpu_results; HALF=1 writes 7 files, a log per part and three JSON
# tables). Run from the repository root with a Python that has torch; wheels in .gpu_wheels/
# (benchmarks/fetch_gpu_wheels.sh) are installed first when present.
# Exits 2 at once without a CUDA device or for another HALF, 1 when a part failed or ran out of time
# (benchmarks/gpu_common.sh).
HALF=${HALF:-all}
case "$HALF" in all | 1 | 2) ;; *) echo "$0: HALF=$HALF: use 1, 2 or all" >&2; exit 2 ;; esac  # else it ran nothing
source "$(dirname "$0")/gpu_common.sh"
need_gpu
FUSED_OPTIONS=${FUSED_OPTIONS:-base,persistent,prefetch+splits,pdl+splits+prefetch}
first() { [ "$HALF" = all ] || [ "$HALF" = 1 ]; }
second() { [ "$HALF" = all ] || [ "$HALF" = 2 ]; }
nvidia-smi -L
[ -d .gpu_wheels ] && $PY -m pip install -q --no-deps --no-index --find-links .gpu_wheels open_clip_torch ftfy wcwidth regex 2>&1 | tail -2
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
if first; then
  TAIL=40 part kernels "${KERNELS_LIMIT:-170}" env CM3LEON_FUSED_SPLITS=1 $PY -m pytest \
    tests/model/test_fused_decode.py tests/model/test_persistent_decode.py tests/generation/test_sampling_kernel.py \
    tests/model/test_fused_launch.py -q -p no:cacheprovider
  TAIL=40 part persistent "${PERSISTENT_LIMIT:-100}" $PY benchmarks/persistent_step.py --preset 350m \
    --json "$OUT/persistent_step.json"
  TAIL=40 part generation "${BENCH_LIMIT:-200}" $PY benchmarks/generation.py --presets 350m \
    --modes fused-graph,reduce-overhead --fused-options "$FUSED_OPTIONS" --attention sdpa --repeats 2 \
    --reference-tokens 0 --json "$OUT/generation.json"
  TAIL=60 part linear "${LINEAR_LIMIT:-50}" $PY benchmarks/fused_linear.py --preset 350m \
    --json "$OUT/fused_linear.json"
fi
if second; then
  TAIL=30 part attention "${ATTENTION_LIMIT:-40}" $PY benchmarks/fused_attention.py --preset 350m \
    --json "$OUT/fused_attention.json"
  TAIL=40 part tests "${TESTS_LIMIT:-120}" $PY -m pytest tests/generation/test_generate.py \
    tests/generation/test_graphs.py tests/model/test_flex_attention.py -q -p no:cacheprovider -x \
    -k "(compiled or graph or cache or autotuned or flex or fused or bf16 or refused or default) and not max"
  TAIL=20 part tune_tests "${TUNE_TESTS_LIMIT:-100}" $PY -m pytest tests/generation/test_generate.py -q \
    -p no:cacheprovider -k "autotuned and max"
  TAIL=120 part profile "${PROFILE_LIMIT:-100}" $PY benchmarks/decode_profile.py --preset 350m \
    --modes fused,reduce-overhead --attention sdpa --warmup 480 --steps 32 --rows 30 --out "$OUT/profile"
  part max_autotune "${TUNE_LIMIT:-120}" $PY benchmarks/generation.py --presets 350m --modes max-autotune \
    --repeats 2 --reference-tokens 0 --no-rerank --json "$OUT/generation_max_autotune.json"
  TAIL=40 part floor "${FLOOR_LIMIT:-80}" $PY benchmarks/decode_floor.py --preset 350m --attention sdpa,flex \
    --json "$OUT/decode_floor.json"
fi
finish

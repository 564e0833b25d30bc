#!/usr/bin/env bash
# The GPU checks and benchmarks, in two halves that each fit one 10-minute device command (each half's part limits
# add up to at most 570 s, tested):
#   HALF=1 (~5-8 min): benchmarks/gpu_model_check.py, the FSDP tests, the compiled/cache decode tests, the training
#          step at tiny and 350m (4096 tokens);
#   HALF=2 (~4-7 min): the 350m forward (CUDA graph), the VQGAN, generation.py at tiny and 350m in eager, graph and
#          reduce-overhead.
# HALF=all (the default) runs both. Each part has its own time limit, so one slow part cannot hide the others
# (override with MODEL_CHECK_LIMIT, FSDP_LIMIT, COMPILED_LIMIT, TRAIN_LIMIT, FORWARD_LIMIT, VQGAN_LIMIT,
# GENERATION_LIMIT; 0 skips a part). Results go to $OUT (or ./gpu_results). Run from the repository root with a
# Python that has torch + lightning (the package itself is used from the checkout via PYTHONPATH).
# Exits 2 at once without a CUDA device or for another HALF, 1 when a part failed or ran out of time
# (benchmarks/gpu_common.sh).
HALF=${HALF:-all}
case "$HALF" in all | 1 | 2) ;; *) echo "$0: HALF=$HALF: use 1, 2 or all" >&2; exit 2 ;; esac  # else it ran nothing
source "$(dirname "$0")/gpu_common.sh"
need_gpu
nvidia-smi -L
$PY -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__, torch.cuda.get_device_name())"
if [ "$HALF" != 2 ]; then
  part model_check "${MODEL_CHECK_LIMIT:-100}" $PY benchmarks/gpu_model_check.py
  part fsdp_test "${FSDP_LIMIT:-140}" $PY -m pytest tests/modules/test_fsdp.py -q -p no:cacheprovider -x
  part compiled_test "${COMPILED_LIMIT:-180}" $PY -m pytest tests/generation/test_generate.py -q -p no:cacheprovider \
    -k "compiled or cache" -x
  part train_step "${TRAIN_LIMIT:-150}" $PY benchmarks/train_step.py --presets tiny 350m --batch-size 4 --seq-len 4096 \
    --steps 12 --json "$OUT/train_step.json"
fi
if [ "$HALF" != 1 ]; then
  part model_forward "${FORWARD_LIMIT:-120}" $PY benchmarks/model_forward.py --preset 350m --device cuda \
    --dtype bfloat16 --seq 4096 --batch 2 --cuda-graph
  part vqgan "${VQGAN_LIMIT:-90}" $PY benchmarks/vqgan.py --device cuda --batch-size 32 --dtype bfloat16
  part generation "${GENERATION_LIMIT:-360}" $PY benchmarks/generation.py --presets tiny,350m \
    --modes eager,graph,reduce-overhead --repeats 1 --reference-tokens 64 --json "$OUT/generation.json"
fi
finish

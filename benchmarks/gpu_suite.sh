#!/usr/bin/env bash
# The GPU checks and benchmarks in one run (about 6-8 minutes on one H100/H200). Each part has its own time limit,
# so one slow part cannot hide the others. Results go to $OUT (or ./gpu_results). Run from the repository root with
# a Python that has torch + lightning (the package itself is used from the checkout via PYTHONPATH).
# Exits 2 at once without a CUDA device, 1 when a part failed or ran out of time (benchmarks/gpu_common.sh).
source "$(dirname "$0")/gpu_common.sh"
need_gpu
nvidia-smi -L
$PY -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__, torch.cuda.get_device_name())"
part model_check 120 $PY benchmarks/gpu_model_check.py
part fsdp_test 150 $PY -m pytest tests/modules/test_fsdp.py -q -p no:cacheprovider -x
part compiled_test 180 $PY -m pytest tests/generation/test_generate.py -q -p no:cacheprovider -k "compiled or cache" -x
part train_step 150 $PY benchmarks/train_step.py --presets tiny 350m --batch-size 4 --seq-len 4096 --steps 12 --json "$OUT/train_step.json"
part model_forward 120 $PY benchmarks/model_forward.py --preset 350m --device cuda --dtype bfloat16 --seq 4096 --batch 2 --cuda-graph
part vqgan 90 $PY benchmarks/vqgan.py --device cuda --batch-size 32 --dtype bfloat16
part generation 360 $PY benchmarks/generation.py --presets tiny,350m --modes eager,graph,reduce-overhead --repeats 1 \
  --reference-tokens 64 --json "$OUT/generation.json"
finish

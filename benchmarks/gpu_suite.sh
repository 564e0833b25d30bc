#!/usr/bin/env bash
# The GPU checks and benchmarks in one run (about 6-8 minutes on one H100/H200). Each part has its own time limit,
# so one slow part cannot hide the others. Results go to $OUT (or ./gpu_results). Run from the repository root with
# a Python that has torch + lightning (the package itself is used from the checkout via PYTHONPATH).
set -u
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
run() {  # run NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s)"
  local t0=$(date +%s)
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | grep -v "^WARNING\|Warning:\|warnings.warn" | tail -40
  echo "=== $name: exit ${PIPESTATUS[0]} in $(( $(date +%s) - t0 ))s"
}
nvidia-smi -L
$PY -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__, torch.cuda.get_device_name())"
run model_check 120 $PY benchmarks/gpu_model_check.py
run fsdp_test 150 $PY -m pytest tests/modules/test_fsdp.py -q -p no:cacheprovider -x
run compiled_test 180 $PY -m pytest tests/generation/test_generate.py -q -p no:cacheprovider -k "compiled or cache" -x
run train_step 150 $PY benchmarks/train_step.py --presets tiny 350m --batch-size 4 --seq-len 4096 --steps 12 --json "$OUT/train_step.json"
run model_forward 120 $PY benchmarks/model_forward.py --preset 350m --device cuda --dtype bfloat16 --seq 4096 --batch 2 --cuda-graph
run vqgan 90 $PY benchmarks/vqgan.py --device cuda --batch-size 32 --dtype bfloat16
run generation 360 $PY benchmarks/generation.py --presets tiny,350m --modes eager,graph,reduce-overhead --repeats 1 \
  --reference-tokens 64 --json "$OUT/generation.json"

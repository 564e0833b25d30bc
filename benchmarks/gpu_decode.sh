#!/usr/bin/env bash
# The decoding checks on one GPU (about 5-6 minutes at 350m): the graph/compiled decode modes against eager in the
# tests, then benchmarks/generation.py over every mode with torch's perf hints (they name why CUDA graphs would be
# skipped). Results go to $OUT (or ./gpu_results). Run from the repository root with a Python that has torch.
set -u
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi -L
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
echo "=== tests"
timeout 200 $PY -m pytest tests/generation/test_generate.py tests/generation/test_graphs.py -q -p no:cacheprovider \
  -k "compiled or graph or cache" 2>&1 | tail -15
echo "=== generation benchmark"
TORCH_LOGS=perf_hints timeout ${BENCH_LIMIT:-360} $PY benchmarks/generation.py --presets ${PRESETS:-350m} \
  --modes ${MODES:-eager,graph,inductor-graph,reduce-overhead} --repeats 1 --reference-tokens 0 \
  --json "$OUT/generation.json" 2>&1 | grep -v "Warning\|warnings.warn" | tee "$OUT/generation.log" | tail -60

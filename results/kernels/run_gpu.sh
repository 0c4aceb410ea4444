#!/bin/bash
# Everything in results/kernels/ in one call on one GPU (device tool; carry .whl and .kvcap): the kernel tests on the
# GPU, then the full benchmark and the quantize warps sweep. Run from the repository root; writes $OUT_DIR.
set -o pipefail
source results/jct/gpu_env.sh
OUT_DIR=${OUT_DIR:-runs/kernels_gpu}
mkdir -p $OUT_DIR
TRITON_INTERPRET=0 timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_*.py 2>&1 \
  | tail -5 | tee $OUT_DIR/gpu_tests.txt
timeout ${BENCH_TIMEOUT:-330} python3 -m hack_kernels.bench --out $OUT_DIR/full --models llama31_8b llama31_70b \
  --contexts 4096 16384 32768 65536 131072 --batches 1 8 --operands int8 fp16 fp8 --num-warps 2 \
  --variant-contexts 32768 131072 --replays 10 --time-budget-s 240 --compile-workers 14 2>&1 | tail -60

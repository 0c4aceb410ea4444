#!/bin/bash
# Blocks per loop step (NB) of the HACK decode kernel, one call on one GPU (device tool; carry .whl): the decode-kernel
# tests on the GPU, then one process timing BF16 SDPA and HACK fp16 operands with NB = 1, 2, 4 (Llama-3.1-8B shapes;
# 2/4-bit, Π = 64/128, 32K-128K, batch 1 and 8; µs, speed-up vs SDPA, error vs fp32). Run from the repository root;
# writes $OUT_DIR. Under 4 minutes (the timeouts); tune prints as it goes, the largest contexts first.
set -o pipefail
source results/jct/gpu_env.sh
OUT_DIR=${OUT_DIR:-runs/kernels_nb}
mkdir -p $OUT_DIR
TRITON_INTERPRET=0 timeout 90 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_decode.py 2>&1 \
  | tail -5 | tee $OUT_DIR/gpu_tests.txt
timeout ${BENCH_TIMEOUT:-140} python3 -m hack_kernels.tune --model llama31_8b --operands fp16 --stages 3 \
  --blocks-per-iter 1 2 4 --bits 2 4 --partition 64 128 \
  --points 131072x1 131072x8 32768x1 32768x8 65536x1 65536x8 2>&1 | tee $OUT_DIR/nb.txt

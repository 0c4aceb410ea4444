#!/bin/bash
# Programs per SM ("waves", which sets the number of KV splits) of the HACK decode kernel, one call on one GPU
# (device tool; carry .whl): the decode-kernel tests on the GPU, then one process timing BF16 SDPA and HACK 2-bit
# Π=64 fp16 operands NB=2 over WAVES (default 1-16) and STAGES (default 2 3), Llama-3.1-8B shapes at POINTS
# (CONTEXTxBATCH); AGAINST=FILE also times another version of kernels/decode.py at its defaults (tune --against).
# Run from the repository root; writes $OUT_DIR.
set -o pipefail
source results/jct/gpu_env.sh
OUT_DIR=${OUT_DIR:-runs/kernels_waves}
mkdir -p $OUT_DIR
TRITON_INTERPRET=0 timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_decode.py \
  tests/test_kernels_fp16_decode.py tests/test_kernels_kivi.py 2>&1 | tail -5 | tee $OUT_DIR/gpu_tests.txt
timeout ${BENCH_TIMEOUT:-200} python3 -m hack_kernels.tune --model llama31_8b --operands fp16 \
  --stages ${STAGES:-2 3} --blocks-per-iter 2 --bits 2 --partition 64 --waves ${WAVES:-1 2 3 4 6 8 12 16} \
  --points ${POINTS:-32768x1 65536x1 131072x1 16384x1} ${AGAINST:+--against $AGAINST} 2>&1 | tee $OUT_DIR/waves.txt

#!/bin/bash
# The GPU runs of results/jct (2 GPUs: prefill on cuda:0, decode on cuda:1, NCCL, 10 Gbps emulated link).
# Run from the repository root on a machine with 2 GPUs; writes runs/jct_gpu/ and prints one line per run.
# Needs omegaconf (the device machines lack it): wheels in .whl/ are installed to /tmp/site first.
set -o pipefail
source results/jct/gpu_env.sh
OUT_DIR=${OUT_DIR:-runs/jct_gpu}
# 1. smoke: tiny model over NCCL, every code path, seconds
python3 -m hack_cli.serve.bench_gpu --model tiny --trace small --cluster gpu2 --out $OUT_DIR/smoke \
  --run fp16:4:10:3 --run hack:4:10:3 || exit 1
# 2. Llama-3.1-8B architecture (random bf16 weights), the long preset's lengths, first N requests of its trace
timeout ${MAIN_TIMEOUT:-420} python3 -m hack_cli.serve.bench_gpu --model llama31_8b --weights random --dtype bfloat16 \
  --cluster gpu2 --trace long --warmup 1 --out $OUT_DIR/llama31_8b \
  ${RUNS:---run fp16:0.3:10:6 --run hack:0.3:10:6 --run fp16:0.65:10:8 --run hack:0.65:10:8 \
  --run kivi:0.3:10:6 --run fp8:0.3:10:6 --run kvquant:0.3:10:6 --run cachegen:0.3:10:3}

#!/bin/bash
# The graph-engine GPU runs of results/jct §2d (2 GPUs: prefill on cuda:0, decode on cuda:1, NCCL, an emulated
# link). Run from the repository root on a machine with 2 GPUs; writes $OUT_DIR and prints one line per run.
# PART=rates: the long preset (24 requests, 3 warm-up) at 0.3 and 0.6 req/s over 10 Gbps, fp16 and HACK.
# PART=cachegen: CacheGen at 0.3 req/s (its CPU entropy coder takes ~60 s a request at 8B/15K: see README §2e).
# PART=bandwidth: 8 requests (1 warm-up) at 0.3 req/s over 25, 50 and 100 Gbps, and 6 over 1 Gbps.
# PART=fp16dot: the long preset at 10 Gbps: HACK with fp16 dot operands (quant.operand=fp16) and fp16 at 0.3 and
#   0.45 req/s, then KIVI (graph engine) at 0.3.
# PART=short: the short preset (40 requests, 3 warm-up) at 10 Gbps: fp16 and HACK (fp16 operands) at 0.75 and 0.5
#   req/s, then CacheGen (10 requests) at 0.25 and KIVI at 0.5.
# PART=baselines: the short preset at 10 Gbps: KIVI at 0.75 and 0.5 req/s, CacheGen (10 requests) at 0.5.
# PART=peers: the long preset: KIVI at 0.45 req/s over 10 Gbps, 8 requests (1 warm-up) over 50 Gbps and 6 over
#   1 Gbps of HACK (fp16 operands), KIVI and fp16 (50 Gbps only: over 1 Gbps fp16 needs ~16 s a request, §2d has
#   it), then CacheGen (its coder on a process pool) at the three bandwidths.
# Needs omegaconf (the device machines lack it): wheels in .whl/ are installed to /tmp/site first.
set -o pipefail
source results/jct/gpu_env.sh
OUT_DIR=${OUT_DIR:-runs/jct_gpu_graph}
COMMON="--model llama31_8b --weights random --dtype bfloat16 --cluster gpu2 --trace long"
case ${PART:-rates} in
  rates)
    timeout ${MAIN_TIMEOUT:-560} python3 -m hack_cli.serve.bench_gpu $COMMON --warmup 3 --out $OUT_DIR/rates \
      --run hack:0.6:10:24 --run fp16:0.6:10:24 --run hack:0.3:10:24 --run fp16:0.3:10:24 ;;
  fp16dot)
    timeout ${MAIN_TIMEOUT:-560} python3 -m hack_cli.serve.bench_gpu $COMMON --warmup 3 --out $OUT_DIR/fp16dot \
      --run hack,operand=fp16:0.3:10:24 --run fp16:0.3:10:24 --run hack,operand=fp16:0.45:10:24 \
      --run fp16:0.45:10:24 --run kivi:0.3:10:24 ;;
  short)
    timeout ${MAIN_TIMEOUT:-560} python3 -m hack_cli.serve.bench_gpu ${COMMON/long/short} --warmup 3 \
      --out $OUT_DIR/short --run fp16:0.75:10:40 --run hack,operand=fp16:0.75:10:40 --run fp16:0.5:10:40 \
      --run hack,operand=fp16:0.5:10:40 --run cachegen:0.25:10:10 --run kivi:0.5:10:40 ;;
  baselines)
    timeout ${MAIN_TIMEOUT:-560} python3 -m hack_cli.serve.bench_gpu ${COMMON/long/short} --warmup 3 \
      --out $OUT_DIR/baselines --run kivi:0.75:10:40 --run kivi:0.5:10:40 --run cachegen:0.5:10:10 ;;
  peers)
    df -h /dev/shm /tmp | tail -2
    timeout ${MAIN_TIMEOUT:-580} python3 -m hack_cli.serve.bench_gpu $COMMON --warmup 3 --out $OUT_DIR/peers \
      --run kivi:0.45:10:24 --run hack,operand=fp16:0.3:50:8:1 --run kivi:0.3:50:8:1 --run fp16:0.3:50:8:1 \
      --run hack,operand=fp16:0.3:1:6:1 --run kivi:0.3:1:6:1 --run cachegen:0.3:10:24 --run cachegen:0.3:50:8:1 \
      --run cachegen:0.3:1:6:1 ;;
  cachegen)
    timeout ${MAIN_TIMEOUT:-580} python3 -m hack_cli.serve.bench_gpu $COMMON --warmup 3 --out $OUT_DIR/rates \
      --run cachegen:0.3:10:24 ;;
  bandwidth)
    timeout ${MAIN_TIMEOUT:-520} python3 -m hack_cli.serve.bench_gpu $COMMON --warmup 1 --out $OUT_DIR/bandwidth \
      --run hack:0.3:100:8 --run fp16:0.3:100:8 --run hack:0.3:50:8 --run fp16:0.3:50:8 \
      --run hack:0.3:25:8 --run fp16:0.3:25:8 --run hack:0.3:1:6 --run fp16:0.3:1:6 ;;
esac

#!/bin/bash
# The graph-engine GPU runs of results/jct §2d (2 GPUs: prefill on cuda:0, decode on cuda:1, NCCL, an emulated
# link). Run from the repository root on a machine with 2 GPUs; writes $OUT_DIR and prints one line per run.
# PART=rates: the long preset (24 requests, 3 warm-up) at 0.3 and 0.6 req/s over 10 Gbps, fp16 and HACK.
# PART=bandwidth: 8 requests (1 warm-up) at 0.3 req/s over 25, 50 and 100 Gbps, and 6 over 1 Gbps.
# Needs omegaconf (the device machines lack it): wheels in .whl/ are installed to /tmp/site first.
set -o pipefail
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
mkdir -p /tmp/pkgs && ln -sfn $PWD/conf /tmp/pkgs/hack_conf && ln -sfn $PWD/kernels /tmp/pkgs/hack_kernels
export PYTHONPATH=/tmp/pkgs:$PWD:${PYTHONPATH}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT_DIR=${OUT_DIR:-runs/jct_gpu_graph}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
COMMON="--model llama31_8b --weights random --dtype bfloat16 --cluster gpu2 --trace long"
case ${PART:-rates} in
  rates)
    timeout ${MAIN_TIMEOUT:-520} python3 -m hack_cli.serve.bench_gpu $COMMON --warmup 3 --out $OUT_DIR/rates \
      --run hack:0.3:10:24 --run fp16:0.3:10:24 --run hack:0.6:10:24 --run fp16:0.6:10:24 ;;
  bandwidth)
    timeout ${MAIN_TIMEOUT:-520} python3 -m hack_cli.serve.bench_gpu $COMMON --warmup 1 --out $OUT_DIR/bandwidth \
      --run hack:0.3:100:8 --run fp16:0.3:100:8 --run hack:0.3:50:8 --run fp16:0.3:50:8 \
      --run hack:0.3:25:8 --run fp16:0.3:25:8 --run hack:0.3:1:6 --run fp16:0.3:1:6 ;;
esac

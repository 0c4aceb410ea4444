# Sourced by the GPU run scripts: what a device machine lacks for `hack_cli.serve.bench_gpu`. Run from the
# repository root. Installs the omegaconf/antlr4/constriction wheels carried in .whl/ to /tmp/site, exposes conf/
# and kernels/ under their install names (the repo is not pip-installed there), and keeps NVLink multicast off.
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
mkdir -p /tmp/pkgs && ln -sfn $PWD/conf /tmp/pkgs/hack_conf && ln -sfn $PWD/kernels /tmp/pkgs/hack_kernels
export PYTHONPATH=/tmp/pkgs:$PWD:${PYTHONPATH}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

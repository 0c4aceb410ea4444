#!/bin/bash
# The H100 cost profile (results/profiles/h100_llama31_8b.json) in one call on a 2-GPU device machine: two
# profiler processes, one per GPU, then one merged file. Run from the repository root with `.whl/` carried (the
# omegaconf, antlr4 and constriction wheels). About 2 device-minutes on a warm machine. Take it with the same
# tree as the measured runs it is to be compared with (e.g. right after results/jct/run_gpu.sh, in the same call).
set -o pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --target /tmp/wh .whl/*.whl
ln -sfn "$PWD/kernels" /tmp/wh/hack_kernels; ln -sfn "$PWD/conf" /tmp/wh/hack_conf
export PYTHONPATH=/tmp/wh:$PWD
OUT=${OUT:-runs/profile_gpu}; mkdir -p "$OUT"
P="python3 -m hack_cli.sim.profile --model llama31_8b --lengths 512,2048,4096,8192,16384 --contexts 2048,16384 \
   --batches 1,4,8 --repeats 2 --decode-steps 3 --device cuda:0 --time-budget ${BUDGET_S:-100}"
CUDA_VISIBLE_DEVICES=0 $P --methods fp16,hack,kivi,hack:partition=32 --out "$OUT/p0.json" > "$OUT/log0.txt" 2>&1 &
CUDA_VISIBLE_DEVICES=1 $P --methods fp8,kvquant,hack:partition=128,hack_v1 --out "$OUT/p1.json" > "$OUT/log1.txt" 2>&1 &
wait
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1]); merged = None
for f in ("p0.json", "p1.json"):
    if (out / f).exists():
        d = json.loads((out / f).read_text())
        merged = merged or {**d, "methods": {}}
        merged["methods"].update(d["methods"])
(out / "h100_llama31_8b.json").write_text(json.dumps(merged, indent=1) + "\n")
print("methods:", list(merged["methods"]))
PY
tail -n 30 "$OUT/log0.txt" "$OUT/log1.txt"

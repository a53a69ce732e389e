#!/usr/bin/env bash
# Every performance figure of this project on one GPU, in one command (within a budget of 8 minutes,
# GPU_SUITE_BUDGET_S), as ratios against torchtitan measured in the same run on the same GPU:
#   1. torchtitan 0.2.2's own trainer (bench/titan_baseline/), eager and compiled, Llama-3.2-1B
#      shapes, seq 4096, local batch 4, selective AC;
#   2. our trainer, same shapes and settings, layerskip=none, eager and compiled;
#   3. our trainer with the paper's continual-pretraining setting (p_max 0.1, rotational R=8,
#      e_scale 0.1), compiled;
#   4. bench/layerskip_cost.py in bf16 on the same shapes;
#   5. the dry run's memory estimate of run 2 (python -m train parallel.dry_run=1), to hold
#      against the measured peak;
#   6. bench/smollm2_speed.py on a random tied Llama of SmolLM2's shape (fp32, 4 x 128 tokens):
#      Hugging Face's plain LlamaForCausalLM step against our trainer, LayerSkip off and on, and
#      validation of every exit against its FLOP bound (needs transformers);
#   7. bench/document_mask_cost.py: the continual_llama3_2_1b recipe's step (Llama 3.2 1B, seq
#      4096, batch 4, its LayerSkip) with document masking (FlexAttention) against causal
#      attention, eager blocks (FlexAttention itself is compiled), packed documents of 1024
#      tokens on average;
#   8. bench/decode_speed.py in bf16: plain and self-speculative decoding, greedy and sampled, batch 1
#      and 8, beside transformers' assistant_early_exit and assisted generation with the draft
#      folder. On a quickstart run directory or export named by GPU_SUITE_DECODE_MODEL
#      (GPU_SUITE_DECODE_EXIT/_DRAFT, default 6 and 4); without one, on random weights of the
#      quickstart shape (engine speed only: acceptance is meaningless there).
# It writes suite.json, suite.md (the table of ratios against the targets) and suite.log into
# --out, and keeps runs, logs and data in a work folder (GPU_SUITE_WORK, default /tmp/gpu_suite).
#
#   on a GPU node:        bash bench/gpu_suite.sh --out DIR
#   without a GPU:        bash bench/gpu_suite.sh --dry-run --out DIR   # the same steps, tiny shapes
#   GPU node offline:     bash bench/fetch_wheels.sh   # first, where PyPI can be reached
#
# Nothing is installed. Packages come from the Python that runs the suite (PYTHON, default python3:
# torch, and, for a checkout installed with `pip install -e .`, everything else); wheels fetched by
# bench/fetch_wheels.sh into .gpu_suite/ (GPU_SUITE_KIT), if present, are unpacked with
# `python -m zipfile` into the work folder and come first.
# --dry-run: the same steps on a CPU with tiny shapes and a few steps (torchtitan in its CPU mode,
# fp32). The compiled runs are skipped there (an inductor compile on a few cores takes minutes;
# GPU_SUITE_DRY_COMPILE=1 runs them too); they differ from the eager ones by one flag. The paper
# setting runs eager. Figures from a dry run are not measurements.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

DRY=0
RESULTS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) RESULTS="$2"; shift ;;
    --out=*) RESULTS="${1#--out=}" ;;
    -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
    *) echo "gpu_suite: unknown argument $1 (use --dry-run, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done
RESULTS="${RESULTS:-$ROOT/outputs/gpu_suite$([ $DRY = 1 ] && echo _dry)}"
WORK="${GPU_SUITE_WORK:-/tmp/gpu_suite$([ $DRY = 1 ] && echo _dry)}"
KIT="${GPU_SUITE_KIT:-$ROOT/.gpu_suite}"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
BUDGET_S="${GPU_SUITE_BUDGET_S:-480}"  # steps that would start past it are skipped, and reported
mkdir -p "$RESULTS"
if [ -d "$WORK" ] && [ -n "$(ls -A "$WORK")" ] && [ ! -f "$WORK/.gpu_suite_work" ]; then
  echo "gpu_suite: $WORK exists and is not a suite work folder; set GPU_SUITE_WORK elsewhere" >&2; exit 2
fi
rm -rf "$WORK"; mkdir -p "$WORK"; touch "$WORK/.gpu_suite_work"  # each run starts from nothing
LOG="$RESULTS/suite.log"
: > "$LOG"
START=$(date +%s)
say() { echo "[gpu_suite $(date +%T)] $*" | tee -a "$LOG"; }

# ---- torchtitan's side: its own trainer with the configuration kept in bench/titan_baseline/
ANCHOR="$ROOT/bench/titan_baseline"
TITAN_WHEELS=""
if ls "$KIT"/wheels/titan/torchtitan-*.whl >/dev/null 2>&1; then TITAN_WHEELS="$KIT/wheels/titan"; fi
if [ -z "$TITAN_WHEELS" ] && ! "$PY" -c "import torchtitan, torchdata, tyro" 2>/dev/null; then
  say "no torchtitan 0.2.2 for $PY: install the project (pip install -e .) or run bash bench/fetch_wheels.sh first"
  exit 1
fi

# ---- shapes: the real ones on a GPU, tiny ones (same code paths) in a dry run
if [ $DRY = 1 ]; then
  # torchtitan's CPU mode (bench/titan_baseline/cpu_shim.py), fp32 (bf16 matmuls crawl on a CPU), on its "cmp" flavor: a Llama
  # shaped by CMP_*, and our model built to the same shape, so even the dry run compares like
  # with like (n_kv_heads = n_heads, multiple_of 256, no FFN multiplier, rope theta 1e4).
  export BENCH_CPU_SHIM=1 CMP_DIM=64 CMP_LAYERS=2 CMP_HEADS=4 CMP_VOCAB=512
  export EXTRA="--training.mixed_precision_param float32"
  FLAVOR=cmp; LBS=2; SEQ=64; STEPS=3; WARMUP=1
  MODEL=(model=llama3_2_1b model.tie_embeddings=false model.dim=$CMP_DIM model.n_layers=$CMP_LAYERS model.n_heads=$CMP_HEADS
         model.n_kv_heads=$CMP_HEADS model.vocab_size=$CMP_VOCAB model.multiple_of=256
         model.ffn_dim_multiplier=null model.rope_theta=10000 model.max_seq_len=$SEQ)
  PREP_VOCAB=$CMP_VOCAB; MAX_CHARS=200000
  COST=(--preset tiny)
  COMPILE="${GPU_SUITE_DRY_COMPILE:-0}"  # 1: the compiled runs too (minutes of inductor on a CPU)
  HF_CMP=(--synthetic tiny --steps 3 --warmup 1 --val-batches 1)
  DECODE=(--device cpu --dtype float32 --batch-sizes 1,2 --prompts 2 --prompt-tokens 8 --max-new-tokens 4)
  DOC_MASK=(--shapes tiny --rounds 1 --warmup 0 --doc-tokens 16)
else
  FLAVOR=1B; LBS=4; SEQ=4096; STEPS=25; WARMUP=5
  MODEL=(model=llama3_2_1b model.tie_embeddings=false model.max_seq_len=$SEQ)  # torchtitan's 1B is untied
  PREP_VOCAB=8192; MAX_CHARS=4000000
  COST=(--preset anchor --batch 4 --seq 4096 --chunk 4096 --rounds 8 --warmup 2)
  COMPILE=1
  HF_CMP=(--synthetic smollm2 --steps 12 --warmup 4 --val-batches 4)
  DECODE=(--device cuda --dtype bfloat16 --batch-sizes 1,8 --prompts 8 --prompt-tokens 32 --max-new-tokens 64)
  DOC_MASK=(--shapes llama3_2_1b --rounds 4 --warmup 2 --no-compile)
fi
if [ -n "${GPU_SUITE_DECODE_MODEL:-}" ]; then
  DECODE+=(--model "$GPU_SUITE_DECODE_MODEL")
else
  DECODE+=(--random tiny)
fi
DECODE+=(--exit "${GPU_SUITE_DECODE_EXIT:-6}" --draft "${GPU_SUITE_DECODE_DRAFT:-4}")

# ---- fetched wheels, if any: ours unpacked into $WORK/site, torchtitan's by run.sh into $WORK/titan/vendor
SITE="$WORK/site"
mkdir -p "$SITE"
for w in "$KIT"/wheels/*.whl; do
  [ -e "$w" ] || continue
  "$PY" -m zipfile -e "$w" "$SITE" || { say "failed to unpack $w"; exit 1; }
done
if ! "$PY" -c "import sentencepiece" 2>/dev/null; then
  for w in "$KIT"/wheels/if_missing/sentencepiece-*.whl; do
    [ -e "$w" ] && "$PY" -m zipfile -e "$w" "$SITE"
  done
fi
say "unpacked $(ls "$KIT"/wheels/*.whl 2>/dev/null | wc -l) wheel(s) into $SITE; torchtitan: ${TITAN_WHEELS:-installed packages}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
OURPATH="$SITE${TITAN_WHEELS:+:$WORK/titan/vendor}:$ROOT"
STATUS="$WORK/status.txt"
: > "$STATUS"

# run_step NAME CAP_S CMD...: runs within what is left of the budget; records rc in $STATUS.
run_step() {
  local name="$1" cap="$2"; shift 2
  local left=$((BUDGET_S - ($(date +%s) - START)))
  local t=$((cap < left ? cap : left))
  if [ "$t" -lt 20 ]; then
    say "$name: skipped (budget of ${BUDGET_S}s spent)"; echo "$name skipped" >> "$STATUS"; return
  fi
  say "$name: start (limit ${t}s)"
  local t0=$(date +%s)
  timeout --kill-after=15 "$t" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  grep -E "step|tok/s|Error|error|Traceback|SUMMARY|^\[|dry run|total per rank" "$WORK/$name.log" \
    | sed 's/\x1b\[[0-9;]*m//g' | tail -n 12 >> "$LOG"
  say "$name: rc=$rc in $(( $(date +%s) - t0 ))s"
  if [ "$rc" != 0 ]; then  # suite.log alone tells why: the failure's end goes into it
    { echo "----- last 60 lines of $name.log -----"; tail -n 60 "$WORK/$name.log"; echo "-----"; } >> "$LOG"
  fi
  echo "$name $rc" >> "$STATUS"
}

# The steps' commands (arrays: `timeout` runs programs, not shell functions).
TITAN=(env OUT="$WORK/titan" PYTHON="$PY" FLAVOR=$FLAVOR LBS=$LBS SEQ=$SEQ STEPS=$STEPS WARMUP=$WARMUP
       AC=selective TITAN_WHEELS="$TITAN_WHEELS" bash "$ANCHOR/run.sh")  # MODES=... per step
TRAIN=(env PYTHONPATH="$OURPATH" "$PY" -m train)
# a tokenizer for the stdlib corpus (cached in the run directory); the 1B runs then only pack tokens
PREP=("${TRAIN[@]}" model=tiny model.dim=32 model.n_layers=1 model.n_heads=2 model.n_kv_heads=1 model.vocab_size=$PREP_VOCAB data.source=stdlib
      data.max_chars=$MAX_CHARS data.cache_dir="$WORK/data" data.seq_len=128 data.batch_size=2
      data.val_fraction=0.05 layerskip=none train.steps=1 eval.every=0 eval.batches=1
      checkpoint.interval=0 checkpoint.save_final=false logging.tensorboard=false run_dir="$WORK/runs/prep")
# our trainer on the same shapes and settings as torchtitan, through our data path
OURS=("${TRAIN[@]}" "${MODEL[@]}" data.source=stdlib data.max_chars=$MAX_CHARS
      data.tokenizer="$WORK/runs/prep/tokenizer.model" data.cache_dir="$WORK/data"
      data.seq_len=$SEQ data.batch_size=$LBS data.val_fraction=0.05 data.num_workers=0
      parallel.ac=selective train.steps=$STEPS eval.every=0 eval.batches=1 eval.per_layer=false
      checkpoint.interval=0 checkpoint.save_final=false logging.every=1 logging.tensorboard=false)
# the dry run of our eager run's layout (world 1), to hold against its measured peak memory
ESTIMATE=("${TRAIN[@]}" "${MODEL[@]}" data.seq_len=$SEQ data.batch_size=$LBS layerskip=none
          parallel.ac=selective parallel.dry_run=1 parallel.dry_run_json="$WORK/estimate.json")

PAPER=(layerskip=continual layerskip.dropout.p_max=0.1 layerskip.exit.exits="1:"
       layerskip.exit.curriculum=rotational layerskip.exit.period=8 layerskip.exit.e_scale=0.1)

say "mode: $([ $DRY = 1 ] && echo 'DRY RUN on CPU (tiny shapes; not a measurement)' || echo GPU); python $PY; budget ${BUDGET_S}s"
run_step titan_eager 120 env MODES=eager "${TITAN[@]}"
run_step prep 90 "${PREP[@]}"
run_step estimate 60 "${ESTIMATE[@]}"  # CPU only; imports torchtitan (the fetched one, unpacked by the titan step)
run_step ours_eager 120 "${OURS[@]}" layerskip=none parallel.compile=false run_dir="$WORK/runs/ours_eager"
if [ "$COMPILE" = 1 ]; then
  run_step titan_compile 150 env MODES=compile "${TITAN[@]}"
  run_step ours_compile 150 "${OURS[@]}" layerskip=none parallel.compile=true run_dir="$WORK/runs/ours_compile"
fi
run_step layerskip_cost 150 env PYTHONPATH="$OURPATH" "$PY" bench/layerskip_cost.py "${COST[@]}" \
  --out "$WORK/layerskip_cost.json"
run_step hf_compare 150 env PYTHONPATH="$OURPATH" "$PY" bench/smollm2_speed.py "${HF_CMP[@]}" \
  --parts hf,ours,ours_layerskip,validation --work "$WORK/hf_compare" --out "$WORK/hf_compare.json"
run_step paper 150 "${OURS[@]}" "${PAPER[@]}" parallel.compile=$([ "$COMPILE" = 1 ] && echo true || echo false) \
  run_dir="$WORK/runs/paper"
run_step document_mask 150 env PYTHONPATH="$OURPATH" "$PY" bench/document_mask_cost.py "${DOC_MASK[@]}" \
  --out "$WORK/document_mask.json"
run_step decode 150 env PYTHONPATH="$OURPATH" "$PY" bench/decode_speed.py "${DECODE[@]}" --out "$WORK/decode.json"

PYTHONPATH="$OURPATH" "$PY" bench/gpu_suite_report.py --work "$WORK" --anchor "$ANCHOR" \
  --flavor "$FLAVOR" --warmup "$WARMUP" --out "$RESULTS" $([ $DRY = 1 ] && echo --dry-run) \
  --elapsed $(( $(date +%s) - START )) 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
say "done in $(( $(date +%s) - START ))s; results in $RESULTS (suite.json, suite.md, suite.log)"
exit "$rc"

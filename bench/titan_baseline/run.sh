#!/usr/bin/env bash
# torchtitan's own trainer on the shapes the GPU suite measures ours on, so that the suite can
# report our throughput as a ratio against torchtitan's, measured in the same run on the same GPU.
# The trainer is the torchtitan 0.2.2 package, unmodified; what is ours is the configuration kept in
# this folder: titan_spec.py registers a TrainSpec (Llama-3.2-1B shapes, untied; random tokens;
# FSDP2 even on one GPU, as torchtitan 0.3 does) and train_titan.py records every metrics dict
# torchtitan logs to a JSON-lines file. bf16 through FSDP2's MixedPrecisionPolicy (bf16 params,
# fp32 reduction), eager and torch.compile. Prints tokens/s/GPU, TFLOPS, MFU and peak memory.
#
# torchtitan 0.2.2 is used because 0.3.0 needs a torch newer than 2.11. Its packages come from the
# environment, or, on a GPU node without network, from wheels that bench/fetch_wheels.sh fetched
# beforehand (TITAN_WHEELS=DIR: unpacked with `python -m zipfile`, nothing installed). HF `datasets`,
# which torchtitan imports but never uses here, is replaced by stubs/datasets where it is missing.
#
# Usage:  bash bench/titan_baseline/run.sh                      # H100/H200 defaults
# Knobs:  FLAVOR=1B|3B|tiny|cmp LBS=4 SEQ=4096 STEPS=30 WARMUP=5 AC=selective MODES="eager compile"
#         NGPU=1 PYTHON=python OUT=./titan_baseline_out EXTRA="--some.flag value" TITAN_WHEELS=DIR
# CPU mode (a dry run without a GPU): BENCH_CPU_SHIM=1 FLAVOR=tiny LBS=2 SEQ=128 STEPS=6 WARMUP=2
#         MODES=eager EXTRA="--training.mixed_precision_param float32"; FLAVOR=cmp takes the shape
#         from CMP_DIM, CMP_LAYERS, CMP_HEADS and CMP_VOCAB, to build the model our trainer builds.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"
FLAVOR="${FLAVOR:-1B}"
LBS="${LBS:-4}"
SEQ="${SEQ:-4096}"
STEPS="${STEPS:-30}"
WARMUP="${WARMUP:-5}"
AC="${AC:-selective}"            # none | selective | full
MODES="${MODES:-eager compile}"
NGPU="${NGPU:-1}"
OUT="${OUT:-./titan_baseline_out}"
EXTRA="${EXTRA:-}"
WHEELS="${TITAN_WHEELS:-}"
mkdir -p "$OUT"

# ---- fetched wheels, if any, unpacked (no pip, no network); else the installed packages ----
VENDOR="$OUT/vendor"
if [ -n "$WHEELS" ] && [ ! -f "$VENDOR/.done" ]; then
  rm -rf "$VENDOR"; mkdir -p "$VENDOR"
  NEED_TE=$("$PYTHON" - <<'PY'
try:
    import importlib.metadata as m
    v = tuple(int(x) for x in m.version("typing_extensions").split(".")[:2])
    print("1" if v < (4, 14) else "0")
except Exception:
    print("1")
PY
)
  for w in "$WHEELS"/*.whl; do
    [ -e "$w" ] || continue
    case "$(basename "$w")" in typing_extensions-*) [ "$NEED_TE" = "1" ] || continue;; esac
    "$PYTHON" -m zipfile -e "$w" "$VENDOR" || { echo "failed to unpack $w"; exit 1; }
  done
  touch "$VENDOR/.done"
fi
STUBS=""
"$PYTHON" -c "import datasets" 2>/dev/null || STUBS="$HERE/stubs"
export PYTHONPATH="$HERE${WHEELS:+:$VENDOR}${STUBS:+:$STUBS}${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false

"$PYTHON" - <<'PY' || exit 1
import torch, torchtitan, torchdata, tyro
print(f"torch {torch.__version__} cuda={torch.version.cuda} avail={torch.cuda.is_available()} "
      f"dev={torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'} | "
      f"torchtitan {torchtitan.__version__} ({torchtitan.__file__})")
PY
if [ "${BENCH_CPU_SHIM:-0}" != "1" ]; then nvidia-smi --query-gpu=name,memory.total,power.limit --format=csv 2>/dev/null || true; fi

run_one() {
  local mode="$1"; local tag="${FLAVOR}_${mode}"
  local jsonl="$OUT/metrics_${tag}.jsonl"; rm -f "$jsonl"
  local flags=()
  [ "$mode" = "compile" ] && flags+=(--compile.enable)
  echo "=== [$tag] $(date +%T) ==="
  BENCH_METRICS_JSONL="$jsonl" "$PYTHON" -m torch.distributed.run \
      --standalone --nproc_per_node "$NGPU" --local-ranks-filter 0 --role rank --tee 3 \
      "$HERE/train_titan.py" \
      --experimental.custom_import titan_spec \
      --model.name llama3_bench --model.flavor "$FLAVOR" \
      --training.local_batch_size "$LBS" --training.seq_len "$SEQ" --training.steps "$STEPS" \
      --training.mixed_precision_param bfloat16 --training.mixed_precision_reduce float32 \
      --training.dataset synthetic \
      --lr_scheduler.warmup_steps 2 \
      --activation_checkpoint.mode "$AC" \
      --metrics.log_freq 1 --metrics.no-enable-tensorboard \
      --checkpoint.no-enable --validation.no-enable --profiling.no-enable-profiling \
      --comm.init_timeout_seconds 600 --comm.train_timeout_seconds 600 \
      --job.dump_folder "$OUT/dump_${tag}" \
      "${flags[@]}" $EXTRA 2>&1 | tee "$OUT/log_${tag}.txt" \
      | grep -E "step:|Model |Applied|Compiling|Error|error|Traceback|peak|Peak|FLOPS" \
      | sed 's/\x1b\[[0-9;]*m//g'
  local rc=${PIPESTATUS[0]}
  echo "=== [$tag] rc=$rc ==="
}

ARGS=()
for m in $MODES; do run_one "$m"; ARGS+=("${FLAVOR}_${m}=$OUT/metrics_${FLAVOR}_${m}.jsonl"); done
echo "===== SUMMARY (median over steps > $WARMUP; memory = peak over run) ====="
"$PYTHON" "$HERE/summarize.py" "$WARMUP" "${ARGS[@]}"

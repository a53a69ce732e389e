#!/usr/bin/env bash
# The quickstart's results (README.md, bench/results/): the quickstart itself (LayerSkip) and its baseline
# (`layerskip=none`: same model, data, steps and seed, plain pretraining), each trained like
# `bash launch/quickstart.sh` (FSDP on 2 CPU processes), then `python -m train.report` of the
# LayerSkip run alone and of both overlaid. Two 200-step trainings: ~10 min on 2 idle cores.
#   bash bench/quickstart_report.sh [OUT_DIR]      (default OUT_DIR: outputs/quickstart-report-<time>)
# Writes bench/results/quickstart_report.png, quickstart_vs_baseline.png and .md (the table).
source "$(dirname "$0")/../launch/_env.sh"
OUT="${1:-outputs/quickstart-report-$(date +%Y%m%d-%H%M%S)}"
for arm in layerskip baseline; do
  if [ -e "$OUT/$arm" ]; then
    echo "[quickstart_report] $OUT/$arm exists; give another OUT_DIR" >&2
    exit 1
  fi
done
for arm in layerskip baseline; do
  extra=()
  [ "$arm" = baseline ] && extra=(layerskip=none)
  echo "[quickstart_report] training $arm into $OUT/$arm"
  OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node=2 -m train run_dir="$OUT/$arm" "${extra[@]}"
done
mkdir -p bench/results
python -m train.report "$OUT/layerskip" --labels "quickstart (LayerSkip)" --out bench/results/quickstart_report.png
python -m train.report "$OUT/layerskip" "$OUT/baseline" --labels "LayerSkip,baseline (layerskip=none)" \
  --out bench/results/quickstart_vs_baseline.png | tee bench/results/quickstart_vs_baseline.md

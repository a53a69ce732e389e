#!/usr/bin/env bash
# From nothing to a trained LayerSkip checkpoint on this CPU: create .venv, install, train the
# default recipe (experiment=quickstart) with FSDP on 2 processes, export it for Hugging Face.
# Extra arguments are Hydra overrides, e.g.  bash launch/quickstart.sh train.steps=50
source "$(dirname "$0")/_env.sh"
NPROC="${NPROC:-2}"
RUN_DIR="${RUN_DIR:-outputs/quickstart-$(date +%Y%m%d-%H%M%S)}"
echo "[quickstart] training on $NPROC CPU processes (FSDP, gloo) into $RUN_DIR"
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" torchrun --standalone --nproc-per-node="$NPROC" \
  -m train run_dir="$RUN_DIR" "$@"
python -m train.export --run "$RUN_DIR" --out "$RUN_DIR/hf"
echo
echo "[quickstart] done."
echo "  metrics:      $RUN_DIR/metrics.jsonl"
echo "  TensorBoard:  tensorboard --logdir $RUN_DIR/tb"
echo "  checkpoints:  $RUN_DIR/checkpoints"
echo "  HF export:    $RUN_DIR/hf   (python -m train.decode --model $RUN_DIR/hf --text FILE)"

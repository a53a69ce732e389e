#!/usr/bin/env bash
# From nothing to a trained LayerSkip checkpoint on your CPU: create .venv, install, train the
# default recipe (experiment=quickstart) with FSDP on 2 processes, export it for Hugging Face.
# Extra arguments are Hydra overrides, e.g.  bash launch/quickstart.sh train.steps=50
# The run directory follows from the command (outputs/quickstart-<hash of the run's settings>,
# docs/runs.md; RUN_DIR=... overrides): run the same command again and it resumes the run, or,
# finished, says so and exports it again. A preemption signal saves and exits 75 (launch/_torchrun.sh).
source "$(dirname "$0")/_env.sh"
source launch/_torchrun.sh
NPROC="${NPROC:-2}"
if [ -n "${RUN_DIR:-}" ]; then
  set -- run_dir="$RUN_DIR" "$@"
else
  RUN_DIR="$(python -m train.run_identity --nproc "$NPROC" "$@")"
fi
echo "[quickstart] training on $NPROC CPU processes (FSDP, gloo) in $RUN_DIR"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
run_torchrun --standalone --nproc-per-node="$NPROC" \
  --max-restarts="${MAX_RESTARTS:-0}" -m train "$@"
python -m train.export --run "$RUN_DIR" --out "$RUN_DIR/hf"
echo
echo "[quickstart] done."
echo "  metrics:      $RUN_DIR/metrics.jsonl"
echo "  TensorBoard:  tensorboard --logdir $RUN_DIR/tb"
echo "  checkpoints:  $RUN_DIR/checkpoints"
echo "  HF export:    $RUN_DIR/hf   (python -m train.decode --model $RUN_DIR)"

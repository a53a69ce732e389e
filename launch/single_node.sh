#!/usr/bin/env bash
# One node, all its GPUs (or NPROC CPU processes):  bash launch/single_node.sh [hydra overrides]
# The run directory follows from the command (outputs/<experiment>-<hash of the run's settings>,
# train/run_identity.py; run_dir= overrides): elastic restarts (MAX_RESTARTS, default 3) and a
# rerun of the same command resume from the run's latest complete checkpoint.
# A preemption signal (SIGTERM, SIGUSR1) saves a checkpoint and exits 75 (launch/_torchrun.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/_torchrun.sh
NPROC="${NPROC:-$(python -c 'import torch; print(torch.cuda.device_count() or 2)')}"
run_torchrun --standalone --nproc-per-node="$NPROC" --max-restarts="${MAX_RESTARTS:-3}" \
  -m train "$@" && exit 0 || exit $?

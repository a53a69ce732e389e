#!/usr/bin/env bash
# One node, all its GPUs (or NPROC CPU processes):  bash launch/single_node.sh [hydra overrides]
# Elastic restarts (MAX_RESTARTS, default 3) resume from the run's latest complete checkpoint,
# because the run directory is named from the rendezvous run id, which survives restarts.
# A preemption signal (SIGTERM, SIGUSR1) saves a checkpoint and exits 75 (launch/_torchrun.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/_torchrun.sh
NPROC="${NPROC:-$(python -c 'import torch; print(torch.cuda.device_count() or 2)')}"
run_torchrun --standalone --nproc-per-node="$NPROC" --max-restarts="${MAX_RESTARTS:-3}" \
  -m train "$@" && exit 0 || exit $?

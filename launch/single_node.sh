#!/usr/bin/env bash
# One node, all its GPUs (or NPROC CPU processes):  bash launch/single_node.sh [hydra overrides]
# Elastic restarts (MAX_RESTARTS, default 3) resume from the run's latest complete checkpoint,
# because the run directory is named from the rendezvous run id, which survives restarts.
set -euo pipefail
# torch 2.13: restarted workers can fail to rejoin when torchrun shares its rendezvous store
# across restarts (pytorch/pytorch#135712); a fresh store per restart avoids it.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
cd "$(dirname "$0")/.."
NPROC="${NPROC:-$(python -c 'import torch; print(torch.cuda.device_count() or 2)')}"
exec torchrun --standalone --nproc-per-node="$NPROC" --max-restarts="${MAX_RESTARTS:-3}" \
  -m train "$@"

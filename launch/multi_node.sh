#!/usr/bin/env bash
# Several nodes with a c10d rendezvous. Run the same command on every node:
#   bash launch/multi_node.sh --nnodes 8 --node-rank 0 --endpoint host0:29500 --run-id exp42 [hydra overrides]
# Under Slurm the values default to SLURM_NNODES, SLURM_NODEID, the first host of
# SLURM_JOB_NODELIST and SLURM_JOB_ID. --run-id names the rendezvous only: the run directory
# follows from the command (outputs/<experiment>-<hash of the run's settings>, or run_dir=), so
# rerunning the same command resumes; every node must be given the same overrides.
# A preemption signal (SIGTERM, SIGUSR1) saves a checkpoint and exits 75 (launch/_torchrun.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/_torchrun.sh
NNODES="${SLURM_NNODES:-1}"
NODE_RANK="${SLURM_NODEID:-0}"
RUN_ID="${SLURM_JOB_ID:-}"
ENDPOINT=""
if [ -n "${SLURM_JOB_NODELIST:-}" ]; then
  ENDPOINT="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1):${MASTER_PORT:-29500}"
fi
NPROC="${NPROC:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --nnodes) NNODES="$2"; shift 2 ;;
    --node-rank) NODE_RANK="$2"; shift 2 ;;
    --endpoint) ENDPOINT="$2"; shift 2 ;;
    --run-id) RUN_ID="$2"; shift 2 ;;
    --nproc) NPROC="$2"; shift 2 ;;
    *) break ;;
  esac
done
: "${ENDPOINT:?give --endpoint HOST:PORT (the rendezvous host, reachable from every node)}"
: "${RUN_ID:?give --run-id ID (the same on every node; names the rendezvous)}"
NPROC="${NPROC:-$(python -c 'import torch; print(torch.cuda.device_count() or 1)')}"
run_torchrun --nnodes="$NNODES" --node-rank="$NODE_RANK" --nproc-per-node="$NPROC" \
  --rdzv-backend=c10d --rdzv-endpoint="$ENDPOINT" --rdzv-id="$RUN_ID" \
  --max-restarts="${MAX_RESTARTS:-3}" -m train "$@" && exit 0 || exit $?

#!/usr/bin/env bash
# Create .venv if missing, then run the whole test suite (distributed tests included, on CPU/gloo).
LAYERSKIP_EXTRAS="${LAYERSKIP_EXTRAS:-dev,hf,eval,wandb}"
source "$(dirname "$0")/_env.sh"
exec python -m pytest -q "$@"

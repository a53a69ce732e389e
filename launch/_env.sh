# Sourced by the launch scripts: create .venv on first use and install the project into it.
# torch 2.13.0 first, explicitly: on this kind of machine pip takes its CPU build from local disk,
# and every later requirement (torch>=2.11,<2.14) is then already satisfied.
set -euo pipefail
# torch 2.13: restarted workers can fail to rejoin when torchrun shares its rendezvous store
# across restarts (pytorch/pytorch#135712); a fresh store per restart avoids it.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
if ! python -c "import train, torchtitan, hydra, transformers, matplotlib, lm_eval" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.installed ]; then
  echo "[setup] installing dependencies into .venv (first run only)"
  python -m pip install -q --upgrade pip
  if ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q "torch==2.13.0" || python -m pip install -q "torch>=2.11,<2.14"
  fi
  python -m pip install -q -e ".[dev,hf,eval]"
  touch .venv/.installed
fi

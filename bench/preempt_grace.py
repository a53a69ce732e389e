"""How long a preempted run has, and how much of it the save takes (docs/operations.md).

1. torchrun's grace period: a worker that ignores SIGTERM is started by torchrun; torchrun gets
   SIGTERM; we time until the worker is SIGKILLed. (torch 2.13's default shutdown timeout: 30 s,
   TORCH_ELASTIC_SHUTDOWN_TIMEOUT / --shutdown-timeout.)
2. The preemption path of a real run: `launch/single_node.sh` (2 CPU ranks, 2 data-loader
   workers each) on the quickstart recipe, SIGTERM to every process of the job (as slurmstepd
   sends it) mid-step, and again while a validation runs; from the log: the synchronous save's
   seconds, and from the clock: signal -> checkpoint complete (what must fit in the grace period)
   and signal -> launch script exited (75; the rest is process teardown).

    python bench/preempt_grace.py [--out bench/results/preempt_grace_cpu.json] [overrides...]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_IGNORING_WORKER = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
open(sys.argv[1], "w").write(str(os.getpid()))
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def torchrun_grace(tmp: Path) -> float:
    script, pidfile = tmp / "ignore_term.py", tmp / "worker.pid"
    script.write_text(_IGNORING_WORKER)
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              "--nproc-per-node=1", str(script), str(pidfile)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    while not pidfile.is_file() or not pidfile.read_text():
        time.sleep(0.1)
    worker = int(pidfile.read_text())
    t0 = time.monotonic()
    agent.send_signal(signal.SIGTERM)
    while _alive(worker):
        time.sleep(0.05)
    grace = time.monotonic() - t0
    agent.wait(timeout=60)
    return grace


def _job_pids(root: int) -> list[int]:
    """`root` and its descendants: the launch script, torchrun, the ranks, their loader workers."""
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                                                text=True).stdout.split()]
    return found


def _logged(metrics: Path, key: str) -> list[int]:
    if not metrics.is_file():
        return []
    return [json.loads(l)["step"] for l in metrics.read_text().splitlines() if f'"{key}"' in l]


def preempted_run(tmp: Path, overrides: list[str], during_validation: bool) -> dict:
    """SIGTERM to every process of the job (as slurmstepd sends it) mid-step, or while the
    validation of step 4 runs (signalled as soon as step 4's training loss is logged, which
    precedes its validation)."""
    run_dir = tmp / ("run-val" if during_validation else "run-step")
    env = {**os.environ, "NPROC": "2", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    extra = ["eval.every=4"] if during_validation else ["eval.every=0"]
    log = open(tmp / f"{run_dir.name}.log", "w+")
    proc = subprocess.Popen(["bash", str(ROOT / "launch" / "single_node.sh"), f"run_dir={run_dir}",
                             "checkpoint.interval=0", *overrides, *extra], cwd=tmp, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    metrics = run_dir / "metrics.jsonl"
    while max(_logged(metrics, "loss"), default=0) < (4 if during_validation else 2):
        if proc.poll() is not None:
            raise SystemExit(f"the run ended early:\n{Path(log.name).read_text()[-3000:]}")
        time.sleep(0.01)
    pids = _job_pids(proc.pid)
    t0 = time.monotonic()
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    saved = None  # the moment the checkpoint is complete: all that must fit in the grace period
    while saved is None and proc.poll() is None:
        if list((run_dir / "checkpoints").glob("step-*/COMPLETE")):
            saved = time.monotonic() - t0
        time.sleep(0.01)
    code = proc.wait(timeout=120)
    total = time.monotonic() - t0
    log.seek(0)
    marker = [l for l in log.read().splitlines() if l.startswith("[launch] preempted")]
    record = json.loads(marker[0].split("saved: ", 1)[1].split("; exit")[0]) if marker else {}
    size = sum(f.stat().st_size for f in (run_dir / "checkpoints").rglob("*") if f.is_file())
    left = [p for p in pids if _alive(p)]
    out = {"exit_code": code, "processes_signalled": len(pids), "processes_left": len(left),
           "signal_to_checkpoint_complete_s": saved and round(saved, 2),
           "checkpoint_mb": round(size / 1e6, 1),
           "signal_to_exit_s": round(total, 2), "save_s": record.get("save_s"),
           "checkpoint_step": record.get("step")}
    if during_validation:
        out["validation_interrupted"] = 4 not in _logged(metrics, "val/loss")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "preempt_grace_cpu.json"))
    ap.add_argument("overrides", nargs="*", default=["experiment=quickstart", "logging.every=1",
                                                     "data.num_workers=2"])
    args = ap.parse_args()
    import torch
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        result = {"torch": torch.__version__, "load_average_before": os.getloadavg(),
                  "torchrun_grace_s": round(torchrun_grace(tmp), 2),
                  "preempted_quickstart_2_cpu_ranks": preempted_run(tmp, args.overrides, False),
                  "preempted_during_validation": preempted_run(tmp, args.overrides, True),
                  "overrides": args.overrides, "load_average_after": os.getloadavg()}
    print(json.dumps(result, indent=1))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

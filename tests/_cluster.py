"""Shared by the preemption and Slurm tests: a tiny 2-rank run, its uninterrupted reference (computed
once per test session, whichever test asks first) and a helper that signals a run once it has
logged a few steps.

The reference: the same overrides, 2 gloo ranks (FSDP2 over 2) via torchrun, straight through.
A preempted and resumed run on the same layout must reproduce its training losses exactly.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import time
from pathlib import Path
from typing import Callable

from tests._launch import ROOT, compose_config, run, torchrun_cmd

STEPS = 60
# A tiny model with layer dropout (global mode) and rotating exits; logging every step, so the
# step in progress when a signal arrives is the last one logged; no periodic checkpoints: the
# only one a preempted run leaves is the one the signal produced. The data settings are the
# paper recipes' (data=files: 2 loader worker processes per rank), shapes shrunk only.
TINY = ["experiment=quickstart", "model.n_layers=2", "model.dim=64", "model.n_heads=4",
        "model.n_kv_heads=2", "model.vocab_size=512", "model.multiple_of=16", "model.max_seq_len=64",
        "data=files", "data.seq_len=32", "data.val_fraction=0.25",
        "data.batch_size=4", "eval.every=0", "eval.batches=1", "logging.every=1",
        "logging.tensorboard=false", "optim.warmup_steps=2", "checkpoint.interval=0",
        f"train.steps={STEPS}"]


def overrides(corpus: Path, run_dir: Path | None = None) -> list[str]:
    """TINY on the shared corpus; without `run_dir` the run directory follows from the command
    (outputs/quickstart-<hash> in the working directory, train/run_identity.py)."""
    return [*TINY, f"data.source={corpus / 'corpus.txt'}", f"data.cache_dir={corpus / 'cache'}",
            *([f"run_dir={run_dir}"] if run_dir is not None else [])]


def default_run_dir(cwd: Path, overrides: list[str], dp_world: int = 2) -> Path:
    """The run directory a launch of `overrides` on `dp_world` data-parallel ranks without
    run_dir uses, started in `cwd`."""
    from train.run_identity import default_run_dir as named
    return Path(cwd) / named(compose_config(overrides), dp_world)


def shared_reference(tmp_path_factory) -> tuple[Path, dict[int, float]]:
    """(corpus folder, {step: loss} of the uninterrupted 2-rank run), made once per session."""
    base = tmp_path_factory.getbasetemp() / "cluster-reference"
    done = base / "losses.json"
    if not done.is_file():
        base.mkdir(parents=True, exist_ok=True)
        rng = random.Random(0)
        words = ("the early exit of a layer skips blocks when the model is sure of the next token "
                 "and dropout of layers makes the later blocks robust to missing inputs").split()
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(6, 18))) + "."
                 for _ in range(12000)]
        (base / "corpus.txt").write_text("\n".join(lines) + "\n")
        run_dir = base / "straight"
        run(torchrun_cmd(overrides(base, run_dir), nproc=2), cwd=base, timeout_s=150)
        losses = read_losses(run_dir)
        assert sorted(losses) == list(range(1, STEPS + 1))
        done.write_text(json.dumps(losses))
    return base, {int(k): v for k, v in json.loads(done.read_text()).items()}


def read_losses(run_dir: Path) -> dict[int, float]:
    """Training loss per step; a resumed run rewrites steps, the last record of a step counts."""
    out = {}
    path = Path(run_dir) / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if "loss" in record:
                out[record["step"]] = record["loss"]
    return out


def complete_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.name[5:]) for p in (Path(run_dir) / "checkpoints").glob("step-*/COMPLETE")
                  if p.parent.name[5:].isdigit())


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1",
            **extra}


def signal_after(proc: subprocess.Popen, run_dir: Path, min_step: int, send: Callable[[], None],
                 timeout_s: float = 120) -> int:
    """Once the run has logged `min_step` steps, call `send()`; returns the last step logged
    before it. Fails if the run ends first."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before it was signalled")
        if time.monotonic() > deadline:
            raise AssertionError(f"no step {min_step} within {timeout_s:.0f} s")
        steps = read_losses(run_dir)
        if steps and max(steps) >= min_step:
            seen = max(steps)
            send()
            return seen
        time.sleep(0.05)


def child_pids(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def job_pids(root: int) -> list[int]:
    """`root` and all its descendants (torchrun starts its workers in sessions of their own, so
    a process group does not hold a whole job: the process tree does, as Slurm tracks it)."""
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += child_pids(pid)
    return found


def signal_job(root: int, sig: int) -> list[int]:
    """Send `sig` to every process of the job rooted at `root` at once, as slurmstepd does on
    preemption, `scancel` and `scontrol requeue`; returns the pids signalled."""
    pids = job_pids(root)
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    return pids


def alive(pids: list[int]) -> list[int]:
    """The pids among `pids` that still run (zombies waiting for a reaper count as gone)."""
    out = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            out.append(pid)
    return out


def wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    """Wait until none of `pids` runs; returns those still running after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while (left := alive(pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left

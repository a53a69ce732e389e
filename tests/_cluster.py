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

from tests._launch import ROOT, run, torchrun_cmd

STEPS = 60
# A tiny model with layer dropout (global mode) and rotating exits; logging every step, so the
# step in progress when a signal arrives is the last one logged; no periodic checkpoints: the
# only one a preempted run leaves is the one the signal produced.
TINY = ["experiment=quickstart", "model.n_layers=2", "model.dim=64", "model.n_heads=4",
        "model.n_kv_heads=2", "model.vocab_size=512", "model.multiple_of=16", "model.max_seq_len=64",
        "data=files", "data.seq_len=32", "data.num_workers=0", "data.val_fraction=0.05",
        "data.batch_size=4", "eval.every=0", "eval.batches=1", "logging.every=1",
        "logging.tensorboard=false", "optim.warmup_steps=2", "checkpoint.interval=0",
        f"train.steps={STEPS}"]


def overrides(corpus: Path, run_dir: Path) -> list[str]:
    return [*TINY, f"data.source={corpus / 'corpus.txt'}", f"data.cache_dir={corpus / 'cache'}",
            f"run_dir={run_dir}"]


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
                 for _ in range(3000)]
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

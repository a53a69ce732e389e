"""Preemption end to end, as a cluster job meets it: `NPROC=2 bash launch/single_node.sh ...`
(torchrun, 2 gloo ranks, 2 data-loader worker processes per rank as the paper recipes' data
settings have it), no run_dir (the run directory follows from the command: outputs/quickstart-<hash>
in the repository, where the script runs; removed before and after each test). A signal mid-run
leaves a complete checkpoint of the step in progress and exit code 75, no process of the job
behind, and the identical command then resumes and reproduces the uninterrupted run's losses
exactly (tests/_cluster.py holds the reference). The signal as each sender delivers it: to every
process of the job at once (slurmstepd on preemption, `scancel`, `scontrol requeue`), to torchrun
only, and to one rank only (the other ranks learn it in the step's sync, and torchrun, allowed
restarts, must not restart the preempted workers). The first test also logs to W&B offline
(logging.wandb=true, WANDB_MODE=offline): the resumed run continues the same W&B run, its history
complete up to the resumed step and continued from there."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests._cluster import (child_pids, complete_steps, default_run_dir, env, overrides, read_losses,
                            shared_reference, signal_after, signal_job, wait_gone)
from tests._launch import ROOT, LaunchTimeout, start, wait_all
from tests.train._wandb_records import history, run_id

pytestmark = pytest.mark.slow
EXIT_PREEMPTED = 75
# Validation long enough (every held-out batch, each exit) that a signal sent when its step is
# logged lands inside it.
VALIDATE_AT = 30
LONG_VALIDATION = [f"eval.every={VALIDATE_AT}", "eval.batches=100000"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return shared_reference(tmp_path_factory)


@pytest.fixture
def run_dirs():
    """run_dir(*extra): the run directory of the launch with these extra overrides, removed now
    (an identical command of an earlier test must not be resumed) and after the test."""
    made = []

    def run_dir(corpus: Path, *extra: str) -> Path:
        path = default_run_dir(ROOT, overrides(corpus) + list(extra))
        shutil.rmtree(path, ignore_errors=True)
        made.append(path)
        return path

    yield run_dir
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


# W&B with no network: the run is written under RUN_DIR/wandb/ (train/wandb_sink.py)
WANDB = ["logging.wandb=true"]
WANDB_ENV = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def _single_node(corpus: Path, *extra: str, max_restarts: int | None = None) -> tuple[list, dict]:
    """`NPROC=2 bash launch/single_node.sh OVERRIDES` as docs/operations.md shows it (this venv's torchrun)."""
    cmd = ["bash", str(ROOT / "launch" / "single_node.sh"), *overrides(corpus), *extra]
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    more = {"MAX_RESTARTS": str(max_restarts)} if max_restarts is not None else {}
    if any(x in WANDB for x in extra):
        more.update(WANDB_ENV)
    return cmd, env(NPROC="2", PATH=path, **more)


def _preempt(run_dir: Path, corpus: Path, send, *extra: str, at_step: int = 3,
             max_restarts: int | None = None):
    """Start the launch script; once step `at_step` is logged in `run_dir` call `send(script
    pid)`, which returns the pids it signalled. Returns (finished launch, last step logged before
    the signal, those pids still running 10 s after the script ended)."""
    cmd, e = _single_node(corpus, *extra, max_restarts=max_restarts)
    launch = start(cmd, cwd=ROOT, env=e)
    signalled: list[int] = []
    try:
        seen = signal_after(launch.proc, run_dir, at_step, lambda: signalled.extend(send(launch.proc.pid)))
        with contextlib.suppress(subprocess.TimeoutExpired):
            launch.proc.wait(timeout=90)
        left = wait_gone(signalled, timeout_s=10)  # before wait_all kills what is left of the session
    except BaseException:
        with contextlib.suppress(LaunchTimeout):
            wait_all([launch], timeout_s=0.1)  # kills the whole launch
        raise
    (done,) = wait_all([launch], timeout_s=1)
    return done, seen, left


def _every_process(script_pid: int) -> list[int]:
    return signal_job(script_pid, signal.SIGTERM)


def _torchrun_of(script_pid: int) -> int:
    (agent,) = child_pids(script_pid)
    return agent


def _resume(corpus: Path, *extra: str) -> str:
    """The same command again: it must resume and finish."""
    cmd, e = _single_node(corpus, *extra)
    (again,) = wait_all([start(cmd, cwd=ROOT, env=e)], timeout_s=150)
    assert again.returncode == 0, again.output[-4000:]
    return again.output


def test_sigterm_to_every_process_mid_step_saves_and_the_same_command_resumes(reference, run_dirs):
    corpus, want = reference
    run_dir = run_dirs(corpus, *WANDB)
    done, seen, left = _preempt(run_dir, corpus, _every_process, *WANDB)
    assert done.returncode == EXIT_PREEMPTED, done.output[-4000:]
    assert "is killed by signal" not in done.output, done.output[-4000:]  # loader workers survived
    (saved,) = complete_steps(run_dir)  # interval 0: the signal's checkpoint is the only one
    assert seen < saved == max(read_losses(run_dir)), (seen, saved)  # the step in progress, completed
    assert "preempted (SIGTERM)" in done.output
    assert not left, f"processes of the job still running after it ended: {left}"

    output = _resume(corpus, *WANDB)
    assert f"resumed from step {saved}" in output
    assert read_losses(run_dir) == want
    # one W&B run across the preemption: the resumed attempt's history continues at the next step
    stored = json.loads((run_dir / "wandb.json").read_text())["run_id"]
    first, second = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"), key=lambda p: p.stat().st_mtime)
    # Each attempt's file is named by the run id it was given (wandb.init(id=...)); the first
    # attempt's may hold no run record at all: the signal also stopped W&B's service process (it
    # was part of the job), losing what it had not written. The resumed attempt's file records the
    # same run and backfills the history from metrics.jsonl.
    assert first.name == second.name == f"run-{stored}.wandb"
    assert run_id(second) == stored
    if first.stat().st_size > 7:  # more than the header: what it did write is of this run's steps
        assert set(history(first)) <= set(range(1, saved + 1))
    assert sorted(history(second)) == list(range(1, max(want) + 1))
    assert {"loss/total", "optim/grad_norm", "straggler/rank"} <= history(second)[saved]
    assert {"loss/total", "optim/grad_norm", "straggler/rank"} <= history(second)[max(want)]


def test_sigterm_to_every_process_during_validation_saves_that_step(reference, run_dirs):
    """Validation is interrupted between two batches: the checkpoint is of the validated step (no
    extra training step first), and the run it resumes is still exact."""
    corpus, want = reference
    run_dir = run_dirs(corpus, *LONG_VALIDATION)
    done, seen, left = _preempt(run_dir, corpus, _every_process, *LONG_VALIDATION, at_step=VALIDATE_AT)
    assert done.returncode == EXIT_PREEMPTED, done.output[-4000:]
    assert seen == VALIDATE_AT and complete_steps(run_dir) == [VALIDATE_AT], done.output[-4000:]
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in records if r["step"] == VALIDATE_AT and "val/loss" in r]  # interrupted
    assert max(read_losses(run_dir)) == VALIDATE_AT
    assert not left, f"processes of the job still running after it ended: {left}"

    output = _resume(corpus, *LONG_VALIDATION)
    assert f"resumed from step {VALIDATE_AT}" in output
    assert read_losses(run_dir) == want


def test_sigterm_to_torchrun_only_saves_the_step_in_progress(reference, run_dirs):
    corpus, want = reference
    run_dir = run_dirs(corpus)
    done, seen, left = _preempt(run_dir, corpus, lambda pid: os.kill(_torchrun_of(pid), signal.SIGTERM) or [])
    assert done.returncode == EXIT_PREEMPTED, done.output[-4000:]
    (saved,) = complete_steps(run_dir)
    losses = read_losses(run_dir)
    assert seen < saved == max(losses)
    assert {s: losses[s] for s in range(1, saved + 1)} == {s: want[s] for s in range(1, saved + 1)}


def test_signal_to_one_worker_stops_every_rank_without_a_restart(reference, run_dirs):
    corpus, want = reference
    run_dir = run_dirs(corpus)

    def one_rank(script_pid: int) -> list[int]:
        os.kill(child_pids(_torchrun_of(script_pid))[-1], signal.SIGUSR1)
        return []

    done, seen, _ = _preempt(run_dir, corpus, one_rank, max_restarts=2)
    assert done.returncode == EXIT_PREEMPTED, done.output[-4000:]
    (saved,) = complete_steps(run_dir)
    losses = read_losses(run_dir)
    assert seen < saved == max(losses)  # nobody trained on after the save (no restart)
    assert "will restart worker group" not in done.output and "resumed from step" not in done.output
    assert {s: losses[s] for s in range(1, saved + 1)} == {s: want[s] for s in range(1, saved + 1)}
    last = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["balance/slowest_rank"] in (0, 1) and last["balance/fastest_rank"] in (0, 1)
    assert last["balance/slowest_step_s"] >= last["balance/fastest_step_s"] > 0
    assert 0 < last["balance/kept_min"] <= last["balance/kept_max"] <= 1


def test_a_failed_preemption_save_ends_the_job_without_a_restart(reference, run_dirs):
    """A stop is final: the checkpoint folder turns unwritable (here: a file where the folder
    goes) as the signal reaches the launch script. The save fails, torchrun restarts the workers
    (allowed restarts), and they refuse to train on: the script exits non-zero soon after the
    signal, with the save's error and its own line in the output."""
    corpus, _ = reference
    run_dir = run_dirs(corpus)
    sent = []

    def unwritable_then_signal(script_pid: int) -> list[int]:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        (run_dir / "checkpoints").write_text("not a folder\n")
        sent.append(time.monotonic())
        os.kill(script_pid, signal.SIGTERM)
        return []

    cmd, e = _single_node(corpus, max_restarts=2)
    launch = start(cmd, cwd=ROOT, env=e)
    try:
        seen = signal_after(launch.proc, run_dir, 3, lambda: unwritable_then_signal(launch.proc.pid))
        launch.proc.wait(timeout=90)
        took = time.monotonic() - sent[0]
    finally:
        (done,) = wait_all([launch], timeout_s=1)
    assert done.returncode not in (0, EXIT_PREEMPTED), done.output[-4000:]
    assert "[launch] stopped by SIGTERM without a checkpoint of it" in done.output, done.output[-4000:]
    assert re.search(rf"FileExistsError: .*{run_dir.name}/checkpoints", done.output), done.output[-4000:]
    assert "not starting: the job was stopped by SIGTERM" in done.output  # the restart refused
    assert "resumed from step" not in done.output
    logged = [json.loads(l)["step"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(l)]
    # Only the step in progress (and, if the signal came after its sync, the next) finished; no
    # restart logged a step again.
    assert logged == sorted(set(logged)) and max(logged) <= seen + 2, (seen, logged)
    assert took < 30, f"the job ended {took:.0f} s after the signal (torchrun's grace period: 30 s)"


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_preemption_save_completes_an_async_save_in_flight(tmp_path):
    """checkpoint.async: the preemption save (blocking) first completes the background save."""
    from train.checkpoint import CheckpointManager
    from train.config import CheckpointConfig, ModelConfig
    from train.model import build_model, init_model
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=16,
                      max_seq_len=64)
    model = init_model(build_model(cfg, "cpu"), "cpu", 0)
    ckpt = CheckpointManager(tmp_path, CheckpointConfig(async_save=True, keep=5), model_cfg=cfg)
    ckpt.save(1, model, None, {"step": 1})
    assert ckpt._pending is not None  # in flight
    ckpt.save(2, model, None, {"step": 2}, blocking=True)
    assert ckpt._pending is None
    assert sorted(p.parent.name for p in tmp_path.glob("step-*/COMPLETE")) == ["step-0000001", "step-0000002"]

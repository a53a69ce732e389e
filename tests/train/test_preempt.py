"""Preemption end to end, through the launch script users run (launch/single_node.sh -> torchrun,
2 gloo ranks): a signal mid-run leaves a complete checkpoint of the step in progress and exit
code 75, and the same command then resumes and reproduces the uninterrupted run's losses exactly
(tests/_cluster.py holds the reference). Both ways a signal arrives: at torchrun (which forwards
it) and at one worker only (the other ranks learn it in the step's sync, and torchrun, allowed
restarts, must not restart the preempted workers)."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from tests._cluster import child_pids, complete_steps, env, overrides, read_losses, shared_reference, signal_after
from tests._launch import ROOT, LaunchTimeout, start, wait_all

pytestmark = pytest.mark.slow
EXIT_PREEMPTED = 75


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return shared_reference(tmp_path_factory)


def _single_node(run_dir: Path, corpus: Path, max_restarts: int) -> list:
    cmd = ["bash", str(ROOT / "launch" / "single_node.sh"), *overrides(corpus, run_dir)]
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # this venv's torchrun
    return cmd, env(NPROC="2", MAX_RESTARTS=str(max_restarts), PATH=path)


def _preempt(run_dir: Path, corpus: Path, max_restarts: int, pick, sig: signal.Signals):
    """Start the launch script, send `sig` to the process `pick(script pid)` names once a few
    steps are logged; returns (finished launch, last step logged before the signal)."""
    cmd, e = _single_node(run_dir, corpus, max_restarts)
    launch = start(cmd, cwd=corpus, env=e)
    try:
        seen = signal_after(launch.proc, run_dir, 3, lambda: os.kill(pick(launch.proc.pid), sig))
    except BaseException:
        with contextlib.suppress(LaunchTimeout):
            wait_all([launch], timeout_s=0.1)  # kills the whole launch
        raise
    (done,) = wait_all([launch], timeout_s=90)
    return done, seen


def _torchrun_of(script_pid: int) -> int:
    (agent,) = child_pids(script_pid)
    return agent


def _one_worker_of(script_pid: int) -> int:
    return child_pids(_torchrun_of(script_pid))[-1]


def test_sigterm_to_torchrun_saves_the_step_in_progress_and_resumes_exactly(reference, tmp_path):
    corpus, want = reference
    run_dir = tmp_path / "run"
    done, seen = _preempt(run_dir, corpus, max_restarts=1, pick=_torchrun_of, sig=signal.SIGTERM)
    assert done.returncode == EXIT_PREEMPTED, done.output[-4000:]
    (saved,) = complete_steps(run_dir)  # interval 0: the signal's checkpoint is the only one
    logged = max(read_losses(run_dir))
    assert seen < saved == logged, (seen, saved, logged)  # the step in progress, completed
    assert "preempted (SIGTERM)" in done.output

    cmd, e = _single_node(run_dir, corpus, max_restarts=1)  # the same command again
    (again,) = wait_all([start(cmd, cwd=corpus, env=e)], timeout_s=120)
    assert again.returncode == 0, again.output[-4000:]
    assert f"resumed from step {saved}" in again.output
    assert read_losses(run_dir) == want


def test_signal_to_one_worker_stops_every_rank_without_a_restart(reference, tmp_path):
    corpus, want = reference
    run_dir = tmp_path / "run"
    done, seen = _preempt(run_dir, corpus, max_restarts=2, pick=_one_worker_of, sig=signal.SIGUSR1)
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

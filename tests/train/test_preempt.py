"""Preemption end to end, through the launch script users run (launch/single_node.sh -> torchrun,
2 gloo ranks): a signal mid-run leaves a complete checkpoint of the step in progress and exit
code 75, and the same command then resumes and reproduces the uninterrupted run's losses exactly
(tests/_cluster.py holds the reference). Both ways a signal arrives: at torchrun (which forwards
it) and at one worker only (the other ranks learn it in the step's sync, and torchrun, allowed
restarts, must not restart the preempted workers)."""
from __future__ import annotations

import contextlib
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

"""Preemption: a scheduler's signal becomes a complete checkpoint and a distinct exit code.

A cluster takes a job away with a signal and, a grace period later, SIGKILL: Slurm sends SIGTERM
on preemption, `scancel` and `scontrol requeue` (SIGKILL after KillWait / GraceTime) and, asked
with `--signal`, an early warning (we use SIGUSR1) before the time limit; torchrun, given SIGTERM,
forwards it to its workers and SIGKILLs them after `--shutdown-timeout` (30 s in torch 2.13).

What happens here: the handler only records the signal (nothing else is safe inside a handler);
the training loop carries that flag in the step's existing metrics collective, so every rank
learns within one step that some rank was signalled (whether the signal reached every process of
the job, torchrun, which forwards it, or one worker directly); between steps the ranks also ask
each other, together, between validation batches, after a periodic save and before the first
step (train/trainer.py). The ranks then complete any async save, save a checkpoint of the current
step synchronously (unless it is on disk already) and stop with `Preempted`. Data-loader workers
ignore these signals and die with their rank (train/process_lifetime.py). The entry point turns that into
exit code EXIT_PREEMPTED (75, EX_TEMPFAIL: "try again later"), except under torchrun, where a
preempted worker exits 0: any other code makes the agent restart the workers (--max-restarts),
which would resume and train on until the SIGKILL. The launch scripts tell a preempted run from a
finished one by the marker file named in LAYERSKIP_PREEMPT_MARKER, which the trainer writes
after the save (local rank 0 of every node), and exit 75 themselves.

A stop is final. If the preemption save fails on some rank (a full or vanished disk, a
collective timeout), that worker fails and torchrun would restart the workers (--max-restarts),
which would resume and train on. So the launch scripts create the file named in
LAYERSKIP_STOP_FILE when a preemption signal reaches them, before passing it on, and a worker
that starts while it exists exits at once (status 0, so that torchrun stops restarting) without
training: the launch script then ends the job non-zero, the save's error in its output. (The
workers do not create it themselves: torchrun's own SIGTERM, which stops the surviving workers
before an ordinary elastic restart, must not turn that restart into a stop. A signal that reaches
torchrun itself ends torchrun, so no restart follows it either.)
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

log = logging.getLogger("train")

EXIT_PREEMPTED = 75
MARKER_ENV = "LAYERSKIP_PREEMPT_MARKER"
STOP_ENV = "LAYERSKIP_STOP_FILE"


class Preempted(Exception):
    """The run stopped for a preemption signal after saving checkpoint `step`."""

    def __init__(self, step: int, signal_name: str, folder: Path | None):
        super().__init__(f"preempted by {signal_name}: checkpoint of step {step} saved in {folder}")
        self.step, self.signal_name, self.folder = step, signal_name, folder


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


class PreemptionWatch:
    """Records the first of `signals` this process receives. Handlers are installed only from the
    main thread (Python allows no other) and restored by `close`."""

    def __init__(self, signals: list[str]):
        self.received: str | None = None
        self.received_at: float | None = None
        self._previous: dict[signal.Signals, object] = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for name in signals:
            sig = signal.Signals[name]
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            self.received_at = time.monotonic()

    @property
    def requested(self) -> bool:
        return self.received is not None

    def close(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}


def write_marker(step: int, signal_name: str, folder: Path | None, save_s: float) -> None:
    """The launch scripts' evidence that the run was preempted (and not finished)."""
    path = os.environ.get(MARKER_ENV)
    if not path or int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return
    record = {"step": step, "signal": signal_name, "checkpoint": str(folder) if folder else None,
              "save_s": round(save_s, 3), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, path)


def refuse_to_start() -> str | None:
    """In a worker starting up: the signal that stopped this job before it started (from
    LAYERSKIP_STOP_FILE), else None. Refusing is recorded next to the stop file (`.refused`), so
    the launch script can tell this from a run that finished its last step as the signal came."""
    path = os.environ.get(STOP_ENV)
    if not path:
        return None
    try:
        stopped = Path(path).read_text().strip() or "a preemption signal"
        with open(f"{path}.refused", "a") as f:
            f.write(f"rank {os.environ.get('RANK', '?')}\n")
    except OSError:
        return None
    return stopped


def exit_code() -> int:
    """The process exit status of a preempted worker (see the module docstring)."""
    return 0 if under_torchrun() else EXIT_PREEMPTED

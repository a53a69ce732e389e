"""Worker processes that never outlive the process that started them.

Every pool the project starts (the data loader's workers, prepare's ProcessPoolExecutor) calls
`die_with_parent` first thing in each worker. Two things a pool's own shutdown cannot cover:

- The parent killed with SIGKILL (OOM killer, `kill -9`, torchrun's shutdown timeout): it runs no
  shutdown code, and its workers would sleep on their task queue forever. Linux's
  PR_SET_PDEATHSIG has the kernel send the worker SIGKILL when its parent dies; a parent that died
  before the call is caught by comparing the parent pid with the one the worker was started by.
- A job-wide signal (slurmstepd, `scancel`, `scontrol requeue` and torchrun's shutdown signal every
  process of the job or of a rank's process group): a data-loader worker that dies of it makes the
  trainer raise "DataLoader worker ... is killed by signal" before it can save. The trainer
  decides what the job does on such a signal (train/preemption.py); its workers ignore it and
  stop when the trainer shuts its loader down or dies.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

# What a scheduler or torchrun sends to every process of a job; the parent handles them.
JOB_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1", "SIGUSR2")


def die_with_parent(ignore: tuple[str, ...] = ()) -> None:
    """In a freshly started worker: be killed when the parent dies, and ignore `ignore`
    (signal names). The parent is the process that started this worker (multiprocessing's
    record of it, else the current parent)."""
    for name in ignore:
        signal.signal(signal.Signals[name], signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    expected = parent.pid if parent is not None else os.getppid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != expected:  # the parent died before the kernel was told to watch it
        os._exit(1)


def loader_worker_init(worker_id: int) -> None:
    """The data loader's worker_init_fn: a loader worker lives and dies with its trainer rank."""
    die_with_parent(ignore=JOB_SIGNALS)


def pool_worker_init(then=None, *args) -> None:
    """A ProcessPoolExecutor initializer: die with the parent, then run the pool's own
    initializer `then(*args)`, if any. Signals keep their defaults: a signal to the whole job
    ends the workers with their parent."""
    die_with_parent()
    if then is not None:
        then(*args)

"""Worker processes that never outlive the process that started them.

Every pool the project starts (the data loader's workers, prepare's ProcessPoolExecutor) calls
`die_with_parent` first thing in each worker. Two things a pool's own shutdown cannot cover:

- The parent killed with SIGKILL (OOM killer, `kill -9`, torchrun's shutdown timeout): it runs no
  shutdown code, and its workers would sleep on their task queue forever. Linux's
  PR_SET_PDEATHSIG has the kernel send the worker SIGKILL when its parent dies; a parent that died
  before the call is caught by comparing the parent pid with the one the worker was started by.
  That holds for every start method multiprocessing has. Under `fork` and `spawn` the worker's
  parent is the process that started it. Under `forkserver` (Linux's default from Python 3.14)
  the parent is the fork server, and the process that asked for the worker is only
  `multiprocessing.parent_process()`: the kernel then watches the fork server, and a thread of
  the worker watches the starting process itself (a pidfd), so the worker still dies with it.
- A job-wide signal (slurmstepd, `scancel`, `scontrol requeue` and torchrun's shutdown signal every
  process of the job or of a rank's process group): a data-loader worker that dies of it makes the
  trainer raise "DataLoader worker ... is killed by signal" before it can save. The trainer
  decides what the job does on such a signal (train/preemption.py); its workers ignore it and
  stop when the trainer shuts its loader down or dies.

Ignoring SIGTERM has one consequence for the parent: at interpreter exit multiprocessing
terminates its daemonic children with SIGTERM and then joins them, which would wait forever on
such a worker. A rank that fails with its loader still open (an exception, not a clean shutdown)
would then never exit, and torchrun would never learn that it failed. So importing this module
registers an exit hook, run before multiprocessing's, that ends the daemonic children with SIGKILL
instead (what multiprocessing means to do to them, in a form they cannot ignore).
"""
from __future__ import annotations

import atexit
import ctypes
import multiprocessing
import multiprocessing.util  # registers its exit hook now, so that ours (below) runs before it
import os
import select
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

# What a scheduler or torchrun sends to every process of a job; the parent handles them.
JOB_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1", "SIGUSR2")


def die_with_parent(ignore: tuple[str, ...] = ()) -> None:
    """In a freshly started worker: be killed when the process that started it dies, under any
    start method, and ignore `ignore` (signal names)."""
    for name in ignore:
        signal.signal(signal.Signals[name], signal.SIG_IGN)
    starter = multiprocessing.parent_process()  # who asked for this worker (any start method)
    starter_pid = starter.pid if starter is not None else os.getppid()
    parent_pid = os.getppid()  # who forked it: the starter, or a fork server
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if parent_pid == starter_pid:
        if os.getppid() != starter_pid:  # the parent died before the kernel was told to watch it
            os._exit(1)
    else:  # forkserver (or the starter already gone): the kernel watches the fork server
        _exit_when_gone(starter_pid)


def _exit_when_gone(pid: int) -> None:
    """Exit this process (status 1) as soon as process `pid` (not our parent) has ended: a
    daemon thread blocks on a pidfd of it (Linux >= 5.3), else polls it every second."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(1)
    except (AttributeError, OSError):  # no pidfds here: poll
        fd = None

    def watch() -> None:
        if fd is not None:
            select.select([fd], [], [])  # readable once the process has ended
        else:
            while pid_alive(pid):
                time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name=f"exit-when-{pid}-ends", daemon=True).start()


def pid_alive(pid: int) -> bool:
    """Whether process `pid` of this host still exists (a process of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


def _kill_daemonic_children() -> None:
    """At interpreter exit (see the module docstring): SIGKILL this process's daemonic children.

    The data loader's SIGCHLD handler raises in this process when one of its workers dies
    ("DataLoader worker ... is killed by signal"); raised here, between two kills, it would leave
    the other workers alive for multiprocessing's own exit hook to join forever (they ignore its
    SIGTERM). So the handler is reset first, every child is killed before any is joined, and a
    join that raises does not stop the others."""
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    except ValueError:  # not the main thread: no handler of ours to reset
        pass
    children = [c for c in multiprocessing.active_children() if c.daemon and c.pid is not None]
    for child in children:
        try:
            os.kill(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for child in children:
        try:
            child.join(timeout=5)
        except Exception:  # noqa: BLE001 - exiting anyway; the next child must still be reaped
            pass


atexit.register(_kill_daemonic_children)

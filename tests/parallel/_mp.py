"""Run a function on N local gloo processes and collect what each returns; never hangs.

    results = run_distributed(fn, world_size=2, args=(...,), timeout_s=120)

`fn(rank, world_size, *args)` runs in a fresh process that has joined a gloo process group of
`world_size` ranks; it must be a module-level function (it is pickled by name) and return
something torch.save can write. The result is the list of return values by rank. If any rank
raises, its traceback is raised here as RuntimeError; if the ranks do not all finish within
`timeout_s` (a deadlock, a hang in a collective), every process is killed and TimeoutError is
raised.

Processes are forked from a fork server that has imported torch and the model code once (about
10 s of CPU per import of torchtitan): later runs start in about a second. Unlike plain fork, the
fork server is a clean single-threaded process, so children inherit no thread pools or compiled
state from the test process.
"""
from __future__ import annotations

import io
import os
import queue
import socket
import time
import traceback
from typing import Any, Callable

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, pg_timeout_s: float | None, fn: Callable,
            args: tuple, results: Any) -> None:
    import datetime

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)  # N processes share the machine's cores
    try:
        if pg_timeout_s is not None:
            dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(seconds=pg_timeout_s))
        out = fn(rank, world_size, *args)
        # Serialised here: a tensor sent through a torch.multiprocessing queue is shared memory
        # that dies with this process, which may exit before the parent reads it.
        buf = io.BytesIO()
        torch.save(out, buf)
        results.put((rank, True, buf.getvalue()))
    except BaseException:  # report everything, including assertion failures, to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# Imported once by the fork server (an import that fails is skipped).
PRELOAD = ["torch", "torch.distributed", "train.model", "parallel.parallelize"]


def run_distributed(fn: Callable, world_size: int, args: tuple = (), timeout_s: float = 120.0,
                    pg_timeout_s: float | None = 60.0) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` gloo ranks; return results by rank.
    `pg_timeout_s` is the process group's collective timeout inside the workers; None: no group
    is created, `fn` creates it from the torchrun-style environment (RANK, WORLD_SIZE, ...)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # takes effect when the server starts (first call)
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, pg_timeout_s, fn, args, results),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    outputs: dict[int, Any] = {}
    failures: list[str] = []
    try:
        while len(outputs) + len(failures) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"{fn.__name__} on {world_size} ranks did not finish within {timeout_s:.0f} s "
                    f"(finished: ranks {sorted(outputs)})")
            try:
                rank, ok, out = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs)
                        if p.exitcode is not None and p.exitcode != 0 and r not in outputs]
                if dead:  # a crash (segfault, OOM kill) that could not report
                    raise RuntimeError(f"rank(s) {dead} of {fn.__name__} died without a result "
                                       f"(exit codes {[procs[r].exitcode for r in dead]})")
                continue
            if ok:
                outputs[rank] = torch.load(io.BytesIO(out), weights_only=False)
            else:
                failures.append(f"--- rank {rank} ---\n{out}")
                break  # the other ranks may now block on the failed one; do not wait for them
        if failures:
            raise RuntimeError(f"{fn.__name__} failed:\n" + "\n".join(failures))
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
        return [outputs[r] for r in range(world_size)]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)

"""A collective that times out on CPU leaves every rank's Python stack behind (HangDumps): the rank
stuck elsewhere shows where it is stuck, the rank waiting in the collective shows the collective,
and the error the trainer raises names the dump folder."""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist

from parallel.distributed import HangDumps, init_distributed, is_collective_timeout
from tests.parallel._mp import run_distributed


def _stuck_outside_any_collective(seconds: float) -> None:
    time.sleep(seconds)


def _waiting_in_the_all_reduce() -> None:
    dist.all_reduce(torch.ones(1))


def _hang_worker(rank: int, world: int, folder: str) -> tuple[bool, str, str]:
    init_distributed(3.0, device_type="cpu")
    dumps = HangDumps(folder, rank, after_s=1.5)
    timed_out = False
    try:
        if rank == 1:
            _stuck_outside_any_collective(5.0)
        else:
            try:
                _waiting_in_the_all_reduce()
            except Exception as e:
                timed_out = is_collective_timeout(e)
                dumps.dump_now()
        return timed_out, dumps.describe(), Path(dumps.path).name
    finally:
        dumps.close()


def test_collective_timeout_leaves_every_ranks_stack(tmp_path: Path) -> None:
    results = run_distributed(_hang_worker, 2, args=(str(tmp_path),), timeout_s=90, pg_timeout_s=None)
    assert results[0][0], "rank 0's collective did not time out"
    assert str(tmp_path) in results[0][1]
    stacks = {r: (tmp_path / name).read_text() for r, (_, _, name) in enumerate(results)}
    assert "_waiting_in_the_all_reduce" in stacks[0], stacks[0]
    assert "_stuck_outside_any_collective" in stacks[1], stacks[1]
    assert "_waiting_in_the_all_reduce" not in stacks[1]
